"""The auto-labellers: plain functions of an image (and its OCR words), so evaluate runs the
very same ones on generated images to measure prompt adherence.

The image-based ones share one segmentation: a background model from the edge bands, "ink"
(text and logo: marks that depart from it toward white or black, blurred or not) and flat
one-colour figures. Each field comes with a confidence."""

from __future__ import annotations

import colorsys
import functools
import itertools
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from components.config import Brand, Labels, Params
from components.contracts import (
    UserError,
)

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


WORK = 128  # side of the square the image-based labellers look at (also for 64 px images)
FIG_DIFF = 15  # lower for figures: soft shapes on a gradient differ little from it
INK_DIFF = 30  # ink: this far from the background...
INK_COS = 0.95  # ...in the direction of white or black (cosine of the angle)
INK_CHROMA = 40  # ...and at most this much more colourful (max - min of RGB) than it
LOGO_FULL = 120  # colour distance from the background at which a pixel is wholly logo
CLEAR_SPACE = 0.25  # the logo's clear space: a band this share of its side around it...
CROWDED = 0.08  # ...of which at most this share may be marked
HOLE_FILL = 0.5  # a logo's holes at most this share as marked as the mark itself


def scale_saturation(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """A colour at a saturation level (labels.saturation_levels: HSV saturation scales)."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    r, g, b = colorsys.hsv_to_rgb(h, s * factor, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _hsv(rgb: np.ndarray) -> tuple[float, float, float]:
    return colorsys.rgb_to_hsv(*(float(c) / 255 for c in rgb))


def _lch(rgb: np.ndarray) -> tuple[float, float, float]:
    """CIE LCh: lightness (0-100), chroma, hue angle (0..1): perceptual hue, so a muted
    red is still red."""
    lab = cv2.cvtColor(np.asarray(rgb, np.float32).reshape(1, 1, 3) / 255, cv2.COLOR_RGB2Lab)
    lightness, a, b = (float(v) for v in lab[0, 0])
    return lightness, float(np.hypot(a, b)), (np.degrees(np.arctan2(b, a)) % 360) / 360


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
    return _lch(np.array(scale_saturation(rgb, factor)))[2]


BUSY = 12.0  # colour distance from its row's median at which an edge pixel is busy
ACHROMATIC = 10.0  # a palette colour with less LCh chroma than this is a grey (black, white)


def _greys(palette: dict[str, tuple[int, int, int]], levels: list[float]
           ) -> tuple[dict[str, float], float]:
    """The palette's greys (name: lightness) and the chroma under which a pixel is grey:
    halfway between the greys' chroma and the least coloured colour at any level."""
    return _greys_of(tuple(palette.items()), tuple(levels))


@functools.lru_cache(maxsize=16)
def _greys_of(palette: tuple, levels: tuple) -> tuple[dict[str, float], float]:
    lch = {n: _lch(np.array(c)) for n, c in palette}
    greys = {n: v[0] for n, v in lch.items() if v[1] < ACHROMATIC}
    if not greys or len(greys) == len(lch):  # none, or nothing else: hue decides
        return {}, 0.0
    least = min(_lch(np.array(scale_saturation(c, f)))[1] for n, c in palette
                if n not in greys for f in levels)
    return greys, (max(lch[n][1] for n in greys) + least) / 2


def nearest_colour(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]],
                   levels: list[float]) -> tuple[str, float]:
    """The palette colour nearest by perceptual hue at any of the saturation levels (a
    desaturated red drifts 11 degrees toward pink: compared with full red only, it sits
    near the red/pink boundary), and a confidence (0-1). A palette with greys (black,
    white) gives a grey pixel the grey nearest in lightness, a coloured one a colour."""
    lightness, chroma, hue = _lch(rgb)
    greys, grey_below = _greys(palette, levels)
    if chroma < grey_below:
        dists = sorted((abs(lightness - v) / 100, n) for n, v in greys.items())
    else:
        dists = sorted((min(_hue_distance(hue, _level_hue(c, f)) for f in levels), name)
                       for name, c in palette.items() if name not in greys)
    if len(dists) == 1:
        return dists[0][1], 1.0
    (d1, name), (d2, _) = dists[0], dists[1]
    return name, 1.0 - d1 / max(d1 + d2, 1e-9)


