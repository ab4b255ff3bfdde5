"""The built-in data source: deterministic brand-style graphics with their ground truth.

Each image i of a source with seed s is drawn from its own RNG seeded by (s, i), so an
image never changes when n grows, and the same settings give byte-identical PNGs. The
ground truth (exact text and every label attribute) is what OCR error, label accuracy
and prompt adherence are measured against.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from components.config import Brand, Labels, Synthetic
from components.labelling.labeller import FIGURE_SHARES as FIGURE_SIZES
from components.labelling.labeller import LAYOUTS, logo_mask, scale_saturation
from components.labelling.text_boxes import dumps, relative
from components.models.buckets import size_at
from components.models.glyphs import font as brand_font

SHAPES = ["circle", "square", "triangle"]
CORNERS = ["top-left", "top-right", "bottom-left", "bottom-right"]
DARK_TEXT = (24, 24, 24)
LIGHT_TEXT = (255, 255, 255)


@dataclass
class Truth:
    text: str  # lines joined by "\n", exactly as drawn
    background: str
    background_kind: str  # solid | gradient
    gradient_to: str  # "" for solid
    layout: str
    n_figures: int
    figure_size: str  # none | small | medium | large
    saturation: str
    logo: bool
    logo_corner: str  # "" when no logo
    text_boxes: str = "[]"  # where the text is drawn: labelling/text_boxes.py's JSON format


def luminance(rgb: tuple[int, int, int]) -> float:
    def lin(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _overlaps(a: tuple, b: tuple, pad: float = 0) -> bool:
    return not (a[2] + pad <= b[0] or b[2] + pad <= a[0] or a[3] + pad <= b[1]
                or b[3] + pad <= a[1])


def _text_lines(rng: np.random.Generator, vocabulary: list[str], headline: bool = False
                ) -> list[str]:
    n_lines = 1 if headline else int(rng.integers(1, 4))
    lines = []
    for _ in range(n_lines):
        n_words = 1 if headline else int(rng.integers(1, 3))
        lines.append(" ".join(str(w).upper() for w in rng.choice(vocabulary, n_words)))
    return lines


def _text_block(draw: ImageDraw.ImageDraw, lines: list[str], layout: str, w: int, h: int,
                font_path: str, font_px: int) -> tuple[ImageFont.FreeTypeFont, list[tuple], tuple]:
    """The largest font size up to font_px that fits the layout's block (a headline may take
    the whole width); return font, line positions, bbox."""
    side = min(w, h)
    width_share = 0.92 if font_px > 0.11 * side else 0.5 if layout in ("left", "right") \
        else 0.86
    max_w = width_share * w
    while True:
        font = brand_font(font_path, font_px)
        boxes = [draw.textbbox((0, 0), line, font=font) for line in lines]
        widths = [b[2] - b[0] for b in boxes]
        if max(widths) <= max_w or font_px <= int(0.05 * side):
            break
        font_px -= 1
    line_h = int(font_px * 1.35)
    block_w, block_h = max(widths), line_h * len(lines)
    m = int(0.06 * side)
    if layout == "centre":
        x0, y0 = (w - block_w) / 2, (h - block_h) / 2
    elif layout == "top":
        x0, y0 = (w - block_w) / 2, m + 0.04 * side
    elif layout == "bottom":
        x0, y0 = (w - block_w) / 2, h - m - 0.04 * side - block_h
    elif layout == "left":
        x0, y0 = m, (h - block_h) / 2
    else:  # right
        x0, y0 = w - m - block_w, (h - block_h) / 2
    positions = []
    for i, (line, box, lw) in enumerate(zip(lines, boxes, widths, strict=True)):
        if layout == "left":
            x = x0
        elif layout == "right":
            x = x0 + block_w - lw
        else:
            x = x0 + (block_w - lw) / 2
        positions.append((x - box[0], y0 + i * line_h, line))
    return font, positions, (x0, y0, x0 + block_w, y0 + block_h)


def _draw_logo(img: Image.Image, box: tuple, colour: tuple, logo: str) -> None:
    """The brand mark from the logo file, tinted in the text colour (the default mark, a
    ring around a diamond, has no letters, so OCR never reads it)."""
    x0, y0, x1, y1 = (round(v) for v in box)
    mask = logo_mask(logo).resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
    img.paste(Image.new("RGB", mask.size, colour), (x0, y0), mask)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, colour: tuple) -> None:
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        x0, y0, x1, y1 = box
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def drawn_boxes(draw: ImageDraw.ImageDraw, positions: list[tuple], font, w: int, h: int
                ) -> list[dict]:
    """The ink box of every line and word exactly as `draw.text` placed them, in units of
    the image's width and height."""
    lines = []
    for x, y, line in positions:
        words, start = [], 0
        for word in line.split(" "):
            at = line.index(word, start)
            offset = draw.textlength(line[:at], font=font)  # kerning as drawn, to the word
            words.append({"text": word, "box": draw.textbbox((x + offset, y), word, font=font)})
            start = at + len(word)
        lines.append({"text": line, "box": draw.textbbox((x, y), line, font=font),
                      "words": words})
    return relative(lines, w, h)


