"""U-Net training from the latent cache vs encoding the images on the fly, side by side.

The same U-Net steps (same batches, same model size) are timed twice: once reading the
cached posterior (what the unet stage does), once decoding the PNGs and running the VAE
encoder for every batch. Goal (issue "Models that learn"): the cache >= 5x faster.
Needs the outputs of `make run` (data/latents, models/vae).
Usage: python bench/bench_latent_cache.py [--batches N]
"""

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.config import load_params  # noqa: E402
from components.contracts import CAPTIONS, LATENTS, VAE_DIR, read_table  # noqa: E402
from components.diffusion import NoiseSchedule, training_loss  # noqa: E402
from components.latents import LatentCache  # noqa: E402
from components.training import bf16_enabled  # noqa: E402
from components.unet import ContextUnet  # noqa: E402
from components.vae import load_batch, load_vae  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    if not (LATENTS / "meta.json").exists() or not (VAE_DIR / "weights.safetensors").exists():
        print("bench_latent_cache: no latent cache or VAE; run `make run` first")
        return 0
    params = load_params()
    cfg = params.unet
    bf16 = bf16_enabled(cfg.bf16)
    cache = LatentCache(LATENTS)
    rows = cache.rows("train")
    paths = (read_table(CAPTIONS, "captions").set_index("id")
             .loc[cache.index.loc[rows, "id"], "path"].tolist())
    vae = load_vae(VAE_DIR)
    scale = float(cache.meta["scale_factor"])
    shape = tuple(cache.mean.shape[1:])
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(rows), (cfg.batch_size,), generator=gen).numpy()
               for _ in range(args.batches)]

    def run(from_cache: bool) -> float:
        torch.manual_seed(0)
        model = ContextUnet(shape[0], cfg.n_feat, cache.text.shape[1], shape[1]).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        schedule = NoiseSchedule(params.diffusion)
        t0 = time.perf_counter()
        for idx in batches:
            if from_cache:
                mean = torch.from_numpy(np.ascontiguousarray(cache.mean[rows[idx]]))
                logvar = torch.from_numpy(np.ascontiguousarray(cache.logvar[rows[idx]]))
            else:
                with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    mean, logvar = vae.encode(load_batch([paths[i] for i in idx],
                                                         vae.cfg.image_size))
                mean, logvar = mean.float(), logvar.float()
            x0 = (mean + (0.5 * logvar).exp() * torch.randn(mean.shape)) * scale
            text = torch.from_numpy(np.ascontiguousarray(cache.text[rows[idx]])).float()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = training_loss(model, schedule, x0, text, cfg.cond_drop, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / len(batches)

    run(True)  # warm-up
    cached, on_the_fly = run(True), run(False)
    print(f"{'U-Net step from':16s} {'s/step':>8s}")
    print(f"{'latent cache':16s} {cached:8.4f}")
    print(f"{'images + VAE':16s} {on_the_fly:8.4f}")
    print(f"cache speed-up: {on_the_fly / cached:.1f}x (batch {cfg.batch_size}, "
          f"{len(batches)} steps, bf16={bf16})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
