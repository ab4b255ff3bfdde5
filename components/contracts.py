"""What stages exchange: paths, table schemas, hashing and atomic writes.

A stage never writes its final path directly: it writes a temp sibling and renames it,
so a killed run leaves the previous output or none, never half of one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


class UserError(Exception):
    """A failure the user can fix; the CLI prints it as one line, no traceback."""


# ------------------------------------------------------------------ paths
DATA = Path("data")
RAW = DATA / "raw"
RAW_IMAGES = RAW / "images"
RAW_MANIFEST = RAW / "manifest.parquet"
GROUND_TRUTH = RAW / "ground_truth.parquet"
OCR = DATA / "ocr"
OCR_TABLE = OCR / "ocr.parquet"
VALIDATED = DATA / "validated"
VALID_MANIFEST = VALIDATED / "manifest.parquet"
QUARANTINE = VALIDATED / "quarantine.parquet"
LABELS = DATA / "labels"
CAPTIONS = LABELS / "captions.parquet"
SPLIT = DATA / "split" / "split.parquet"  # id, path, split, format: what the VAE needs
LS_TASKS = LABELS / "labelstudio_tasks.json"
LS_CONFIG = LABELS / "labelstudio_config.xml"
DISAGREEMENTS = LABELS / "disagreements.csv"  # manual labels overruling confident auto ones
MANUAL_LABELS = Path("labels") / "manual"
LATENTS = DATA / "latents"
MODELS = Path("models")
VAE_DIR = MODELS / "vae"
UNET_DIR = MODELS / "unet"
UPSCALER_DIR = MODELS / "upscaler"
REPORTS = Path("reports")
VALIDATION_REPORT = REPORTS / "validation"
EVAL_DIR = REPORTS / "eval"
EVAL_GRIDS = EVAL_DIR / "grids"  # sample grids PNG (a DVC out)
EVAL_REPORT = EVAL_DIR / "report.html"  # self-contained: images inline
METRICS = REPORTS / "metrics"


def progress(iterable=None, **kw):
    """A tqdm bar for a loop a person waits for; silent in CI and when stderr is no
    terminal (logs stay readable), and when the caller says so (`disable`)."""
    from tqdm import tqdm

    quiet = kw.pop("disable", False) or bool(os.environ.get("CI")) or not sys.stderr.isatty()
    return tqdm(iterable, disable=quiet, **kw)


def metrics_path(stage: str) -> Path:
    """Each stage's metrics JSON (DVC metrics); evaluate's sits with its report."""
    return EVAL_DIR / "metrics.json" if stage == "evaluate" else METRICS / f"{stage}.json"


# ------------------------------------------------------------------ images
def to_rgb(im: Any) -> Any:
    """A decoded PIL image as every stage sees it: EXIF rotation applied, the first frame
    of an animation, transparency flattened on white (how a brand graphic is meant to be
    seen), 16/32-bit greyscale scaled to 8 bits, any mode (1, P, LA, CMYK, ...) as RGB."""
    from PIL import Image, ImageOps

    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        import numpy as np

        a = np.asarray(im, dtype=np.float32)
        top = float(a.max()) if a.size and a.max() > 0 else 1.0
        im = Image.fromarray((a * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("RGB")


def open_rgb(path: Path | str) -> Any:
    """The image file at `path` through to_rgb (fully loaded; the file is closed)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


# ------------------------------------------------------------------ schemas
# the label system's fields, in caption order: attributes, the OCR text, a description
LABEL_FIELDS = ["background", "background_kind", "gradient_to", "layout", "figure_size",
                "saturation", "logo", "text", "description"]
