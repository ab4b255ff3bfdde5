"""Read the text on every image with Tesseract, so captions can quote it.

Tesseract runs as a subprocess per image; a thread pool therefore parallelises it, and
OMP_THREAD_LIMIT=1 stops each process from spawning its own OpenMP threads (which only
fight each other on a small box). Results are cached per (image bytes, engine version,
settings), so a re-run OCRs only new or changed images. A failure on one image (timeout,
Tesseract error, undecodable file) is recorded in its `error` column; the run goes on.

Per-image work fans out through a mapper (see "fan-out"): by default this process's thread
pool; flows/fanout.py plugs in Prefect task runners (processes, Dask) from params.scale.
Workers get plain settings and image paths and return plain data; the cache is read and
written here only, so a worker needs no write access and a cache hit never leaves this box.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median

import numpy as np
import pandas as pd
import pytesseract
from PIL import Image, ImageFilter, ImageOps
from rapidfuzz.distance import Levenshtein

from components.config import Ocr, Params
from components.contracts import (
    GROUND_TRUTH,
    OCR_TABLE,
    RAW_MANIFEST,
    SCHEMAS,
    UserError,
    atomic_write_text,
    open_rgb,
    read_table,
    settings_hash,
    sha256_bytes,
    to_rgb,
    write_table,
)
from components.fanout import Mapper, check_worker, fan_out
from components.ingest.text_blocks import holds_a_word, inside, letters, text_blocks
from components.labelling.labeller import busy_share

CACHE = Path(".cache") / "ocr"
# How read_words turns Tesseract's output into a reading; bump it when that logic changes,
# so cached readings of the old logic are not served as new ones.
READER = 4  # 2: poor or large-type readings read again, the best kept; 3: busy images
# also read median-filtered, unread text blocks read alone; 4: lone mark-like lines dropped
DENOISE_BUSY = 0.03  # busy_share of the edges above which ocr.denoise applies (a texture)

# Knobs that change what Tesseract reads; workers/timeout only change how fast.
OUTPUT_SETTINGS = {"lang", "psm", "min_conf", "upscale_below", "invert_dark", "autocontrast",
                   "denoise", "oem", "binarize", "flatten", "remove_shapes", "max_height_ratio",
                   "retry_below_conf", "large_type_side"}


# ------------------------------------------------------------------ scoring
def normalise(text: str) -> str:
    """Collapse all whitespace (line breaks included) to single spaces."""
    return " ".join(text.split())


def cer(pred: str, truth: str) -> float:
    """Character error rate: Levenshtein distance / len(truth), whitespace-normalised,
    case-sensitive. An empty truth scores 0 for an empty prediction, else 1."""
    p, t = normalise(pred), normalise(truth)
    if not t:
        return 0.0 if not p else 1.0
    return Levenshtein.distance(p, t) / len(t)


# ------------------------------------------------------------------ engine
def engine_version() -> str:
    try:
        return str(pytesseract.get_tesseract_version())
    except (pytesseract.TesseractNotFoundError, OSError):
        raise UserError("tesseract not found: install it (apt-get install tesseract-ocr) "
                        "or run make run, which installs it") from None


_omp_lock = threading.Lock()
_omp_users = 0
_omp_saved: str | None = None


@contextlib.contextmanager
def _single_threaded_tesseract() -> Iterator[None]:
    """pytesseract hands os.environ to every subprocess; set the limit while OCR runs only.
    Counted, because chunks overlap in the threads of one process (a Dask worker's too)."""
    global _omp_users, _omp_saved
    with _omp_lock:
        if _omp_users == 0:
            _omp_saved = os.environ.get("OMP_THREAD_LIMIT")
            os.environ["OMP_THREAD_LIMIT"] = "1"
        _omp_users += 1
    try:
        yield
    finally:
        with _omp_lock:
            _omp_users -= 1
            if _omp_users == 0:
                if _omp_saved is None:
                    os.environ.pop("OMP_THREAD_LIMIT", None)
                else:
                    os.environ["OMP_THREAD_LIMIT"] = _omp_saved


def _otsu(grey: np.ndarray) -> int:
    hist = np.bincount(grey.ravel(), minlength=256).astype(float)
    levels = np.arange(256)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0 / w0 - (m0[-1] - m0) / w1) ** 2 * w0 * w1
    return int(np.nanargmax(between))


