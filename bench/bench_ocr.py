"""OCR throughput with 1 and 2 Tesseract workers side by side, and the character error
rate against the built-in generator's ground truth, on freshly rendered 256 px posters
(no cache involved).

Goals (issue "Ingest"): 2 workers >= 1.8x one worker and >= 15 images/s on 2 cores;
CER <= 0.05 on the default data.
Usage: python bench/bench_ocr.py [--n 120] [--seed 0]
"""

import argparse
import io
import os
import sys
import time
from pathlib import Path

from PIL import Image

from components.config import load_params
from components.ingest.ocr import cer, read_texts
from components.ingest.synthetic import render

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)  # the default source's seed
    args = ap.parse_args()
    os.chdir(ROOT)  # params.yaml and the pipeline's paths are relative to it
    p = load_params()
    drawn = [render(i, args.seed, 256, p.brand, p.synthetic, p.labels) for i in range(args.n)]
    images = [Image.open(io.BytesIO(d)).convert("RGB") for d, _t in drawn]
    print(f"{args.n} posters at 256 px, Tesseract OEM {p.ocr.oem} PSM {p.ocr.psm}")
    rates = {}
    for workers in (1, 2):
        cfg = p.ocr.model_copy(update={"workers": workers})
        t0 = time.perf_counter()
        texts = read_texts(images, cfg)
        rates[workers] = args.n / (time.perf_counter() - t0)
        err = sum(cer(t, truth.text) for t, (_d, truth) in zip(texts, drawn, strict=True))
        print(f"  {workers} worker(s): {rates[workers]:6.2f} images/s, CER {err / args.n:.4f}")
    print(f"  speed-up 2 vs 1 workers: {rates[2] / rates[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