TEXT_FIELDS = ["text", "description"]  # free text: the OCR transcription, a description
CAPTION_FIELDS = [*LABEL_FIELDS, "format"]  # + the image's aspect bucket (models/buckets.py)
SCHEMAS: dict[str, pa.Schema] = {
    "raw_manifest": pa.schema([
        ("id", pa.string()), ("path", pa.string()), ("source", pa.string()),
        ("source_url", pa.string()), ("page_url", pa.string()), ("alt_text", pa.string()),
        ("fetched_at", pa.string()), ("bytes", pa.int64()), ("width", pa.int64()),
        ("height", pa.int64()), ("mode", pa.string()), ("format", pa.string()),
        ("phash", pa.string()),
        ("near_duplicate_of", pa.string()),  # the id of the kept copy, "" for a keeper
        ("frames", pa.int64()), ("pixel_std", pa.float64()),  # animation; blank images
        ("decode_error", pa.string()),  # why the bytes are no usable image, "" if they are
    ]),
    "ground_truth": pa.schema([
        ("id", pa.string()), ("text", pa.string()), ("background", pa.string()),
        ("background_kind", pa.string()), ("gradient_to", pa.string()),
        ("layout", pa.string()), ("n_figures", pa.int64()), ("figure_size", pa.string()),
        ("saturation", pa.string()), ("logo", pa.bool_()), ("logo_corner", pa.string()),
        ("text_boxes", pa.string()),  # labelling/text_boxes.py's JSON
    ]),
    "ocr": pa.schema([
        ("id", pa.string()), ("text", pa.string()), ("mean_conf", pa.float64()),
        ("n_words", pa.int64()), ("words", pa.string()), ("engine_version", pa.string()),
        ("settings_hash", pa.string()), ("error", pa.string()),
    ]),
    "quarantine": pa.schema([("id", pa.string()), ("path", pa.string()),
                             ("reasons", pa.string())]),
    "captions": pa.schema([
        ("id", pa.string()), ("path", pa.string()), ("caption", pa.string()),
        ("caption_tokens", pa.int64()), ("split", pa.string()),
        ("dominant_colours", pa.string()), ("format", pa.string()),
        # every label field: its value, where it came from (manual/auto/ocr), a confidence
        *[(f"{f}{suffix}", t) for f in LABEL_FIELDS
          for suffix, t in [("", pa.string()), ("_provenance", pa.string()),
                            ("_conf", pa.float64())]],
        # where the text is (labelling/text_boxes.py's JSON), from truth, ocr or none
        ("text_boxes", pa.string()), ("text_boxes_provenance", pa.string()),
    ]),
    "split": pa.schema([("id", pa.string()), ("path", pa.string()), ("split", pa.string()),
                        ("format", pa.string())]),
    "latent_index": pa.schema([
        ("id", pa.string()), ("row", pa.int64()), ("split", pa.string()),
        ("caption", pa.string()), ("key", pa.string()), ("flip", pa.bool_()),
        ("format", pa.string()), ("format_row", pa.int64()),  # its bucket, its row there
    ]),
}
SCHEMAS["validated_manifest"] = SCHEMAS["raw_manifest"]


class SchemaError(UserError):
    pass


def check_schema(df: pd.DataFrame, table: str) -> None:
    want = SCHEMAS[table]
    missing = [n for n in want.names if n not in df.columns]
    extra = [c for c in df.columns if c not in want.names]
    if missing or extra:
        raise SchemaError(f"table {table}: missing columns {missing}, unexpected {extra}")


def write_table(df: pd.DataFrame, path: Path, table: str) -> None:
    """Write a Parquet table in its declared schema (column order and types enforced)."""
    check_schema(df, table)
    schema = SCHEMAS[table]
    t = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(t, tmp)


def read_table(path: Path, table: str) -> pd.DataFrame:
    if not Path(path).exists():
        raise UserError(f"{path}: missing; run the stage that writes it first "
                        f"(tinyldm run, or dvc repro)")
    df = pq.read_table(path).to_pandas()
    check_schema(df, table)
    return df


def split_sets(path: Path = SPLIT) -> tuple[list[str], list[str], tuple[list[str], list[str]]]:
    """The split table's train and val image paths, and their formats (aspect buckets):
    what the image trainers (vae, upscaler) read."""
    split = read_table(path, "split")
    train, val = (split[split["split"] == s] for s in ("train", "val"))
    return (train["path"].tolist(), val["path"].tolist(),
            (train["format"].tolist(), val["format"].tolist()))


# ------------------------------------------------------------------ hashing
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def settings_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able settings object (pydantic models included)."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())[:16]


def content_path(root: Path, digest: str, ext: str) -> Path:
    return root / digest[:2] / f"{digest}.{ext}"


# ------------------------------------------------------------------ atomic writes
def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _ensure_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        # name the real obstacle: the first ancestor that exists but is no folder
        blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()),
                       path.parent)
        raise UserError(f"{blocker}: cannot write there ({e.strerror}); "
                        "fix its permissions or free disk space") from None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp file path; on success rename it onto `path`."""
    path = Path(path)
    _ensure_parent(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temp directory; on success it replaces `path` whole."""
    path = Path(path)
    _ensure_parent(path)
    tmp = _tmp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


TRAINING_CURVE = "loss.csv"  # in models/vae and models/unet: a DVC plot and MLflow history


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    with atomic_path(Path(path)) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def read_json(path: Path) -> Any:
    if not Path(path).exists():
        raise UserError(f"{path}: missing; run the stage that writes it first")
    return json.loads(Path(path).read_text())


# what describes a run rather than its result: kept out of outputs that must reproduce
RUN_FACTS = {"seconds", "images_per_s", "steps_per_s", "resumed_at", "resumed_at_epoch",
             "sample_images_per_s"}


def results_only(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics a re-run reproduces bit for bit (timings and resume points left out): what
    a model folder keeps, so its DVC hash changes only when the model does."""
    return {k: v for k, v in metrics.items() if k not in RUN_FACTS}


def write_metrics(stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """A stage's metrics JSON. Evaluate's (the gate's input, beside its report) keeps only
    what a re-run reproduces; its timings go where the other stages' metrics are."""
    if stage == "evaluate":
        write_json(METRICS / "evaluate.json",
                   {k: v for k, v in metrics.items() if k in RUN_FACTS})
        metrics = results_only(metrics)
    write_json(metrics_path(stage), metrics)
    return metrics
