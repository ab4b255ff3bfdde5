"""Where a poster's text blocks are, for OCR to read each alone: marks apart from the
background merged into blocks (a card, a line, a footer, a shape), a card's text inside
its edge, and whether a block holds letters or a reading's words."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

BLOCK_DIFF = 48.0  # colour distance from the background at which a pixel is a mark
MAX_BLOCKS = 8  # blocks read alone at most (the largest first come top to bottom)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


def text_blocks(rgb: Image.Image, per_row: bool = True) -> list[Box]:
    """Boxes (x0, y0, x1, y1) of the marks apart from the background (each row's median
    colour, a gradient's; or the whole image's), letters merged into blocks: a card, a
    line, a footer, a shape. Tesseract's page layout loses a small card or a footer in a
    large plain image; read alone, each block also gets its own text polarity (dark text
    on a white card on a dark poster)."""
    a = np.asarray(rgb, dtype=np.float32)
    ref = np.median(a, axis=1, keepdims=True) if per_row else np.median(a, axis=(0, 1))
    marked = np.linalg.norm(a - ref, axis=2) > BLOCK_DIFF
    k = max(3, round(0.03 * min(rgb.size)))
    merged = cv2.dilate(marked.astype(np.uint8), np.ones((k, k), np.uint8))
    n, _lab, stats, _ = cv2.connectedComponentsWithStats(merged, connectivity=8)
    h, w = marked.shape
    boxes = []
    for x, y, bw, bh, _area in stats[1:].tolist():
        if bh < 0.04 * min(w, h) or bw * bh > 0.8 * w * h:
            continue  # specks; a block that is the whole image gains nothing
        boxes.append((max(0, x - k), max(0, y - k), min(w, x + bw + k), min(h, y + bh + k)))
    return sorted(boxes, key=lambda b: (b[1], b[0]))[:MAX_BLOCKS]


def inside(rgb: Image.Image, box: Box) -> Box:
    """A card's text without the card's edge: the blocks inside `box` that keep off its
    border (Tesseract drops text framed by a card's dark surround); the box itself when
    there are none."""
    x0, y0, x1, y1 = box
    inner = [b for b in text_blocks(rgb.crop(box), per_row=False)
             if b[0] > 0 and b[1] > 0 and b[2] < x1 - x0 and b[3] < y1 - y0]
    if not inner:
        return box
    return (x0 + min(b[0] for b in inner), y0 + min(b[1] for b in inner),
            x0 + max(b[2] for b in inner), y0 + max(b[3] for b in inner))


def letters(crop: Image.Image) -> int:
    """Marks inside a block apart from its main colour and clear of its edge: a card's or
    a line's letters (a block with three or more is read); none to two in a disk, a
    ring, a logo's cut-outs."""
    a = np.asarray(crop, dtype=np.float32)
    marked = np.linalg.norm(a - np.median(a, axis=(0, 1)), axis=2) > BLOCK_DIFF
    n, _lab, stats, _ = cv2.connectedComponentsWithStats(marked.astype(np.uint8))
    h, w = marked.shape
    return sum(1 for x, y, bw, bh, area in stats[1:].tolist()
               if area >= 4 and x > 0 and y > 0 and x + bw < w and y + bh < h)


def holds_a_word(box: Box, words: list[dict]) -> bool:
    """Is the centre of one of an OCR reading's words inside the box?"""
    return any(box[0] <= w["box"][0] + w["box"][2] / 2 <= box[2]
               and box[1] <= w["box"][1] + w["box"][3] / 2 <= box[3] for w in words)
