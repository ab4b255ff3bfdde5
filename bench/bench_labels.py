"""Auto-label accuracy per attribute against the built-in generator's ground truth, and
throughput, on freshly rendered images (no pipeline outputs needed).

Goal (issue "Labels and captions"): accuracy >= 99% for every attribute on the default
data. Labels come from the image alone here (no OCR words: layout then never needs the OCR
fallback), at the default size (256 px) and at the model's size (64 px, what evaluate
sees on generated images).
Usage: python bench/bench_labels.py [--n 600] [--seed 1]
"""

import argparse
import io
import os
import sys
import time
from pathlib import Path

from PIL import Image

from components.config import load_params
from components.ingest.synthetic import render
from components.labelling.labeller import auto_labels
from components.labelling.labels import ACCURACY_FIELDS

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    os.chdir(ROOT)  # params.yaml and the pipeline's paths are relative to it
    p = load_params()
    size = p.scrape.sources[0].size if p.scrape.sources[0].kind == "synthetic" else 256
    drawn = [render(i, args.seed, size, p.brand, p.synthetic, p.labels) for i in range(args.n)]
    images = [Image.open(io.BytesIO(d)).convert("RGB") for d, _t in drawn]
    truth = [{**t.__dict__, "logo": "yes" if t.logo else "no",
              "gradient_to": t.gradient_to or "none"} for _d, t in drawn]
    print(f"{args.n} images, seed {args.seed}")
    print(f"{'size':>5} {'img/s':>7}  " + " ".join(f"{f:>15}" for f in ACCURACY_FIELDS))
    for side in (size, p.vae.image_size):
        batch = [im if side == size else im.resize((side, side), Image.Resampling.BICUBIC)
                 for im in images]
        t0 = time.perf_counter()
        got = [auto_labels(im, [], p.brand, p.labels) for im in batch]
        rate = len(batch) / (time.perf_counter() - t0)
        acc = [sum(g[f] == t[f] for g, t in zip(got, truth, strict=True)) / len(got)
               for f in ACCURACY_FIELDS]
        print(f"{side:>5} {rate:>7.1f}  " + " ".join(f"{a:>15.4f}" for a in acc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