def busy_share(img: Image.Image) -> float:
    """Share of the edge bands' pixels (at the image's own size) more than BUSY in colour
    from their row's median: 0 on a flat colour or a top-to-bottom gradient, a few % where
    a shape reaches the edge, most of a photo, grain or halftone."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    band = max(1, round(0.03 * a.shape[0]))
    rows = np.concatenate([a[:band], a[-band:]])
    return float((np.linalg.norm(rows - np.median(rows, axis=1, keepdims=True), axis=2)
                  > BUSY).mean())


def _texture_share(img: Image.Image, cfg: Labels) -> float:
    return cfg.texture_share_small if min(img.size) < WORK else cfg.texture_share


def label_background(img: Image.Image, brand: Brand, cfg: Labels,
                     busy: float | None = None) -> dict:
    """Background colour name (nearest palette colour by perceptual hue, at the top),
    solid / gradient / texture, the colour a gradient fades to (at the bottom; "none" for
    the others), saturation level."""
    top, bottom = background_bands(img)
    palette = brand.rgb()
    levels = list(cfg.saturation_levels.values())
    name, colour_conf = nearest_colour(top, palette, levels)
    busy = busy_share(img) if busy is None else busy  # auto_labels measures it once
    limit = _texture_share(img, cfg)
    spread = float(np.linalg.norm(top - bottom))
    if busy > limit:  # busy edges: a photo or texture, not a flat colour
        kind, kind_conf = "texture", min(1.0, busy / limit - 1.0)
    else:
        kind = "gradient" if spread > cfg.gradient_threshold else "solid"
        kind_conf = min(1.0, abs(spread - cfg.gradient_threshold) / cfg.gradient_threshold)
    to, to_conf = (nearest_colour(bottom, palette, levels) if kind == "gradient"
                   else ("none", kind_conf))
    s = _hsv(top)[1]
    ref_s = _hsv(np.array(palette[name]))[1]
    # a grey has no saturation to scale: drawn as it is (the level nearest 1)
    ratio = 1.0 if name in _greys(palette, levels)[0] else s / max(ref_s, 1e-6)
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
    """An image at its work_size split into background (a top-to-bottom linear model from the
    edge bands), ink (text and marks: far from the background, toward white or black) and
    the rest."""
    rgb: np.ndarray
    residual: np.ndarray  # colour distance of each pixel from the background model
    ink: np.ndarray
    lighter: np.ndarray  # luminance minus the background model's (signed)
    colourful: np.ndarray  # more colourful than the background: figures, not ink
    textured: bool = False  # the background is a texture (labels' test; segment's argument)
    texture: float = 0.0  # how far the texture departs from the background model (95th
    # percentile along the edges; 0 on a plain background): ink and figures must beat it


def work_size(img: Image.Image) -> tuple[int, int]:
    """The size the shape labellers look at: the image's aspect, short side WORK (shares
    of "the side" below are of the short side; a banner's round logo stays round)."""
    k = WORK / min(img.size)
    return max(1, round(img.width * k)), max(1, round(img.height * k))


def background_rows(a: np.ndarray) -> np.ndarray:
    """Each row's background colour (h x 3): the median of the left and right edge strips
    (3% of the width, which layouts keep clear), then a running median over 45% of the
    height against a mark that reaches an edge: any top-to-bottom gradient, eased or not
    (a running median keeps a monotonic profile)."""
    from scipy.ndimage import median_filter

    edge = max(1, round(0.03 * a.shape[1]))
    rows = np.median(np.concatenate([a[:, :edge], a[:, -edge:]], axis=1), axis=1)
    k = max(3, round(0.45 * a.shape[0]) | 1)
    return median_filter(rows, size=(k, 1), mode="nearest")


def segment(img: Image.Image, textured: bool = False) -> Segmentation:
    """`textured` (labels' texture test): ink must also depart further from the background
    than the texture does along the edges (halftone dots head toward black too)."""
    a = np.asarray(img.convert("RGB").resize(work_size(img), Image.Resampling.BILINEAR),
                   dtype=np.float32)
    bg = background_rows(a)[:, None, :]
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
    # ...and it is no more colourful than the background it mixes with: a green disk on
    # white departs toward black too, but it is a figure
    colourful = a.max(2) - a.min(2) > bg.max(2) - bg.min(2) + INK_CHROMA
    texture = 0.0
    if textured:
        edge = max(1, round(0.03 * a.shape[1]))
        texture = float(np.percentile(np.concatenate(
            [residual[:, :edge], residual[:, -edge:]], axis=1), 95))
    ink = (residual > max(INK_DIFF, texture + INK_DIFF / 2)) & (toward > INK_COS) & ~colourful
    lighter = diff @ np.array([0.299, 0.587, 0.114], np.float32)
    return Segmentation(a, residual, ink, lighter, colourful, textured, texture)


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