def light_text_likely(rgb: np.ndarray) -> bool:
    """Designers pick the text colour with more contrast against the background: white
    text wins (WCAG contrast) when the background's relative luminance is below ~0.18."""
    bg = np.median(rgb.reshape(-1, 3), axis=0) / 255
    lin = np.where(bg <= 0.03928, bg / 12.92, ((bg + 0.055) / 1.055) ** 2.4)
    lum = float(lin @ [0.2126, 0.7152, 0.0722])
    return 1.05 / (lum + 0.05) > (lum + 0.05) / 0.05


def _clean(grey: Image.Image, cfg: Ocr) -> Image.Image:
    """Flatten the background per row (gradients, either text polarity) and/or paint over
    solid shapes thicker than text strokes (Tesseract reads a filled triangle as "A")."""
    a = np.asarray(grey).astype(np.int32)
    bg = np.median(a, axis=1, keepdims=True).astype(np.int32)
    diff = np.abs(a - bg)
    if cfg.flatten:  # text is darker than its background now; anything lighter is not text
        dark = np.clip(bg - a, 0, 255)
        a = 255 - dark * 255 // max(int(dark.max()), 1)
        bg = np.full_like(bg, 255)
    if cfg.remove_shapes:
        k = max(3, round(cfg.remove_shapes * min(grey.size)) | 1)
        fg = Image.fromarray(np.where(diff > 32, 255, 0).astype(np.uint8))
        solid = fg.filter(ImageFilter.MinFilter(k)).filter(ImageFilter.MaxFilter(k))
        solid = np.asarray(solid.filter(ImageFilter.MaxFilter(k))) > 0
        a = np.where(solid, np.broadcast_to(bg, a.shape), a)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def _denoised(rgb: Image.Image, cfg: Ocr) -> Image.Image | None:
    """ocr.denoise's median filter where the edges are busy (halftone, grain, a photo; or
    large type reaching them); None where they are not. read_words reads a busy image
    both ways and keeps the raw reading only where it is confident (ocr.retry_below_conf)
    and more so than the filtered one: the filter also thins small letters."""
    if cfg.denoise and busy_share(rgb) > DENOISE_BUSY:
        return rgb.filter(ImageFilter.MedianFilter(cfg.denoise))
    return None


def preprocess(im: Image.Image, cfg: Ocr) -> tuple[Image.Image, float]:
    """Greyscale, dark text on light, contrast stretched, upscaled; returns (image, scale)."""
    rgb = to_rgb(im)
    grey = rgb.convert("L")
    if cfg.invert_dark and light_text_likely(np.asarray(rgb)):
        grey = ImageOps.invert(grey)
    if cfg.flatten or cfg.remove_shapes:
        grey = _clean(grey, cfg)
    if cfg.autocontrast:
        grey = ImageOps.autocontrast(grey, cutoff=1)
    if cfg.binarize:
        a = np.asarray(grey)
        grey = Image.fromarray(np.where(a > _otsu(a), 255, 0).astype(np.uint8))
    scale = 1.0
    short = min(grey.size)
    if cfg.upscale_below and short < cfg.upscale_below:
        scale = cfg.upscale_below / short
        grey = grey.resize((round(grey.width * scale), round(grey.height * scale)),
                           Image.Resampling.LANCZOS)
    return grey, scale


def drop_tall_singles(words: list[dict], ratio: float) -> list[dict]:
    """Drop one-character words much taller than the real words around them: filled
    triangles and ring logos come back from Tesseract as a confident "A" or "O"."""
    heights = [w["box"][3] for w in words if len(w["text"]) > 1]
    if not ratio or not heights:
        return words
    limit = ratio * median(heights)
    return [w for w in words if len(w["text"]) > 1 or w["box"][3] <= limit]


def _mark_like(text: str) -> bool:
    """One letter, or one letter twice in both cases ("oO"): how Tesseract reads a ring,
    a dot or a triangle; no word of a text is written so ("US", "OO" are)."""
    return text.isalpha() and (len(text) == 1 or (
        len(text) == 2 and text[0].lower() == text[1].lower() and text[0] != text[1]))


