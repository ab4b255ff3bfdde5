"""Label every validated image, merge manual labels, write captions and the split.

The auto-labellers are plain functions of an image (and its OCR words), so evaluate runs
the very same ones on generated images to measure prompt adherence. The image-based ones
share one segmentation: a background model from the edge bands, "ink" (text and logo:
marks that depart from it toward white or black, blurred or not) and flat one-colour
figures. Manual labels (CSV files and Label Studio exports under labels/manual/) take
precedence; every field records where its value came from and how sure it is.
"""

from __future__ import annotations

import colorsys
import functools
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from components.config import Brand, Labels, Params
from components.contracts import (
    CAPTIONS,
    DISAGREEMENTS,
    GROUND_TRUTH,
    LABEL_FIELDS,
    LS_CONFIG,
    LS_TASKS,
    MANUAL_LABELS,
    OCR_TABLE,
    SCHEMAS,
    SPLIT,
    TEXT_FIELDS,
    VALID_MANIFEST,
    UserError,
    atomic_write_text,
    open_rgb,
    read_table,
    write_csv,
    write_json,
    write_table,
)
from components.labelstudio import (
    LOCAL_FILES_PREFIX,
    import_export,
    labeling_config,
    read_export,
)
from components.labelstudio import tasks as labelstudio_tasks
from components.ocr import Mapper, check_worker, fan_out

ACCURACY_FIELDS = ["background", "background_kind", "gradient_to", "layout", "figure_size",
                   "saturation", "logo"]  # the attributes the built-in generator records
LAYOUTS = ["centre", "left", "right", "top", "bottom"]
FIGURE_SIZES = ["none", "small", "medium", "large"]
FIGURE_SHARES = {"small": 0.09, "medium": 0.16, "large": 0.24}  # typical side / image side
KINDS = ["solid", "gradient", "texture"]


def label_system(params: Params) -> dict[str, list[str]]:
    """Every choice field and its allowed values: what the auto-labellers fill, manual
    labels may set, and Label Studio offers."""
    return {"background": list(params.brand.palette), "background_kind": KINDS,
            "gradient_to": [*params.brand.palette, "none"], "layout": LAYOUTS,
            "figure_size": FIGURE_SIZES, "saturation": list(params.labels.saturation_levels),
            "logo": ["yes", "no"]}


# ------------------------------------------------------------------ auto-labellers
WORK = 128  # side of the square the image-based labellers look at (also for 64 px images)
FIG_DIFF = 15  # lower for figures: soft shapes on a gradient differ little from it
INK_DIFF = 30  # ink: this far from the background...
INK_COS = 0.95  # ...in the direction of white or black (cosine of the angle)
LOGO_FULL = 120  # colour distance from the background at which a pixel is wholly logo