def _above_texture(fg: np.ndarray, textured: bool) -> np.ndarray:
    """A mark map less what the background's own texture reaches there: the level that
    95% of the edge bands' pixels stay under (0 on flat colour: unchanged), so halftone
    dots, grain, a photo's shading or a sample's wobble are neither mark nor the clear
    space's clutter; on a texture (`textured`) its specks are smoothed away first."""
    band = max(1, round(0.03 * fg.shape[0]))
    floor = float(np.percentile(np.concatenate([fg[:band].ravel(), fg[-band:].ravel()]), 95))
    if floor <= 0:
        return fg
    if textured:  # halftone dots, grain: their specks above the floor
        fg = cv2.medianBlur(fg, 3)
    return np.clip((fg - floor) / (1 - floor + 1e-6), 0, 1)


def _crowded(fg: np.ndarray, side: int) -> np.ndarray:
    """For each window of `side` (at its top-left corner): does the band around it (from
    a tenth to CLEAR_SPACE of its side away; the gap forgives a window a little smaller
    than the mark) hold marks? A logo stands in its clear space; a round letter inside a
    word, a part of a card or of a larger shape does not."""
    pad, gap = max(2, round(CLEAR_SPACE * side)), max(1, round(0.1 * side))
    marked = np.pad((fg > 0.3).astype(np.float32), pad)
    outer, inner = side + 2 * pad, side + 2 * gap
    total = cv2.boxFilter(marked, -1, (outer, outer), anchor=(0, 0), normalize=False)
    core = cv2.boxFilter(marked, -1, (inner, inner), anchor=(0, 0), normalize=False)
    h, w = fg.shape
    off = pad - gap
    band = total[:h, :w] - core[off : off + h, off : off + w]
    return band > CROWDED * (outer * outer - inner * inner)