def canvas(index: int, seed: int, size: int, synth: Synthetic,
           buckets: dict[str, tuple[int, int]] | None) -> tuple[int, int]:
    """Image `index`'s width and height: a format drawn by synthetic.formats (from its own
    random stream, so a square image is the same whatever the shares) at about size x size
    pixels; size x size for a square format or without `buckets`."""
    shares = {k: v for k, v in synth.formats.items() if v > 0}
    name = next(iter(shares))
    if len(shares) > 1:
        p = np.array(list(shares.values()), float)
        name = str(np.random.default_rng([seed, index, 1]).choice(list(shares), p=p / p.sum()))
    ratio = (buckets or {}).get(name, (1, 1))
    return size_at(ratio[0] / ratio[1], size, 16)


def render(index: int, seed: int, size: int, brand: Brand, synth: Synthetic,
           labels: Labels, buckets: dict[str, tuple[int, int]] | None = None
           ) -> tuple[bytes, Truth]:
    """Draw image `index` of the source seeded `seed` (in the format `canvas` draws);
    return PNG bytes and ground truth."""
    w, h = canvas(index, seed, size, synth, buckets)
    side = min(w, h)
    rng = np.random.default_rng([seed, index])
    palette = brand.rgb()
    names = list(palette)
    sat_name = str(rng.choice(list(labels.saturation_levels)))
    factor = labels.saturation_levels[sat_name]
    bg = str(rng.choice(names))
    gradient = bool(rng.random() < synth.gradient_share)
    grad_to = str(rng.choice([n for n in names if n != bg])) if gradient else ""
    layout = str(rng.choice(LAYOUTS))

    top = scale_saturation(palette[bg], factor)
    bottom = scale_saturation(palette[grad_to], factor) if gradient else top
    arr = np.linspace(np.array(top, float), np.array(bottom, float), h)
    img = Image.fromarray(np.repeat(arr[:, None, :], w, axis=1).round().astype(np.uint8))
    draw = ImageDraw.Draw(img)

    text_colour = max((LIGHT_TEXT, DARK_TEXT), key=lambda c: min(contrast(c, top),
                                                                  contrast(c, bottom)))
    # a large headline (one line, letters 20-40% of the side) on synthetic.headline_share of
    # the images; no draw from the RNG at share 0, so the default images stay as they were
    headline = synth.headline_share > 0 and bool(rng.random() < synth.headline_share)
    lines = _text_lines(rng, synth.vocabulary, headline)
    font_px = int(rng.uniform(0.2, 0.4) * side / 0.73) if headline else int(0.11 * side)
    font, positions, tbox = _text_block(draw, lines, layout, w, h, brand.font, font_px)
    pad = 0.04 * side
    taken = [tbox]

    logo = bool(rng.random() < synth.logo_share) and bool(brand.logos)
    corner = ""
    if logo:
        s = min(synth.logo_size * (w * h) ** 0.5, 0.3 * side)  # one area in every format
        m = 0.04 * side
        boxes = {"top-left": (m, m, m + s, m + s),
                 "top-right": (w - m - s, m, w - m, m + s),
                 "bottom-left": (m, h - m - s, m + s, h - m),
                 "bottom-right": (w - m - s, h - m - s, w - m, h - m)}
        rule = "random" not in synth.logo_corners  # else any clear corner
        free = [c for c in (synth.logo_corners if rule else CORNERS)
                if not _overlaps(boxes[c], tbox, pad)]
        if free:
            corner = free[0] if rule else str(rng.choice(free))
            _draw_logo(img, boxes[corner], text_colour, brand.logos[0])
            taken.append(boxes[corner])
        else:
            logo = False

    want = int(rng.integers(0, 4))
    fig_size = str(rng.choice(list(FIGURE_SIZES))) if want else "none"
    placed = 0
    if want:
        fig = FIGURE_SIZES[fig_size] * side
        fig_colour = scale_saturation(palette[str(rng.choice([n for n in names if n != bg]))],
                                      factor)
        for _ in range(want):
            for _attempt in range(40):
                x = rng.uniform(0.03 * w, w - 0.03 * w - fig)
                y = rng.uniform(0.03 * h, h - 0.03 * h - fig)
                box = (x, y, x + fig, y + fig)
                if not any(_overlaps(box, t, pad) for t in taken):
                    _draw_shape(draw, str(rng.choice(SHAPES)), box, fig_colour)
                    taken.append(box)
                    placed += 1
                    break
    for x, y, line in positions:
        draw.text((x, y), line, font=font, fill=text_colour)
    boxes = drawn_boxes(draw, positions, font, w, h)

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    truth = Truth(text="\n".join(lines), background=bg,
                  background_kind="gradient" if gradient else "solid", gradient_to=grad_to,
                  layout=layout, n_figures=placed,
                  figure_size=fig_size if placed else "none", saturation=sat_name,
                  logo=logo, logo_corner=corner, text_boxes=dumps(boxes))
    return buf.getvalue(), truth


def truth_row(truth: Truth) -> dict:
    return asdict(truth)
