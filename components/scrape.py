"""Collect images from the configured sources into content-addressed storage.

Every file is stored once under data/raw/images/<sha256[:2]>/<sha256>.<ext> and listed in
data/raw/manifest.parquet. Files that do not decode as images are still listed (format
"", size 0) so that validate quarantines them with a reason instead of losing them.
Synthetic sources also write their ground truth to data/raw/ground_truth.parquet.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import io
import os
import warnings
from collections import Counter
from pathlib import Path

import imagehash
import pandas as pd
from PIL import Image

from components.config import FolderSource, Params, SyntheticSource
from components.contracts import (
    GROUND_TRUTH,
    RAW,
    RAW_IMAGES,
    RAW_MANIFEST,
    SCHEMAS,
    UserError,
    atomic_dir,
    content_path,
    progress,
    sha256_bytes,
    write_table,
)
from components.synthetic import render, truth_row

EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}


def inspect_image(data: bytes) -> dict:
    """Decode just enough to describe the image; hostile or corrupt bytes give format ''."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return {"width": im.width, "height": im.height, "mode": im.mode,
                        "format": im.format or "", "phash": str(imagehash.phash(im))}
    except Exception:  # noqa: BLE001 - any decoder failure means "not an image"
        return {"width": 0, "height": 0, "mode": "", "format": "", "phash": ""}


def _row(data: bytes, source: str, source_url: str, fetched_at: str, alt: str = "") -> dict:
    digest = sha256_bytes(data)
    info = inspect_image(data)
    ext = EXT.get(info["format"], "bin")
    return {"id": digest, "path": str(content_path(RAW_IMAGES, digest, ext)),
            "source": source, "source_url": source_url, "page_url": "", "alt_text": alt,
            "fetched_at": fetched_at, "bytes": len(data), **info}


def _synthetic(i: int, src: SyntheticSource, params: Params):
    for k in progress(range(src.n), desc=f"synthetic[{i}]", unit="img"):
        data, truth = render(k, src.seed, src.size, params.brand, params.synthetic,
                             params.labels)
        yield data, f"synthetic:{src.seed}", f"synthetic://{src.seed}/{k}", "", truth


def _folder(i: int, src: FolderSource, max_bytes: int, skipped: Counter):
    root = Path(src.path).expanduser()
    if not root.is_dir():
        raise UserError(f"scrape.sources[{i}]: folder {root} does not exist; fix its path "
                        "in params.yaml")
    real_root = root.resolve()
    files = []
    for dirpath, _dirs, names in os.walk(root):  # os.walk does not follow symlinked dirs
        for name in sorted(names):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if not any(fnmatch.fnmatch(name.lower(), g.lower()) for g in src.include):
                continue
            if any(fnmatch.fnmatch(rel, g) for g in src.exclude):
                continue
            if not p.resolve().is_relative_to(real_root):
                skipped["symlink_outside"] += 1
                continue
            files.append(p)
    if not files:
        raise UserError(f"scrape.sources[{i}]: folder {root} has no files matching "
                        f"{src.include}; add images or change include")
    for p in progress(sorted(files), desc=f"folder[{i}]", unit="img"):
        if p.stat().st_size > max_bytes:
            skipped["too_large"] += 1
            continue
        mtime = dt.datetime.fromtimestamp(p.stat().st_mtime, dt.UTC).isoformat()
        yield p.read_bytes(), f"folder:{root}", p.resolve().as_uri(), mtime, None


def scrape(params: Params) -> dict:
    cfg = params.scrape
    rows: list[dict] = []
    truths: list[dict] = []
    seen: set[str] = set()
    counts: Counter = Counter()
    with atomic_dir(RAW) as tmp:
        for i, src in enumerate(cfg.sources):
            skipped: Counter = Counter()
            items = (_synthetic(i, src, params) if isinstance(src, SyntheticSource)
                     else _folder(i, src, cfg.max_image_bytes, skipped))
            for data, source, url, fetched_at, truth in items:
                row = _row(data, source, url, fetched_at)
                if row["id"] in seen:
                    counts["duplicate"] += 1
                    continue
                seen.add(row["id"])
                dest = tmp / Path(row["path"]).relative_to(RAW)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                rows.append(row)
                if truth is not None:
                    truths.append({"id": row["id"], **truth_row(truth)})
                counts[f"fetched.{source.split(':')[0]}"] += 1
            for reason, n in skipped.items():
                counts[f"skipped.{reason}"] += n
        manifest = pd.DataFrame(rows, columns=SCHEMAS["raw_manifest"].names)
        write_table(manifest, tmp / RAW_MANIFEST.relative_to(RAW), "raw_manifest")
        gt = pd.DataFrame(truths, columns=SCHEMAS["ground_truth"].names)
        write_table(gt, tmp / GROUND_TRUTH.relative_to(RAW), "ground_truth")
    return {"images": len(rows), "undecodable": int((manifest["format"] == "").sum()),
            "with_ground_truth": len(truths), **dict(counts)}
