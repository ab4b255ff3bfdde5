"""OCR throughput with 1 and 2 Tesseract workers side by side, and the character error
rate against the built-in generator's ground truth, on freshly rendered 256 px posters
(no cache involved).

Goals (issue "Ingest"): 2 workers >= 1.8x one worker and >= 15 images/s on 2 cores;
CER <= 0.05 on the default data. --headlines also reads posters whose text is one large
headline (letters 20-40% of the side: synthetic.headline_share 1), the large type OCR has
to read on real posters (issue 24: CER <= 0.05 there too), with 2 workers.
Usage: python bench/bench_ocr.py [--n 120] [--seed 0] [--headlines]
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
    ap.add_argument("--headlines", action="store_true", help="also large headline posters")
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
    if args.headlines:
        h = load_params(overrides=["synthetic.headline_share=1"])
        drawn = [render(i, args.seed, 256, h.brand, h.synthetic, h.labels)
                 for i in range(args.n)]
        texts = read_texts([Image.open(io.BytesIO(d)).convert("RGB") for d, _t in drawn],
                           h.ocr.model_copy(update={"workers": 2}))
        errs = [cer(t, truth.text) for t, (_d, truth) in zip(texts, drawn, strict=True)]
        empty = sum(not t.strip() for t in texts)
        print(f"  headline posters: CER {sum(errs) / args.n:.4f}, read nothing on "
              f"{empty} of {args.n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
