"""Samplers side by side on the trained model: time per image and prompt adherence.

DDPM-1000 is the reference; the goals (issue "Models that learn") are DDIM-50 >= 15x
faster and DPM-Solver++(2M)-20 >= 2x faster than DDIM-50, each within 1 point of
adherence. Needs a trained model in models/ (run `make run` first).
Usage: python bench/bench_samplers.py [--seeds N]
"""

import argparse
import os
import sys
import time
from pathlib import Path

# before the imports: huggingface_hub reads it once, when first imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from components.config import Sampler, load_params
from components.contracts import CAPTIONS, UNET_DIR, VAE_DIR, read_table
from components.judge.evaluate import prompt_adherence
from components.models.generator import Generator

ROOT = Path(__file__).resolve().parents[1]

RUNS = [("ddpm", 1000), ("ddim", 50), ("dpmpp2m", 20)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2, help="images per adherence prompt")
    args = ap.parse_args()
    os.chdir(ROOT)  # params.yaml and the pipeline's paths are relative to it
    if not (UNET_DIR / "weights.safetensors").exists():
        print(f"bench_samplers: no trained model in {UNET_DIR}; run `make run` first")
        return 0
    params = load_params(overrides=[f"evaluate.adherence_seeds={args.seeds}"])
    train = read_table(CAPTIONS, "captions").query("split == 'train'")
    results = {}
    for name, steps in RUNS:
        gen = Generator.load(VAE_DIR, UNET_DIR, Sampler(
            name=name, steps=steps, guidance=params.sampler.guidance))
        t0 = time.perf_counter()
        m, _ = prompt_adherence(gen, params, train)
        seconds = time.perf_counter() - t0
        results[(name, steps)] = (seconds / m["adherence_images"], m)
    ref = results[("ddpm", 1000)][0]
    ddim = results[("ddim", 50)][0]
    print(f"{'sampler':14s} {'s/image':>8s} {'vs ddpm':>8s} {'vs ddim':>8s}  adherence "
          "(background, kind, saturation, layout)")
    for (name, steps), (per_image, m) in results.items():
        adh = ", ".join(f"{m[f'prompt_adherence_{f}']:.3f}"
                        for f in ("background", "background_kind", "saturation", "layout"))
        print(f"{name + '-' + str(steps):14s} {per_image:8.3f} {ref / per_image:7.2f}x "
              f"{ddim / per_image:7.2f}x  {adh}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