def scale_saturation(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """A colour at a saturation level (labels.saturation_levels: HSV saturation scales)."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    r, g, b = colorsys.hsv_to_rgb(h, s * factor, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _hsv(rgb: np.ndarray) -> tuple[float, float, float]:
    return colorsys.rgb_to_hsv(*(float(c) / 255 for c in rgb))


def _lch_hue(rgb: np.ndarray) -> float:
    """Hue angle (0..1) in CIE LCh: perceptual hue, so a muted red is still red."""
    lab = cv2.cvtColor(np.asarray(rgb, np.float32).reshape(1, 1, 3) / 255, cv2.COLOR_RGB2Lab)
    return (np.degrees(np.arctan2(lab[0, 0, 2], lab[0, 0, 1])) % 360) / 360


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def background_bands(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Median colour of thin bands along the top and bottom edges, which the
    generator keeps free of text, figures and logo."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    band = max(1, round(0.03 * a.shape[0]))
    return np.median(a[:band].reshape(-1, 3), 0), np.median(a[-band:].reshape(-1, 3), 0)


@functools.lru_cache(maxsize=256)
def _level_hue(rgb: tuple[int, int, int], factor: float) -> float:
    return _lch_hue(np.array(scale_saturation(rgb, factor)))


def nearest_colour(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]],
                   levels: list[float]) -> tuple[str, float]:
    """The palette colour nearest by perceptual hue at any of the saturation levels (a
    desaturated red drifts 11 degrees toward pink: compared with full red only, it sits
    near the red/pink boundary), and a confidence (0-1)."""
    hue = _lch_hue(rgb)
    dists = sorted((min(_hue_distance(hue, _level_hue(c, f)) for f in levels), name)
                   for name, c in palette.items())
    (d1, name), (d2, _) = dists[0], dists[1]
    return name, 1.0 - d1 / max(d1 + d2, 1e-9)


def label_background(img: Image.Image, brand: Brand, cfg: Labels) -> dict:
    """Background colour name (nearest palette colour by perceptual hue, at the top),
    solid / gradient / texture, the colour a gradient fades to (at the bottom; "none" for
    the others), saturation level."""
    top, bottom = background_bands(img)
    palette = brand.rgb()
    levels = list(cfg.saturation_levels.values())
    name, colour_conf = nearest_colour(top, palette, levels)
    a = np.asarray(img.convert("RGB").resize((WORK, WORK)), dtype=np.float32)
    band = max(1, round(0.03 * WORK))
    noise = float(np.mean([a[:band].std(axis=(0, 1)).mean(), a[-band:].std(axis=(0, 1)).mean()]))
    spread = float(np.linalg.norm(top - bottom))
    if noise > cfg.texture_threshold:  # busy edges: a photo or texture, not a flat colour
        kind, kind_conf = "texture", min(1.0, noise / cfg.texture_threshold - 1.0)
    else:
        kind = "gradient" if spread > cfg.gradient_threshold else "solid"
        kind_conf = min(1.0, abs(spread - cfg.gradient_threshold) / cfg.gradient_threshold)
    to, to_conf = (nearest_colour(bottom, palette, levels) if kind == "gradient"
                   else ("none", kind_conf))
    s = _hsv(top)[1]
    ref_s = _hsv(np.array(palette[name]))[1]
    ratio = s / max(ref_s, 1e-6)
    levels = sorted(cfg.saturation_levels.items(), key=lambda kv: abs(kv[1] - ratio))
    sat_name, sat_val = levels[0]
    gap = abs(levels[1][1] - sat_val) / 2 if len(levels) > 1 else 1.0
    sat_conf = max(0.0, 1.0 - abs(ratio - sat_val) / max(gap, 1e-6))
    return {"background": name, "background_conf": round(colour_conf, 4),
            "background_kind": kind, "background_kind_conf": round(kind_conf, 4),
            "gradient_to": to, "gradient_to_conf": round(to_conf, 4),
            "saturation": sat_name, "saturation_conf": round(sat_conf, 4)}


@dataclass
class Segmentation:
    """An image at WORK x WORK split into background (a top-to-bottom linear model from the
    edge bands), ink (text and marks: far from the background, toward white or black) and
    the rest."""
    rgb: np.ndarray
    residual: np.ndarray  # colour distance of each pixel from the background model
    ink: np.ndarray
    lighter: np.ndarray  # luminance minus the background model's (signed)


def segment(img: Image.Image) -> Segmentation:
    a = np.asarray(img.convert("RGB").resize((WORK, WORK), Image.Resampling.BILINEAR),
                   dtype=np.float32)
    band = max(1, round(0.03 * WORK))
    top, bottom = np.median(a[:band].reshape(-1, 3), 0), np.median(a[-band:].reshape(-1, 3), 0)
    t = np.linspace(0.0, 1.0, WORK, dtype=np.float32)[:, None, None]
    bg = top * (1 - t) + bottom * t
    diff = a - bg
    residual = np.sqrt((diff ** 2).sum(2))
    # Ink is achromatic: a pixel of it, blurred or not, mixes the background with white or
    # black, so it departs from the background *toward* white or black. Testing that
    # direction (not "is it near-white or near-black") keeps soft text ink on blurry small
    # images, and keeps the soft edges of a coloured figure out of it.
    toward = np.zeros_like(residual)
    for target in (255.0, 0.0):
        way = target - bg
        toward = np.maximum(toward, (diff * way).sum(2)
                            / (residual * np.sqrt((way ** 2).sum(2)) + 1e-6))
    ink = (residual > INK_DIFF) & (toward > INK_COS)
    lighter = diff @ np.array([0.299, 0.587, 0.114], np.float32)
    return Segmentation(a, residual, ink, lighter)


@functools.lru_cache(maxsize=8)
def logo_mask(path: str) -> Image.Image:
    """A logo file's opacity (alpha, or darkness for a file without alpha) as an L image."""
    try:
        with Image.open(path) as im:
            im.load()
            if "A" in im.getbands() or "transparency" in im.info:
                return im.convert("RGBA").getchannel("A")
            return Image.eval(im.convert("L"), lambda v: 255 - v)
    except OSError:
        raise UserError(f"brand.logos: cannot open logo {path!r}; point it at a PNG file "
                        "(transparent background)") from None


@functools.lru_cache(maxsize=64)
def _logo_template(path: str, side: int) -> np.ndarray:
    mask = np.asarray(logo_mask(path), dtype=np.float32) / 255
    return cv2.resize(mask, (side, side), interpolation=cv2.INTER_AREA)


def find_logo(seg: Segmentation, logos: list[str], threshold: float
              ) -> tuple[str, float, tuple[int, int, int] | None]:
    """Any of the logo files, at 8% to 30% of the image side, anywhere: normalised
    cross-correlation of its shape with how far each pixel departs from the background
    (a soft map, not a thresholded one: an 8-pixel logo on a blurry 64 px image is a
    ring of half-strength pixels; colour-blind, so a logo in any colour matches), and
    with how much lighter, or darker, each pixel is than the background: a one-colour
    mark with a soft glow of the other sign around it (as our U-Net draws it) matches
    there, where the glow counts as background, and not in the colour distance, where it
    counts as mark (0.45-0.60 vs 0.35-0.44 on such images; threshold 0.5).
    -> (yes/no, confidence, (x, y, side) of the best match)."""
    maps = [np.minimum(seg.residual / LOGO_FULL, 1.0).astype(np.float32),
            np.clip(seg.lighter / LOGO_FULL, 0.0, 1.0).astype(np.float32),
            np.clip(-seg.lighter / LOGO_FULL, 0.0, 1.0).astype(np.float32)]
    best, box = 0.0, None
    for fg, path in itertools.product(maps, logos):
        for share in np.linspace(0.08, 0.30, 12):
            side = int(round(share * WORK))
            r = cv2.matchTemplate(fg, _logo_template(path, side), cv2.TM_CCOEFF_NORMED)
            # a window of flat background has no shape to correlate (0/0)
            energy = cv2.boxFilter(fg * fg, -1, (side, side), anchor=(0, 0))
            r = np.where(energy[: r.shape[0], : r.shape[1]] > 0.02, np.nan_to_num(r), 0.0)
            _lo, score, _lo_at, at = cv2.minMaxLoc(r)
            if score > best:
                best, box = float(score), (at[0], at[1], side)
    found = best > threshold
    conf = min(1.0, abs(best - threshold) / (1 - threshold if found else threshold))
    return ("yes" if found else "no"), conf, box if found else None


def _block(mask: np.ndarray, box: tuple[int, int, int] | None, pad: int) -> np.ndarray:
    out = mask.copy()
    if box is not None:
        x, y, side = box
        out[max(0, y - pad) : y + side + pad, max(0, x - pad) : x + side + pad] = True
    return out


def layout_from_box(x0: float, y0: float, x1: float, y1: float) -> tuple[str, float]:
    """Where a block (coordinates as shares of the image) sits: compare the free margins on
    opposite sides (a left-aligned block has a small left and a large right margin)."""
    horiz = x0 - (1 - x1)  # < 0: more room on the right -> block sits left
    vert = y0 - (1 - y1)
    threshold = 0.15
    if abs(horiz) >= abs(vert) and abs(horiz) > threshold:
        return ("left" if horiz < 0 else "right"), min(1.0, abs(horiz) / 0.4)
    if abs(vert) > threshold:
        return ("top" if vert < 0 else "bottom"), min(1.0, abs(vert) / 0.4)
    return "centre", max(0.0, 1.0 - max(abs(horiz), abs(vert)) / threshold)


def label_figures(seg: Segmentation, logo_box: tuple[int, int, int] | None
                  ) -> tuple[str, float]:
    """Size class of the largest figure: solid shapes that differ from the background, are
    one colour, and keep clear of the text and the logo. -> (class, confidence)."""
    cand = cv2.morphologyEx((seg.residual > FIG_DIFF).astype(np.uint8), cv2.MORPH_OPEN,
                            np.ones((3, 3), np.uint8))
    near_ink = cv2.dilate(seg.ink.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    near = _block(near_ink, logo_box, 3)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(cand, connectivity=8)
    touching = set(np.unique(lab[near & (lab > 0)]).tolist())
    sides = []
    for k in range(1, n):
        if k in touching or stats[k, cv2.CC_STAT_AREA] < 30:
            continue
        colours = seg.rgb[lab == k]
        if np.mean(np.linalg.norm(colours - np.median(colours, 0), axis=1) < 20) < 0.5:
            continue  # many colours: text edges or noise, not a flat shape
        sides.append(max(stats[k, cv2.CC_STAT_WIDTH], stats[k, cv2.CC_STAT_HEIGHT]) / WORK)
    if not sides:
        return "none", 1.0
    side = max(sides)
    ranked = sorted(FIGURE_SHARES, key=lambda k: abs(FIGURE_SHARES[k] - side))
    d1, d2 = (abs(FIGURE_SHARES[k] - side) for k in ranked[:2])
    return ranked[0], round(1.0 - d1 / max(d1 + d2, 1e-9), 4)


def label_layout(seg: Segmentation, logo_box: tuple[int, int, int] | None,
                 words: list[dict], width: int, height: int) -> tuple[str, float]:
    """Where the text block sits: the extent of the ink that is not the logo; from the OCR
    word boxes when there is none."""
    text = cv2.morphologyEx((seg.ink & ~_block(np.zeros_like(seg.ink), logo_box, 2))
                            .astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) > 0
    if text.sum() >= 20:
        # letters merge into lines and lines into the block; a stray mark (an undetected
        # logo, a speck) stays a separate, smaller cluster
        merged = cv2.dilate(text.astype(np.uint8), np.ones((9, 9), np.uint8))
        n, lab, stats, _ = cv2.connectedComponentsWithStats(merged, connectivity=8)
        k = 1 + int(np.argmax([(text & (lab == i)).sum() for i in range(1, n)]))
        ys, xs = np.nonzero(text & (lab == k))
        return layout_from_box(xs.min() / WORK, ys.min() / WORK, (xs.max() + 1) / WORK,
                               (ys.max() + 1) / WORK)
    # one-character "words" are mostly shapes read as letters (a triangle as "A")
    words = [w for w in words if len(w["text"].strip()) > 1] or words
    if not words or width <= 0 or height <= 0:
        return "centre", 0.0
    boxes = [w["box"] for w in words]  # [left, top, width, height] in image pixels
    return layout_from_box(min(b[0] for b in boxes) / width, min(b[1] for b in boxes) / height,
                           max(b[0] + b[2] for b in boxes) / width,
                           max(b[1] + b[3] for b in boxes) / height)


def dominant_colours(img: Image.Image, k: int = 4) -> str:
    """The k main colours (scikit-learn k-means on a 32 x 32 thumbnail) with their shares,
    largest first, e.g. "#e63946 71%, #ffffff 18%, ..."."""
    from sklearn.cluster import KMeans

    px = np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.float32).reshape(-1, 3)
    k = min(k, len(np.unique(px, axis=0)))
    km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(px)
    shares = np.bincount(km.labels_, minlength=k) / len(px)
    order = np.argsort(-shares)
    return ", ".join("#{:02x}{:02x}{:02x} {:.0%}".format(*km.cluster_centers_[i].round()
                                                         .astype(int), shares[i])
                     for i in order)


def auto_labels(img: Image.Image, words: list[dict], brand: Brand, cfg: Labels) -> dict:
    """Every automatic field of one image with its confidence (evaluate calls this too)."""
    seg = segment(img)
    logo, logo_conf, logo_box = find_logo(seg, brand.logos, cfg.logo_threshold)
    figures, figures_conf = label_figures(seg, logo_box)
    layout, layout_conf = label_layout(seg, logo_box, words, *img.size)
    return {**label_background(img, brand, cfg),
            "layout": layout, "layout_conf": round(layout_conf, 4),
            "figure_size": figures, "figure_size_conf": figures_conf,
            "logo": logo, "logo_conf": round(logo_conf, 4)}


# ------------------------------------------------------------------ split and captions
def split_of(image_id: str, cfg: Labels) -> str:
    """Deterministic split from the content hash: an image never changes split."""
    u = int(image_id[:8], 16) / 0x1_0000_0000
    if u < cfg.split.train:
        return "train"
    return "val" if u < cfg.split.train + cfg.split.val else "test"


def caption(row: dict, template: str) -> str:
    """The template filled with a row's fields (text and description flattened to one line);
    an empty field leaves no double spaces."""
    values = {f: " ".join(str(row.get(f, "") or "").split()) for f in LABEL_FIELDS}
    return " ".join(template.format(**values).split()).removesuffix(" .").strip()


# ------------------------------------------------------------------ manual labels
def _file_names(manifest: pd.DataFrame) -> dict[str, str | None]:
    """File name -> image id, for labels keyed by file name: the stored name (<sha>.png) and
    the original name of a folder image (None where two images share it)."""
    names: dict[str, str | None] = {}
    for image_id, path, url in manifest[["id", "path", "source_url"]].itertuples(index=False):
        for name in {Path(path).name, Path(unquote(urlparse(url).path)).name}:
            if name:
                names[name] = image_id if names.get(name, image_id) == image_id else None
    return names


def _read_csv(path: Path, ids: set[str], names: dict[str, str | None],
              system: dict[str, list[str]]) -> tuple[list[dict], list[str]]:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    key = next((c for c in ("id", "file", "file_name", "filename") if c in df.columns), None)
    if key is None:
        return [], [f"{path}: no 'id' or 'file' column; file skipped (one row per image: id "
                    "or file name, then any label fields)"]
    known = set(system) | set(TEXT_FIELDS)
    problems = [f"{path}: unknown field '{c}' ignored; known: {', '.join(sorted(known))}"
                for c in df.columns if c != key and c not in known]
    rows = []
    for i, rec in enumerate(df.to_dict("records"), start=2):  # row 1 is the header
        ref = rec[key].strip()
        image_id = ref if ref in ids else names.get(Path(ref).name) if key != "id" else None
        if image_id is None:
            why = ("names two images; use the id" if names.get(Path(ref).name, "") is None
                   else "is not a known image")
            problems.append(f"{path}: row {i}: {key} {ref[:40]!r} {why}")
            continue
        row = {"id": image_id}
        for field, value in rec.items():
            value = value.strip() if field in system else value
            if field not in known or value == "":
                continue
            if field in system and value not in system[field]:
                problems.append(f"{path}: row {i}: {field}={value!r} is not one of "
                                f"{', '.join(system[field])}; cell ignored")
                continue
            row[field] = value
        rows.append(row)
    return rows, problems


def read_manual(manifest: pd.DataFrame, system: dict[str, list[str]]
                ) -> tuple[pd.DataFrame, list[str]]:
    """Every CSV and Label Studio JSON export under labels/manual/, in name order: one row
    per image with the fields it sets. Problems come back one line each (file, row, field);
    the rest of the file is still used; an image labelled twice keeps the later label."""
    ids, names = set(manifest["id"]), _file_names(manifest)
    merged: dict[str, dict] = {}
    where: dict[str, str] = {}
    problems: list[str] = []
    for path in sorted(Path(MANUAL_LABELS).glob("*")):
        if path.suffix == ".csv":
            rows, found = _read_csv(path, ids, names, system)
        elif path.suffix == ".json":  # a Label Studio export (tinyldm labels import)
            try:  # values the annotator accepted count too: a person checked them
                df, found = read_export(path, ids, system, include_unchanged=True)
            except UserError as e:
                problems.append(f"{e}; file skipped")
                continue
            rows = [{k: v for k, v in r.items() if v != ""} for r in df.to_dict("records")]
        else:
            continue
        problems += found
        for row in rows:
            if row["id"] in where:
                problems.append(f"{path}: image {row['id'][:16]} labelled again (before in "
                                f"{where[row['id']]}); where both set a field, this one wins")
            where[row["id"]] = path.name
            merged.setdefault(row["id"], {}).update(row)
    return pd.DataFrame(list(merged.values()), columns=["id", *system, *TEXT_FIELDS]), problems


def write_labelstudio(df: pd.DataFrame, system: dict[str, list[str]],
                      folder: Path = LS_TASKS.parent, image_url: str = LOCAL_FILES_PREFIX
                      ) -> tuple[Path, Path]:
    """The Label Studio project files: the labelling config and one task per image with the
    current labels as a prediction (to review rather than label from scratch)."""
    config, tasks_json = Path(folder) / LS_CONFIG.name, Path(folder) / LS_TASKS.name
    atomic_write_text(config, labeling_config(system))
    write_json(tasks_json, labelstudio_tasks(df.to_dict("records"), system, image_url))
    return config, tasks_json


# ------------------------------------------------------------------ the stage
@dataclass(frozen=True)
class LabelJob:
    """All a worker needs besides the images: plain, picklable settings."""
    brand: Brand  # logo paths absolute, so a worker in another folder finds them
    labels: Labels
    root: str  # the repository folder; image paths are relative to it


def _item(rec: dict, ocr: pd.DataFrame) -> dict:
    """One image's work item: its path and OCR reading, as plain data."""
    o = ocr.loc[rec["id"]] if rec["id"] in ocr.index else None
    return {"id": rec["id"], "path": rec["path"],
            "words": str(o["words"] or "") if o is not None else "",
            "text": str(o["text"]) if o is not None else "",
            "text_conf": round(float(o["mean_conf"]) / 100, 4) if o is not None else 0.0}


def _label_one(item: dict, job: LabelJob) -> dict:
    words = json.loads(item["words"]) if item["words"] else []
    im = open_rgb(Path(job.root) / item["path"])
    row = auto_labels(im, words, job.brand, job.labels)
    row["dominant_colours"] = dominant_colours(im)
    row = {"id": item["id"], "path": item["path"], **row, "text": item["text"],
           "text_conf": item["text_conf"], "description": "", "description_conf": 0.0,
           "split": split_of(item["id"], job.labels)}
    for f in LABEL_FIELDS:
        row[f"{f}_provenance"] = {"text": "ocr", "description": "none"}.get(f, "auto")
    return row


def label_chunk(job: LabelJob, items: list[dict]) -> list[dict]:
    """Auto-label a chunk of images wherever it runs (a thread here, a process, a Dask
    worker)."""
    check_worker(job.root)
    return [_label_one(item, job) for item in items]


def apply_manual(df: pd.DataFrame, manual: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """Manual values over auto ones (provenance manual, confidence 1); also returns where a
    manual label overrules a confident (>= 0.9) auto label: often a labelling mistake."""
    disagreements = []
    df = df.set_index("id")
    for rec in manual.to_dict("records"):
        for field, value in rec.items():
            if field == "id" or pd.isna(value) or value == "":
                continue
            auto, conf = df.at[rec["id"], field], df.at[rec["id"], f"{field}_conf"]
            if field not in TEXT_FIELDS and auto != value and conf >= 0.9:
                disagreements.append({"id": rec["id"], "field": field, "manual": value,
                                      "auto": auto, "auto_conf": conf})
            df.at[rec["id"], field] = value
            df.at[rec["id"], f"{field}_provenance"] = "manual"
            df.at[rec["id"], f"{field}_conf"] = 1.0
    return df.reset_index(), disagreements


def token_counts(params: Params, captions: list[str]) -> tuple[list[int], int | None]:
    """Caption lengths in the chosen text encoder's own tokens, and its limit (tfidf has
    none: words are counted)."""
    if params.text_encoder.name == "tfidf":
        return [len(c.split()) for c in captions], None
    from components.text_encoders import get_encoder

    enc = get_encoder(params.text_encoder)
    return (enc.count_tokens(captions) if captions else []), enc.max_tokens


def labels(params: Params, mapper: Mapper | None = None) -> dict:
    """Auto labels, manual labels over them, captions, split, Label Studio tasks. `mapper`
    fans the images out (flows/fanout.py); None: this process's thread pool."""
    cfg = params.labels
    manifest = read_table(VALID_MANIFEST, "validated_manifest")
    ocr = read_table(OCR_TABLE, "ocr").set_index("id")
    if manifest.empty:
        raise UserError(f"{VALID_MANIFEST}: no valid images to label")
    items = [_item(r, ocr) for r in manifest.to_dict("records")]
    root = Path.cwd()
    brand = params.brand.model_copy(update={"logos": [str(root / p)
                                                      for p in params.brand.logos]})
    job = LabelJob(brand, cfg, str(root))
    threads = os.cpu_count() or 1  # OpenCV and numpy free the GIL
    rows = fan_out(functools.partial(label_chunk, job), items, mapper,
                   params.scale.chunk_size, threads, "labels")
    df = pd.DataFrame(rows)

    system = label_system(params)
    manual, problems = read_manual(manifest, system)
    df, disagreements = apply_manual(df, manual)
    df["caption"] = [caption(r, cfg.caption_template) for r in df.to_dict("records")]
    df["caption_tokens"], limit = token_counts(params, df["caption"].tolist())
    over = df[df["caption_tokens"] > limit] if limit else df.iloc[:0]
    policy = params.text_encoder.policy
    if len(over) and policy == "error":
        raise UserError(f"labels: {len(over)} caption(s) are over the text encoder's "
                        f"{limit}-token limit (e.g. image {over['id'].iloc[0][:16]}: "
                        f"{over['caption_tokens'].iloc[0]} tokens); shorten the template or "
                        "descriptions, or set text_encoder.policy to truncate or chunk")
    write_table(df[SCHEMAS["captions"].names], CAPTIONS, "captions")
    # apart, so an edited label or caption does not retrain the VAE (it only needs the split)
    write_table(df[SCHEMAS["split"].names], SPLIT, "split")
    write_csv(DISAGREEMENTS, ["id", "field", "manual", "auto", "auto_conf"],
              [tuple(d.values()) for d in disagreements])
    write_labelstudio(df, system)

    metrics: dict = {"images": len(df), "manual_images": len(manual),
                     "manual_problems": len(problems),
                     "manual_disagreements": len(disagreements),
                     "captions_over_limit": len(over),
                     "captions_over_limit_share": round(len(over) / len(df), 4),
                     "caption_tokens_max": int(df["caption_tokens"].max()),
                     "caption_tokens_mean": round(float(df["caption_tokens"].mean()), 1),
                     **{f"split_{s}": int((df["split"] == s).sum())
                        for s in ("train", "val", "test")}}
    if len(over):
        print(f"labels: {len(over)} caption(s) ({len(over) / len(df):.1%}) over the "
              f"{limit}-token limit; policy {policy}")
    metrics |= accuracy(df)
    for line in problems:
        print(f"labels: {line}")
    if disagreements:
        print(f"labels: {len(disagreements)} manual label(s) overrule a confident auto label; "
              f"listed in {DISAGREEMENTS}")
    return metrics


def accuracy(df: pd.DataFrame) -> dict[str, float]:
    """Per attribute, the share of auto labels equal to the generator's ground truth."""
    if not Path(GROUND_TRUTH).exists():
        return {}
    gt = read_table(GROUND_TRUTH, "ground_truth").set_index("id")
    gt["logo"] = gt["logo"].map({True: "yes", False: "no"})
    gt["gradient_to"] = gt["gradient_to"].replace("", "none")
    both = df[df["id"].isin(gt.index)].set_index("id")
    if both.empty:
        return {}
    return {f"accuracy_{f}": round(float((both[f] == gt.loc[both.index, f]).mean()), 4)
            for f in ACCURACY_FIELDS}


# ------------------------------------------------------------------ CLI: labels ...
def export(params: Params, folder: Path, image_url: str) -> tuple[Path, Path, int]:
    """The Label Studio project files for the current labels, into `folder`."""
    df = read_table(CAPTIONS, "captions")
    config, tasks_json = write_labelstudio(df, label_system(params), Path(folder), image_url)
    return config, tasks_json, len(df)


def import_labels(params: Params, src: Path) -> tuple[Path, int, list[str]]:
    """A Label Studio export -> labels/manual/ (checked first; the labels stage merges it)."""
    known = (set(read_table(VALID_MANIFEST, "validated_manifest")["id"])
             if Path(VALID_MANIFEST).exists() else None)
    return import_export(Path(src), Path(MANUAL_LABELS), known, label_system(params))


def stats(params: Params) -> str:
    """Coverage of every field by source, caption lengths in tokens, split sizes."""
    df = read_table(CAPTIONS, "captions")
    lines = [f"{len(df)} images; split: " + ", ".join(
        f"{k} {v}" for k, v in df["split"].value_counts().items())]
    lines.append(f"{'field':<16} {'manual':>7} {'auto':>7} {'ocr':>7} {'empty':>7}  "
                 "mean confidence (auto)")
    for f in LABEL_FIELDS:
        prov = df[f"{f}_provenance"].value_counts()
        empty = int((df[f].fillna("") == "").sum())
        auto = df.loc[df[f"{f}_provenance"] == "auto", f"{f}_conf"]
        conf = f"{auto.mean():.3f}" if len(auto) else "-"
        lines.append(f"{f:<16} {prov.get('manual', 0):>7} {prov.get('auto', 0):>7} "
                     f"{prov.get('ocr', 0):>7} {empty:>7}  {conf}")
    _, limit = token_counts(params, [])
    tokens = df["caption_tokens"]
    edges = np.histogram_bin_edges(tokens, bins=min(8, max(1, tokens.nunique())))
    counts, edges = np.histogram(tokens, bins=edges)
    lines.append(f"caption tokens (limit {limit or 'none'}; over: "
                 f"{int((tokens > limit).sum()) if limit else 0}):")
    width = max(counts.max(), 1)
    for c, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        lines.append(f"  {lo:5.0f}-{hi:<5.0f} {c:6d} {'#' * round(40 * c / width)}")
    return "\n".join(lines)