def drop_lone_marks(words: list[dict]) -> list[dict]:
    """Drop a line that is one mark-like word (_mark_like) beside real words: a logo's ring
    or triangle read as "oO", "O", "A" at text height (taller ones: drop_tall_singles)."""
    lines: dict[tuple, list[dict]] = {}
    for w in words:
        lines.setdefault(tuple(w["line"]), []).append(w)
    if not any(len(w["text"]) > 2 for w in words):
        return words
    lone = {k for k, ws in lines.items() if len(ws) == 1 and _mark_like(ws[0]["text"])}
    return [w for w in words if tuple(w["line"]) not in lone]


def _tesseract(prepared: Image.Image, scale: float, cfg: Ocr, psm: int) -> list[dict]:
    """One Tesseract pass -> its kept words, boxes in original pixels."""
    data = pytesseract.image_to_data(
        prepared, lang=cfg.lang, config=f"--psm {psm} --oem {cfg.oem}",
        output_type=pytesseract.Output.DICT, timeout=cfg.timeout_s)
    words = []
    for i, raw in enumerate(data["text"]):
        word, conf = str(raw).strip(), float(data["conf"][i])
        # a word without a letter or digit is a shape read as a glyph (logo ring -> "©")
        if conf < cfg.min_conf or not any(c.isalnum() for c in word):
            continue
        box = [round(data[k][i] / scale) for k in ("left", "top", "width", "height")]
        line = [data["block_num"][i], data["par_num"][i], data["line_num"][i]]
        words.append({"text": word, "conf": round(conf, 2), "box": box, "line": line})
    return drop_lone_marks(drop_tall_singles(words, cfg.max_height_ratio))


def _mean_conf(words: list[dict]) -> float:
    return mean(w["conf"] for w in words) if words else 0.0


def _confident_letters(words: list[dict]) -> float:
    """How a reading ranks: its letters, each weighted by its word's confidence squared
    (a whole text read at 90 beats one of its words read at 95 and a page of noise read
    at 50)."""
    return sum(len(w["text"]) * (w["conf"] / 100) ** 2 for w in words)


BLOCK_SIDE = 150  # a block read alone is upscaled to at least this short side
WORD_PX = 40  # word height (pixels) Tesseract reads best; large type is shrunk to it


def _alternatives(im: Image.Image, cfg: Ocr, prepared: Image.Image, scale: float,
                  words: list[dict]) -> Iterator[tuple[Image.Image, float, int]]:
    """Other ways to read an image the first pass read badly or found large type in:
    shrunk so its words are WORD_PX high (Tesseract misses letters far taller), shrunk to
    ocr.large_type_side when it found nothing to measure, the other text polarity, and
    the background flattened row by row, and sparse-text segmentation (psm 11)."""
    grey, _ = preprocess(im, cfg.model_copy(update={"upscale_below": 0}))
    sizes = []
    if words:
        sizes.append(WORD_PX / median(w["box"][3] for w in words))
    if cfg.large_type_side:
        sizes.append(cfg.large_type_side / min(grey.size))
    for small in sizes:
        if small < 0.8 * scale:
            yield grey.resize((max(1, round(grey.width * small)),
                               max(1, round(grey.height * small))),
                              Image.Resampling.LANCZOS), small, cfg.psm
    yield ImageOps.invert(prepared), scale, cfg.psm
    if not cfg.flatten:  # a gradient Tesseract's one threshold cuts through
        yield preprocess(im, cfg.model_copy(update={"flatten": True}))[0], scale, cfg.psm
    if cfg.psm != 11:
        yield prepared, scale, 11


CONF_SLACK = 3.0  # a reading may be this much less confident (mean) and still win


def _better(other: list[dict], words: list[dict]) -> bool:
    """More confident letters, without a lower mean confidence (beyond CONF_SLACK): more
    of the text read, not the same text plus shapes read as words."""
    if not words:
        return bool(other)
    return (_confident_letters(other) > _confident_letters(words)
            and _mean_conf(other) >= _mean_conf(words) - CONF_SLACK)


def _large_type(words: list[dict], scale: float) -> bool:
    """Words over twice WORD_PX high in the image Tesseract read."""
    return any(w["box"][3] * scale > 2 * WORD_PX for w in words)


