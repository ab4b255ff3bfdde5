"""Ingest at the prototype's collection size: N images from a local folder through scrape +
OCR + validate, then a re-run after adding 1% new images, in a temp workspace.

Goals (issue "Ingest"): 10,028 images in <= 15 minutes on the 2-core box; the re-run does
<= 2% of the per-image work (images read and decoded by scrape + images OCR'd).
Usage: python bench/bench_ingest.py [--n 10028]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from components.config import load_params
from components.ingest.ocr import ocr
from components.ingest.scrape import scrape
from components.ingest.synthetic import render
from components.ingest.validate import validate

ROOT = Path(__file__).resolve().parents[1]


def write_folder(folder: Path, start: int, n: int, params) -> None:
    for i in range(start, start + n):
        data, _truth = render(i, 99, 256, params.brand, params.synthetic, params.labels)
        (folder / f"img_{i:05d}.png").write_bytes(data)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_028)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tinyldm-ingest-"))
    try:
        shutil.copy(ROOT / "params.yaml", work / "params.yaml")
        shutil.copytree(ROOT / "labels" / "brand", work / "labels" / "brand")
        os.chdir(work)
        folder = work / "collection"
        folder.mkdir()
        params = load_params(overrides=[
            f"scrape.sources=[{{kind: folder, path: {folder}}}]"])
        write_folder(folder, 0, args.n, params)
        t0 = time.perf_counter()
        s, o, v = scrape(params), ocr(params), validate(params)
        first = time.perf_counter() - t0
        print(f"{args.n} images: scrape + OCR + validate {first / 60:.1f} min "
              f"({args.n / first:.1f} images/s); valid {v['valid']}, OCR "
              f"{o['images_per_s']} images/s")
        new = max(1, args.n // 100)
        write_folder(folder, args.n, new, params)
        t0 = time.perf_counter()
        s, o, v = scrape(params), ocr(params), validate(params)
        again = time.perf_counter() - t0
        total = args.n + new
        decoded = total - s.get("reused", 0)
        ocred = o["images"] - o["cache_hits"]
        print(f"re-run with {new} new ({new / total:.1%}): {again:.1f} s; scrape read "
              f"{decoded} ({decoded / total:.1%}), OCR'd {ocred} ({ocred / total:.1%}) of "
              f"{total}: per-image work {(decoded + ocred) / (2 * total):.1%} "
              f"(time ratio {again / first:.1%})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
