"""Typesetting: the requested words drawn crisply over a generated image, at its output
size, in the brand font, in the boxes the layout planner placed them in (the glyph map's
boxes), in the ink colour the model drew there. The model's own letters are painted over
first with the colour beside them (left and right of the box), row by row, so a
top-to-bottom gradient stays a gradient.

This is an option of `generate` and the served model (`--typeset`, `typeset`): designers
get exact text at 800 px. Evaluation never uses it: the model's numbers are its own.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from components.models.glyphs import glyph_map

MARGIN = 0.5  # a line box grows by this share of its height before it is painted over
MIN_CONTRAST = 3.0  # WCAG contrast of ink on paper below which the text is drawn black/white


def _paper(region: np.ndarray, margin: int) -> np.ndarray:
    """Each row's background colour (H, 3) of an (H, W, 3) region whose `margin` columns
    on either side lie outside the text box: the median of those columns."""
    sides = np.concatenate([region[:, :margin], region[:, -margin:]], 1)
    return np.median(sides, 1)


def _luminance(rgb: np.ndarray) -> float:
    """WCAG relative luminance of an sRGB colour (0..255)."""
    c = np.asarray(rgb, np.float64) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(lin @ [0.2126, 0.7152, 0.0722])


def contrast(a: np.ndarray, b: np.ndarray) -> float:
    """WCAG contrast ratio of two colours (1..21)."""
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _ink(region: np.ndarray, paper: np.ndarray) -> np.ndarray:
    """The model's ink colour in a text box: the median of the tenth of its pixels that
    differ most from their row's paper; black or white (the more contrast) when that is
    not legible on the paper (WCAG contrast under MIN_CONTRAST, large-text level)."""
    dist = np.abs(region - paper[:, None, :]).sum(-1)
    ink = np.median(region[dist >= np.quantile(dist, 0.9)], 0)
    background = paper.mean(0)
    if contrast(ink, background) >= MIN_CONTRAST:
        return ink
    black, white = np.zeros(3), np.full(3, 255.0)
    return black if contrast(black, background) >= contrast(white, background) else white


def typeset(image: Image.Image, lines: list[dict], font_path: str) -> Image.Image:
    """`image` with each line of `lines` (text_boxes format, units of the image side)
    redrawn: the box filled with its rows' paper colour (fading out over a margin of MARGIN
    x the line height), then the text fitted into its box in the ink colour the model used
    there."""
    if not lines:
        return image
    w, h = image.size
    before = np.asarray(image.convert("RGB")).astype(np.float64)
    out, weight = before.copy(), np.zeros((h, w))
    inks = []
    for line in lines:
        x0, y0, x1, y1 = line["box"]
        grow = (y1 - y0) * h * MARGIN  # pixels, the same on both axes
        a0, b0 = max(0, int(x0 * w - grow)), max(0, int(y0 * h - grow))
        a1, b1 = min(w, int(np.ceil(x1 * w + grow))), min(h, int(np.ceil(y1 * h + grow)))
        region = out[b0:b1, a0:a1]
        paper = _paper(region, max(1, int(grow)))
        inks.append(_ink(out[int(y0 * h):int(np.ceil(y1 * h)), int(x0 * w):int(np.ceil(x1 * w))],
                         paper[int(y0 * h) - b0:int(np.ceil(y1 * h)) - b0]))
        region[:] = paper[:, None, :]
        # full strength over the box, fading to nothing across the margin: no visible edge
        ys, xs = np.arange(b0, b1)[:, None], np.arange(a0, a1)[None, :]
        inside = np.minimum(np.minimum(xs - x0 * w, x1 * w - xs), np.minimum(ys - y0 * h,
                                                                           y1 * h - ys))
        ramp = np.clip(1 + inside / max(grow, 1.0), 0, 1)
        weight[b0:b1, a0:a1] = np.maximum(weight[b0:b1, a0:a1], ramp)
    out = before + (out - before) * weight[..., None]
    result = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    for line, ink in zip(lines, inks, strict=True):
        alpha = glyph_map([line], w, h, font_path)  # exactly the glyph renderer's letters
        result.paste(Image.new("RGB", (w, h), tuple(int(v) for v in ink)), (0, 0), alpha)
    return result