def _read_blocks(rgb: Image.Image, cfg: Ocr, blocks: list[tuple[int, int, int, int]]
                 ) -> list[dict]:
    """Each block read alone (its own polarity and scale), boxes in the image's pixels;
    blocks in reading order, top to bottom."""
    alone = cfg.model_copy(update={"upscale_below": BLOCK_SIDE})
    words = []
    for i, block in enumerate(blocks):
        x0, y0, x1, y1 = inside(rgb, block)
        prepared, scale = preprocess(rgb.crop((x0, y0, x1, y1)), alone)
        read = _tesseract(prepared, scale, cfg, cfg.psm)
        if sum(c.isalnum() for w in read for c in w["text"]) < 2:
            continue  # a shape read as a glyph (a ring as "O", a triangle as "A")
        for word in read:
            word["box"] = [word["box"][0] + x0, word["box"][1] + y0, *word["box"][2:]]
            word["line"] = [i, *word["line"]]
            words.append(word)
    return words


def read_words(im: Image.Image, cfg: Ocr) -> dict:
    """OCR one decoded image -> {text, mean_conf, n_words, words}; boxes in original pixels.
    A busy image is also read median-filtered (_denoised). A first reading under
    ocr.retry_below_conf mean confidence (or none), or of large type, is read again the
    `_alternatives` ways; text blocks holding letters but no word of the reading (a card,
    a footer) are read alone. The most confident reading is kept each time."""
    rgb = to_rgb(im)
    prepared, scale = preprocess(rgb, cfg)
    words = _tesseract(prepared, scale, cfg, cfg.psm)
    smooth = _denoised(rgb, cfg)
    if smooth is not None:  # texture (its grain read as letters) or large type
        smooth_prepared, _ = preprocess(smooth, cfg)
        other = _tesseract(smooth_prepared, scale, cfg, cfg.psm)
        if _mean_conf(other) >= _mean_conf(words) or _mean_conf(words) < cfg.retry_below_conf:
            rgb, prepared, words = smooth, smooth_prepared, other
    if not cfg.retry_below_conf:
        return _reading(words)
    if _mean_conf(words) < cfg.retry_below_conf or _large_type(words, scale):
        for alt, alt_scale, psm in _alternatives(rgb, cfg, prepared, scale, words):
            other = _tesseract(alt, alt_scale, cfg, psm)
            if _better(other, words):
                words = other
    blocks = [b for b in text_blocks(rgb) if letters(rgb.crop(b)) >= 3]
    if any(not holds_a_word(b, words) for b in blocks):  # a card or a line unread
        other = _read_blocks(rgb, cfg, blocks)
        if _better(other, words):
            words = other
    return _reading(words)


def _reading(words: list[dict]) -> dict:
    lines: dict[tuple[int, ...], list[str]] = {}
    for w in words:
        lines.setdefault(tuple(w["line"]), []).append(w["text"])
    return {"text": "\n".join(" ".join(ws) for ws in lines.values()),  # Tesseract's order
            "mean_conf": round(_mean_conf(words), 2),
            "n_words": len(words), "words": json.dumps(words)}


def read_many(images: list[Image.Image], cfg: Ocr) -> list[dict]:
    """OCR decoded images in parallel, uncached: read_words of each."""
    workers = cfg.workers or os.cpu_count() or 1
    with _single_threaded_tesseract(), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda im: read_words(im, cfg), images))


def read_texts(images: list[Image.Image], cfg: Ocr) -> list[str]:
    """The text alone of each image (evaluate reads generated images)."""
    return [r["text"] for r in read_many(images, cfg)]


@dataclass(frozen=True)
class OcrJob:
    """All a worker needs besides the image paths: plain, picklable settings."""
    cfg: Ocr
    engine_version: str  # what the driver recorded (and keyed the cache with)
    root: str  # the repository folder; image paths are relative to it


def _read_file(path: Path, cfg: Ocr) -> dict:
    """OCR one image file -> read_words' result, or {"error": ...}; never raises for a bad
    image (a missing Tesseract is no bad image)."""
    try:
        return read_words(open_rgb(path), cfg)
    except RuntimeError as e:  # pytesseract's timeout
        msg = f"timeout after {cfg.timeout_s:g} s" if "timeout" in str(e).lower() else str(e)
        return {"error": msg}
    except pytesseract.TesseractNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - one bad image must not stop the run
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}


