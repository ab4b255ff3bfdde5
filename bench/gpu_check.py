"""The model stages on whatever device `device: auto` picks, end to end, with what they
measured: run it on a CUDA machine to check the GPU path (CI has no GPU).

    python bench/gpu_check.py [--profile gpu] [--set key=value ...] [--out DIR]

Trains the VAE, the upscaler, builds the latent cache and trains the U-Net from the current
data/ (after `make run`, or with data/raw, data/split and data/labels copied over), with
params.yaml's settings, the --profile's and the --set overrides, then measures held-out
prompt adherence and the detail ratio at 800 px of the result. Prints one table;
writes gpu_check.json to --out.
Not named bench_*.py: `make bench` (CPU) does not run it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# before the imports: huggingface_hub reads it once, when first imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from components.config import load_params
from components.contracts import CAPTIONS, UNET_DIR, UPSCALER_DIR, VAE_DIR, read_table
from components.judge.evaluate import detail, prompt_adherence
from components.models.generator import Generator
from components.overrides import profile_sets
from components.training.latents import latents
from components.training.unet import unet
from components.training.upscaler import upscaler
from components.training.vae import vae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="append", default=[], metavar="NAME")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    sets = profile_sets(args.profile) + args.set
    params = load_params("params.yaml", sets)
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}; CUDA: "
          f"{torch.cuda.get_device_name() if cuda else 'none'}; "
          f"bf16 on it: {cuda and torch.cuda.is_bf16_supported()}", flush=True)

    report: dict = {"torch": torch.__version__, "cuda": cuda, "set": sets}
    for name, stage in (("vae", vae), ("upscaler", upscaler), ("latents", latents),
                        ("unet", unet)):
        t0 = time.perf_counter()
        m = stage(params)
        report[name] = {k: v for k, v in m.items() if not isinstance(v, list | dict)}
        report[name]["wall_s"] = round(time.perf_counter() - t0, 2)
        print(f"{name}: {report[name]}", flush=True)
    t0 = time.perf_counter()
    caps = read_table(CAPTIONS, "captions")
    gen = Generator.load(VAE_DIR, UNET_DIR, params.sampler, upscaler_dir=UPSCALER_DIR)
    adherence, _ = prompt_adherence(gen, params, caps[caps["split"] == "train"])
    val = caps[caps["split"] == "val"].head(16)
    fake = gen.generate(val["caption"].tolist(), seed=params.evaluate.seed)
    report["adherence"] = adherence | detail(gen, fake, val["path"].tolist())
    report["adherence_wall_s"] = round(time.perf_counter() - t0, 2)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    v, u = report["vae"], report["unet"]
    print(f"\n{'stage':8} {'device':7} {'precision':9} {'train s':>8} {'rate':>16}  result")
    print(f"{'vae':8} {v['device']:7} {v['precision']:9} {v['seconds']:8.1f} "
          f"{v['images_per_s']:10.0f} img/s  val PSNR {v['val_psnr']:.2f} dB, "
          f"SSIM {v['val_ssim']:.3f}")
    print(f"{'unet':8} {u['device']:7} {u['precision']:9} {u['seconds']:8.1f} "
          f"{u['steps_per_s']:9.1f} steps/s  final loss {u['final_loss']:.4f}")
    print("held-out adherence: " + ", ".join(
        f"{k.removeprefix('prompt_adherence_')} {adherence[k]:.2f}" for k in adherence
        if k.startswith("prompt_adherence_") and "unseen" not in k))
    d = report["adherence"]
    print(f"detail ratio at 800 px: {d['detail_ratio_800']:.2f} (real images "
          f"{d['detail_ratio_800_real']:.2f})")


if __name__ == "__main__":
    main()
