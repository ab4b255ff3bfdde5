"""The labellers and OCR on the second collection (tests/second_collection.py: another
brand's posters, banners and strips, drawn by a renderer that shares no code with the
built-in generator), against its ground truth.

Prints each label field's accuracy (and that of its answers with confidence >= 0.5: a
calibrated labeller is right more often there), logo precision and recall, the confidence
of the wrong answers, OCR CER, and the misses by kind of image. Issue 27's targets: every field
>= 0.95, logo precision and recall >= 0.95, CER <= 0.05. Seed 1 here; the tests use seed
0; neither is for tuning (tune on the built-in data).
Usage: python bench/bench_second_collection.py [--n 150] [--seed 1] [--misses DIR]
"""

import argparse
import importlib.util
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

from PIL import Image

from components.config import Brand, load_params
from components.ingest.ocr import cer, read_many
from components.labelling.labeller import auto_labels

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("second_collection",
                                               ROOT / "tests" / "second_collection.py")
second_collection = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(second_collection)

FIELDS = ["background", "background_kind", "gradient_to", "layout", "figure_size",
          "saturation", "logo"]


def measure(n: int, seed: int, folder: Path) -> list[dict]:
    """Ground truth, OCR reading and auto labels of each of n images, side by side."""
    p = load_params(ROOT / "params.yaml")
    brand = Brand(**second_collection.write_brand(folder / "brand"))
    rows = second_collection.write_collection(folder / "images", n, seed)
    images = [Image.open(r["path"]).convert("RGB") for r in rows]
    reads = read_many(images, p.ocr.model_copy(update={"workers": 0}))
    for r, im, o in zip(rows, images, reads, strict=True):
        r["ocr"] = o["text"]
        r["cer"] = cer(o["text"], r["text"])
        r["auto"] = auto_labels(im, json.loads(o["words"]), brand, p.labels)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--misses", type=Path, help="copy the images with a miss here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.n, args.seed, Path(tmp))
        print(f"second collection: {args.n} images, seed {args.seed}")
        for f in FIELDS:
            wrong = [r for r in rows if r["auto"][f] != r[f]]
            sure = [r for r in rows if r["auto"][f"{f}_conf"] >= 0.5]
            confs = sorted(r["auto"][f"{f}_conf"] for r in wrong)
            print(f"  {f:<16} accuracy {1 - len(wrong) / len(rows):.3f}; confidence >= 0.5: "
                  f"{len(sure)} answers, accuracy "
                  f"{sum(r['auto'][f] == r[f] for r in sure) / max(len(sure), 1):.3f}"
                  + (f"; wrong answers' confidence {confs[0]:.2f}-{confs[-1]:.2f}" if confs
                     else ""))
        said = Counter((r["logo"], r["auto"]["logo"]) for r in rows)
        tp, fp, fn = said[("yes", "yes")], said[("no", "yes")], said[("yes", "no")]
        print(f"  logo precision {tp / max(tp + fp, 1):.3f} ({fp} false yes), recall "
              f"{tp / max(tp + fn, 1):.3f} ({fn} missed)")
        errs = [r["cer"] for r in rows]
        print(f"  OCR CER {sum(errs) / len(errs):.4f}; read nothing on "
              f"{sum(not r['ocr'].strip() for r in rows)}; CER > 0.2 on "
              f"{sum(e > 0.2 for e in errs)}")
        for r in rows:
            bad = [f"{f}: {r['auto'][f]} for {r[f]} ({r['auto'][f + '_conf']:.2f})"
                   for f in FIELDS if r["auto"][f] != r[f]]
            if r["cer"] > 0.2:
                bad.append(f"ocr {r['ocr']!r} for {r['text']!r}")
            if bad:
                name = Path(r["path"]).name
                print(f"    {name} ({r['format']}, {r['background_kind']}, card "
                      f"{r['on_card']}): " + "; ".join(bad))
                if args.misses:
                    args.misses.mkdir(parents=True, exist_ok=True)
                    Image.open(r["path"]).save(args.misses / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