def ocr_chunk(job: OcrJob, rows: list[dict]) -> list[dict]:
    """OCR a chunk of images wherever it runs (a thread here, a process, a Dask worker)."""
    check_worker(job.root)
    try:
        here = f"Tesseract {pytesseract.get_tesseract_version(cached=True)}"
    except (pytesseract.TesseractNotFoundError, OSError):
        here = "no Tesseract"
    if here != f"Tesseract {job.engine_version}":
        raise UserError(f"worker {socket.gethostname()} has {here}, this machine Tesseract "
                        f"{job.engine_version}: install that version on every worker "
                        "(results are cached by engine version)")
    with _single_threaded_tesseract():
        return [_read_file(Path(job.root) / r["path"], job.cfg) for r in rows]


# ------------------------------------------------------------------ cache
def _cache_file(image_id: str, version: str, shash: str) -> Path:
    key = sha256_bytes(f"{image_id}|{version}|{shash}".encode())
    return CACHE / key[:2] / f"{key}.json"


def _cached(path: Path) -> dict | None:
    if path.exists():
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
    return None


# ------------------------------------------------------------------ stage
def _ground_truth() -> dict[str, str]:
    if not GROUND_TRUTH.exists():
        return {}
    gt = read_table(GROUND_TRUTH, "ground_truth")
    return dict(zip(gt["id"], gt["text"], strict=True))


def ocr(params: Params, mapper: Mapper | None = None) -> dict:
    """OCR every image of the raw manifest (cache misses only) -> data/ocr/ocr.parquet.
    `mapper` fans the images out (flows/fanout.py); None: this process's thread pool."""
    cfg = params.ocr
    version = engine_version()
    manifest = read_table(RAW_MANIFEST, "raw_manifest")
    shash = settings_hash({**cfg.model_dump(include=OUTPUT_SETTINGS), "reader": READER})
    workers = cfg.workers or os.cpu_count() or 1
    rows = manifest[["id", "path", "format"]].to_dict("records")
    start = time.perf_counter()
    done: list[tuple[dict, bool]] = []
    todo: list[int] = []  # indices into done of the images to OCR
    for row in rows:  # cache and non-images here: only real work leaves this process
        out = {"id": row["id"], "text": "", "mean_conf": 0.0, "n_words": 0, "words": "[]",
               "engine_version": version, "settings_hash": shash, "error": ""}
        hit = _cached(_cache_file(row["id"], version, shash)) if row["format"] else None
        if not row["format"]:
            out["error"] = "not an image"
        elif hit is None:
            todo.append(len(done))
        done.append(({**out, **(hit or {})}, hit is not None))
    job = OcrJob(cfg, version, str(Path.cwd()))
    with _single_threaded_tesseract():
        results = fan_out(functools.partial(ocr_chunk, job), [rows[i] for i in todo],
                          mapper, params.scale.chunk_size, workers, "ocr")
    for i, result in zip(todo, results, strict=True):
        if not result.get("error"):
            cached = _cache_file(rows[i]["id"], version, shash)
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cached, json.dumps(result))
        done[i] = ({**done[i][0], **result}, False)
    seconds = time.perf_counter() - start
    table = pd.DataFrame([r for r, _hit in done], columns=SCHEMAS["ocr"].names)
    write_table(table, OCR_TABLE, "ocr")

    metrics: dict = {"images": len(table), "ocr_errors": int((table["error"] != "").sum()),
                     "cache_hits": sum(hit for _r, hit in done), "seconds": round(seconds, 2),
                     "images_per_s": round(len(table) / seconds, 2) if seconds else 0.0,
                     "engine_version": version, "task_runner": params.scale.task_runner,
                     "workers": workers if mapper is None else getattr(mapper, "workers", 0)}
    truth = _ground_truth()
    scored = [(cer(r["text"], truth[r["id"]]), normalise(r["text"]) == normalise(truth[r["id"]]))
              for r, _hit in done if r["id"] in truth]
    if scored:
        metrics |= {"cer": round(mean(c for c, _ in scored), 4),
                    "cer_median": round(median(c for c, _ in scored), 4),
                    "exact_match": round(mean(m for _, m in scored), 4)}
    return metrics
