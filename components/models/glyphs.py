"""Glyph maps: the words an image shows (or a prompt asks for), drawn in the brand font,
white on black, inside their boxes, at the image's full resolution.

One renderer for both sides: training draws each image's `text_boxes` (labelling/
text_boxes.py: the generator's ground truth or OCR's boxes), generation draws the boxes a
layout is planned into, so what the model learns to copy is exactly what it is shown. Each
line is fitted into its box: the largest font size whose ink fits, centred.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from components.contracts import UserError

REFERENCE_PX = 100  # font size a line is measured at before it is scaled to its box


@lru_cache(maxsize=256)
def font(path: str, size: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        raise UserError(f"brand.font: cannot open font {path!r}; install fonts-dejavu-core "
                        "(apt-get install fonts-dejavu-core) or point brand.font at a .ttf") \
            from None


def fitted(text: str, width: float, height: float, font_path: str
           ) -> tuple[ImageFont.FreeTypeFont, tuple[int, int, int, int]]:
    """The largest size of the font whose ink box of `text` fits width x height pixels,
    and that ink box (relative to the text's anchor)."""
    ref = font(font_path, REFERENCE_PX).getbbox(text)
    w, h = max(1, ref[2] - ref[0]), max(1, ref[3] - ref[1])
    # the scaled estimate, from a little above it down (hinting makes sizes not scale
    # exactly): the size a line was drawn at reproduces its own box
    size = max(1, int(REFERENCE_PX * min(width / w, height / h)) + 3)
    while True:
        f = font(font_path, size)
        box = f.getbbox(text)
        # half a pixel of slack: boxes are stored rounded (4 decimals of the side)
        if (box[2] - box[0] <= width + 0.5 and box[3] - box[1] <= height + 0.5) or size == 1:
            return f, box
        size -= 1


def glyph_map(lines: list[dict], width: int, height: int, font_path: str) -> Image.Image:
    """An "L" image of width x height: every line's text fitted into its box (units of the
    image side), 255 on 0. No lines: all black (an image without text)."""
    im = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(im)
    for line in lines:
        text = line["text"].strip()
        x0, y0, x1, y1 = (v * s for v, s in zip(line["box"], (width, height, width, height),
                                                 strict=True))
        if not text or x1 - x0 < 1 or y1 - y0 < 1:
            continue
        f, box = fitted(text, x1 - x0, y1 - y0, font_path)
        x = x0 + (x1 - x0 - (box[2] - box[0])) / 2 - box[0]
        y = y0 + (y1 - y0 - (box[3] - box[1])) / 2 - box[1]
        draw.text((x, y), text, font=f, fill=255)
    return im


def glyph_batch(layouts: list[list[dict]], width: int, height: int, font_path: str
                ) -> torch.Tensor:
    """(B, 1, height, width) float in 0..1: each image's lines through `glyph_map`."""
    maps = [np.asarray(glyph_map(lines, width, height, font_path)) for lines in layouts]
    if not maps:
        return torch.zeros(0, 1, height, width)
    return torch.from_numpy(np.stack(maps)).unsqueeze(1).float().div_(255)