@functools.lru_cache(maxsize=64)
def _logo_parts(path: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The mark's pixels and its holes (inside its outline, not marked) at side x side."""
    from scipy.ndimage import binary_fill_holes

    mark = _logo_template(path, side) > 0.5
    return mark, binary_fill_holes(mark) & ~mark


def _holes_open(window: np.ndarray, path: str, side: int) -> bool:
    """A logo with holes (a ring, a letter cut out) matches only where its holes are
    background: a disk or a tile of its size correlates with it but has them filled."""
    mark, holes = _logo_parts(path, side)
    if holes.sum() < 4:
        return True
    return float(window[holes].mean()) < HOLE_FILL * float(window[mark].mean())


def find_brand_logo(img: Image.Image, seg: Segmentation, logos: list[str], cfg: Labels,
                    words: list[dict] | None = None
                    ) -> tuple[str, float, tuple[int, int, int] | None]:
    """find_logo with the rules for the image's size: under the work size (the model's
    64 px samples) the mark is soft, matching 0.45-0.60 where a crisp one matches
    0.8-0.95, and its holes blur shut, so logo_threshold_small applies and holes are not
    checked. A mark centred in a word OCR read (two or more letters, confidence >= 50,
    half as wide again as the mark) is a letter of it: a large "A" is a triangle with a
    hole, an "O" a ring (a ring alone read as "oO" is not a word; a logo that is a word, a
    wordmark, is not found by shape)."""
    small = min(img.size) < WORK
    k = seg.ink.shape[1] / img.width
    boxes = [[round(v * k) for v in w["box"]] for w in words or []
             if w.get("conf", 0) >= 50 and sum(c.isalnum() for c in w["text"]) >= 2]
    return find_logo(seg, logos, cfg.logo_threshold_small if small else cfg.logo_threshold,
                     holes=not small, words=boxes)


def find_logo(seg: Segmentation, logos: list[str], threshold: float, holes: bool = True,
              words: list[list[int]] | None = None
              ) -> tuple[str, float, tuple[int, int, int] | None]:
    """Any of the logo files, at 8% to 30% of the image side, anywhere: normalised
    cross-correlation of its shape with how far each pixel departs from the background
    (a soft map, not a thresholded one: an 8-pixel logo on a blurry 64 px image is a
    ring of half-strength pixels; colour-blind, so a logo in any colour matches), and
    with how much lighter, or darker, each pixel is than the background: a one-colour
    mark with a soft glow of the other sign around it (as our U-Net draws it) matches
    there, where the glow counts as background, and not in the colour distance, where it
    counts as mark (0.45-0.60 vs 0.35-0.44 on such images; threshold 0.5).
    A match counts only in the logo's clear space (_crowded), with its holes open
    (`holes`), not centred on an OCR word's letters (`words`: boxes at the work size) and
    above what the background's own texture reaches (_above_texture). The best match that
    passes decides. -> (yes/no, confidence, (x, y, side) of the best match)."""
    maps = [np.minimum(seg.residual / LOGO_FULL, 1.0).astype(np.float32),
            np.clip(seg.lighter / LOGO_FULL, 0.0, 1.0).astype(np.float32),
            np.clip(-seg.lighter / LOGO_FULL, 0.0, 1.0).astype(np.float32)]
    maps = [_above_texture(m, seg.textured) for m in maps]
    marks = np.maximum.reduce(maps)  # any departure that the texture does not explain
    candidates = []
    for share in np.linspace(0.08, 0.30, 12):
        side = int(round(share * WORK))
        barred = _crowded(marks, side)
        for x, y, bw, bh in words or []:  # windows centred on a word's letters
            if bw >= 1.5 * side:
                c = side // 2
                barred[max(0, y - c) : max(0, y + bh - c),
                       max(0, x - c) : max(0, x + bw - c)] = True
        for fg, path in itertools.product(maps, logos):
            r = cv2.matchTemplate(fg, _logo_template(path, side), cv2.TM_CCOEFF_NORMED)
            # a window of flat background has no shape to correlate (0/0)
            energy = cv2.boxFilter(fg * fg, -1, (side, side), anchor=(0, 0))
            r = np.where(energy[: r.shape[0], : r.shape[1]] > 0.02, np.nan_to_num(r), 0.0)
            r = np.where(barred[: r.shape[0], : r.shape[1]], 0.0, r)
            _lo, score, _lo_at, at = cv2.minMaxLoc(r)
            candidates.append((float(score), at[0], at[1], side, path, fg))
    best, box = 0.0, None
    for score, x, y, side, path, fg in sorted(candidates, key=lambda c: -c[0]):
        if score <= threshold or not holes or _holes_open(fg[y : y + side, x : x + side],
                                                          path, side):
            best, box = score, (x, y, side)
            break
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
    floor = max(FIG_DIFF, seg.texture + FIG_DIFF / 2)  # on a texture: beyond what it reaches
    cand = cv2.morphologyEx((seg.residual > floor).astype(np.uint8), cv2.MORPH_OPEN,
                            np.ones((3, 3), np.uint8))
    # a figure's soft rim mixes its colour with the background toward black or white (ink)
    rims = cv2.dilate(seg.colourful.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    near_ink = cv2.dilate((seg.ink & ~rims).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
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


def text_block(seg: Segmentation, logo_box: tuple[int, int, int] | None
               ) -> tuple[float, float, float, float] | None:
    """The text block (x0, y0, x1, y1 as shares of width and height): the largest cluster
    of the ink that is not the logo; None when there is too little ink."""
    text = cv2.morphologyEx((seg.ink & ~_block(np.zeros_like(seg.ink), logo_box, 2))
                            .astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) > 0
    if text.sum() < 20:
        return None
    # letters merge into lines and lines into the block; a stray mark (an undetected logo,
    # a speck) stays a separate, smaller cluster
    merged = cv2.dilate(text.astype(np.uint8), np.ones((9, 9), np.uint8))
    n, lab, _stats, _ = cv2.connectedComponentsWithStats(merged, connectivity=8)
    k = 1 + int(np.argmax([(text & (lab == i)).sum() for i in range(1, n)]))
    ys, xs = np.nonzero(text & (lab == k))
    h, w = text.shape
    return xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h


def label_layout(seg: Segmentation, logo_box: tuple[int, int, int] | None,
                 words: list[dict], width: int, height: int) -> tuple[str, float]:
    """Where the text block sits: the extent of the ink that is not the logo; from the OCR
    word boxes when there is none."""
    block = text_block(seg, logo_box)
    if block is not None:
        return layout_from_box(*block)
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
    busy = busy_share(img)
    seg = segment(img, busy > _texture_share(img, cfg))
    logo, logo_conf, logo_box = find_brand_logo(img, seg, brand.logos, cfg, words)
    figures, figures_conf = label_figures(seg, logo_box)
    layout, layout_conf = label_layout(seg, logo_box, words, *img.size)
    return {**label_background(img, brand, cfg, busy),
            "layout": layout, "layout_conf": round(layout_conf, 4),
            "figure_size": figures, "figure_size_conf": figures_conf,
            "logo": logo, "logo_conf": round(logo_conf, 4)}
