"""Label every validated image, merge manual labels, write captions and the split.

The auto-labellers are plain functions of an image (and its OCR words), so evaluate runs
the very same ones on generated images to measure prompt adherence. Manual labels
(CSV files under labels/manual/ with an `id` column and any label fields) take
precedence; every field records where its value came from.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from components.config import Brand, Labels, Params
from components.contracts import (
    CAPTIONS,
    GROUND_TRUTH,
    LS_TASKS,
    MANUAL_LABELS,
    OCR_TABLE,
    SCHEMAS,
    VALID_MANIFEST,
    UserError,
    read_table,
    write_json,
    write_table,
)

FIELDS = ["background", "background_kind", "layout", "saturation"]
LAYOUTS = ["centre", "left", "right", "top", "bottom"]


# ------------------------------------------------------------------ auto-labellers
def _hsv(rgb: np.ndarray) -> tuple[float, float, float]:
    return colorsys.rgb_to_hsv(*(float(c) / 255 for c in rgb))


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def background_bands(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Median colour of thin bands along the top and bottom edges, which the
    generator keeps free of text, figures and logo."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    band = max(1, round(0.03 * a.shape[0]))
    return np.median(a[:band].reshape(-1, 3), 0), np.median(a[-band:].reshape(-1, 3), 0)


def label_background(img: Image.Image, brand: Brand, cfg: Labels) -> dict:
    """Background colour name (nearest palette hue), solid/gradient, saturation level."""
    top, bottom = background_bands(img)
    palette = brand.rgb()
    h, s, _v = _hsv(top)
    dists = sorted((_hue_distance(h, _hsv(np.array(rgb))[0]), name)
                   for name, rgb in palette.items())
    (d1, name), (d2, _) = dists[0], dists[1]
    colour_conf = 1.0 - d1 / max(d1 + d2, 1e-9)
    spread = float(np.linalg.norm(top - bottom))
    kind = "gradient" if spread > cfg.gradient_threshold else "solid"
    kind_conf = min(1.0, abs(spread - cfg.gradient_threshold) / cfg.gradient_threshold)
    ref_s = _hsv(np.array(palette[name]))[1]
    ratio = s / max(ref_s, 1e-6)
    levels = sorted(cfg.saturation_levels.items(), key=lambda kv: abs(kv[1] - ratio))
    sat_name, sat_val = levels[0]
    gap = abs(levels[1][1] - sat_val) / 2 if len(levels) > 1 else 1.0
    sat_conf = max(0.0, 1.0 - abs(ratio - sat_val) / max(gap, 1e-6))
    return {"background": name, "background_conf": round(colour_conf, 4),
            "background_kind": kind, "background_kind_conf": round(kind_conf, 4),
            "saturation": sat_name, "saturation_conf": round(sat_conf, 4)}


def label_layout(words: list[dict], width: int, height: int) -> tuple[str, float]:
    """Where the text block sits, from the OCR word boxes: compare the free margins on
    opposite sides (a left-aligned block has a small left and a large right margin)."""
    # one-character "words" are mostly shapes read as letters (a triangle as "A")
    words = [w for w in words if len(w["text"].strip()) > 1] or words
    if not words or width <= 0 or height <= 0:
        return "centre", 0.0
    boxes = [w["box"] for w in words]  # [left, top, width, height] in image pixels
    x0 = min(b[0] for b in boxes) / width
    x1 = max(b[0] + b[2] for b in boxes) / width
    y0 = min(b[1] for b in boxes) / height
    y1 = max(b[1] + b[3] for b in boxes) / height
    horiz = x0 - (1 - x1)  # < 0: more room on the right -> block sits left
    vert = y0 - (1 - y1)
    threshold = 0.15
    if abs(horiz) >= abs(vert) and abs(horiz) > threshold:
        return ("left" if horiz < 0 else "right"), min(1.0, abs(horiz) / 0.4)
    if abs(vert) > threshold:
        return ("top" if vert < 0 else "bottom"), min(1.0, abs(vert) / 0.4)
    return "centre", max(0.0, 1.0 - max(abs(horiz), abs(vert)) / threshold)


# ------------------------------------------------------------------ split and captions
def split_of(image_id: str, cfg: Labels) -> str:
    """Deterministic split from the content hash: an image never changes split."""
    u = int(image_id[:8], 16) / 0x1_0000_0000
    if u < cfg.split.train:
        return "train"
    return "val" if u < cfg.split.train + cfg.split.val else "test"


def caption(row: dict, template: str) -> str:
    values = {k: row.get(k, "") for k in FIELDS}
    values["text"] = " ".join(str(row.get("text", "")).split())
    return " ".join(template.format(**values).split())


def read_manual(known_ids: set[str]) -> tuple[pd.DataFrame, list[str]]:
    """All CSVs under labels/manual/: id + any label fields. Problems are reported one line
    each (file, row, field) and the rest of the file is still used."""
    frames, problems = [], []
    allowed = set(FIELDS) | {"text"}
    for path in sorted(Path(MANUAL_LABELS).glob("*.csv")):
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "id" not in df.columns:
            problems.append(f"{path}: no 'id' column; file skipped")
            continue
        for col in df.columns:
            if col != "id" and col not in allowed:
                problems.append(f"{path}: unknown field '{col}' ignored; known: "
                                f"{', '.join(sorted(allowed))}")
        for i, r in df.iterrows():
            if r["id"] not in known_ids:
                problems.append(f"{path}: row {i + 2}: unknown id {r['id'][:16]}")
        df = df[df["id"].isin(known_ids)][["id", *[c for c in df.columns if c in allowed]]]
        frames.append(df)
    manual = pd.concat(frames) if frames else pd.DataFrame(columns=["id"])
    dup = manual["id"].duplicated(keep="last")
    for image_id in manual.loc[dup, "id"]:
        problems.append(f"labels/manual: id {image_id[:16]} labelled twice; the last wins")
    return manual[~dup], problems


def _labelstudio_task(row: dict) -> dict:
    result = [{"from_name": f, "to_name": "image", "type": "choices",
               "value": {"choices": [row[f]]}, "score": row[f"{f}_conf"]} for f in FIELDS]
    result.append({"from_name": "transcription", "to_name": "image", "type": "textarea",
                   "value": {"text": [row["text"]]}})
    return {"data": {"id": row["id"], "image": row["path"], "ocr_text": row["text"]},
            "predictions": [{"model_version": "tinyldm-auto", "result": result}]}


def labels(params: Params) -> dict:
    cfg = params.labels
    manifest = read_table(VALID_MANIFEST, "validated_manifest")
    ocr = read_table(OCR_TABLE, "ocr").set_index("id")
    if manifest.empty:
        raise UserError(f"{VALID_MANIFEST}: no valid images to label")
    rows = []
    for rec in manifest.to_dict("records"):
        with Image.open(rec["path"]) as im:
            auto = label_background(im, params.brand, cfg)
        o = ocr.loc[rec["id"]] if rec["id"] in ocr.index else None
        words = json.loads(o["words"]) if o is not None and o["words"] else []
        layout, layout_conf = label_layout(words, rec["width"], rec["height"])
        row = {"id": rec["id"], "path": rec["path"],
               "text": str(o["text"]) if o is not None else "", "text_provenance": "ocr",
               **auto, "layout": layout, "layout_conf": round(layout_conf, 4),
               "split": split_of(rec["id"], cfg)}
        for f in FIELDS:
            row[f"{f}_provenance"] = "auto"
        rows.append(row)
    df = pd.DataFrame(rows)

    manual, problems = read_manual(set(df["id"]))
    disagreements = 0
    if not manual.empty:
        df = df.set_index("id")
        for rec in manual.to_dict("records"):
            for field, value in rec.items():
                if field == "id" or value == "":
                    continue
                conf = df.at[rec["id"], f"{field}_conf"] if field in FIELDS else 0.0
                if df.at[rec["id"], field] != value and conf >= 0.9:
                    disagreements += 1
                df.at[rec["id"], field] = value
                df.at[rec["id"], f"{field}_provenance"] = "manual"
                if field in FIELDS:
                    df.at[rec["id"], f"{field}_conf"] = 1.0
        df = df.reset_index()
    df["caption"] = [caption(r, cfg.caption_template) for r in df.to_dict("records")]
    write_table(df[SCHEMAS["captions"].names], CAPTIONS, "captions")
    write_json(LS_TASKS, [_labelstudio_task(r) for r in df.to_dict("records")])

    metrics: dict = {"images": len(df), "manual_rows": len(manual),
                     "manual_problems": len(problems), "manual_disagreements": disagreements,
                     **{f"split_{s}": int((df["split"] == s).sum())
                        for s in ("train", "val", "test")}}
    if Path(GROUND_TRUTH).exists():
        gt = read_table(GROUND_TRUTH, "ground_truth").set_index("id")
        both = df[df["id"].isin(gt.index)].set_index("id")
        if len(both):
            for f in FIELDS:
                metrics[f"accuracy_{f}"] = round(float(
                    (both[f] == gt.loc[both.index, f]).mean()), 4)
    for line in problems:
        print(f"labels: {line}")
    return metrics
