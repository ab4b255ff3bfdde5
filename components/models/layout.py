"""The layout planner: where a prompt's text goes, placed the way the training data places it.

`fit_layouts` keeps, per layout attribute (centre, left, ...) and number of lines, the
text blocks the training images have (the box around their lines, from `text_boxes`), and
how many lines their texts of each word count take. `plan` breaks the quoted text of a
prompt into that many lines, draws one of those blocks with its seed (the same seed, the
same plan) and gives each line an equal band of it, in the `text_boxes` format the glyph
renderer (glyphs.py) draws. A user's own box (x, y, w, h in units of the image side)
replaces the drawn block.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

from components.contracts import UserError
from components.models.glyphs import REFERENCE_PX, font

MAX_BLOCKS = 256  # blocks kept per layout and line count (enough to draw from)
SMALLEST_SHARE = 0.8  # a planned line under this share of the smallest training line fails


def parse_box(text: str) -> tuple[float, float, float, float]:
    """"x,y,w,h" (units of the image side) -> a tuple; UserError naming the format."""
    try:
        x, y, w, h = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"text box {text!r}: give x,y,w,h in units of the image side, e.g. "
                        "0.1,0.4,0.8,0.2") from None
    return x, y, w, h


def fit_layouts(rows: list[tuple[str, list[dict]]]) -> dict:
    """(layout attribute, text_boxes) of the training images -> the planner's statistics:
    {"blocks": {layout: {n_lines: [[x0, y0, x1, y1], ...]}},
     "lines": {n_words: {n_lines: count}}, "min_line_height": the smallest line's height};
    deterministic for the same rows."""
    blocks: dict[str, dict[str, list]] = {}
    lines: dict[str, Counter] = {}
    smallest = 1.0
    for layout, boxes in rows:
        if not boxes:
            continue
        smallest = min(smallest, *(b["box"][3] - b["box"][1] for b in boxes))
        x0, y0 = min(b["box"][0] for b in boxes), min(b["box"][1] for b in boxes)
        x1, y1 = max(b["box"][2] for b in boxes), max(b["box"][3] for b in boxes)
        kept = blocks.setdefault(layout, {}).setdefault(str(len(boxes)), [])
        if len(kept) < MAX_BLOCKS:
            kept.append([x0, y0, x1, y1])
        words = sum(len(b["text"].split()) for b in boxes)
        lines.setdefault(str(words), Counter())[str(len(boxes))] += 1
    return {"blocks": blocks, "lines": {w: dict(c) for w, c in sorted(lines.items())},
            "min_line_height": round(smallest, 4)}


def break_lines(text: str, n: int) -> list[str]:
    """`text`'s words in n lines (fewer when it has fewer words), the longest line as short
    as it can be; ties: the earlier lines longer."""
    words = text.split()
    n = max(1, min(n, len(words)))
    best: list[str] = []
    for cuts in itertools.combinations(range(1, len(words)), n - 1):
        edges = (0, *cuts, len(words))
        lines = [" ".join(words[a:b]) for a, b in itertools.pairwise(edges)]
        key = (max(map(len, lines)), [-len(ln) for ln in lines])
        if not best or key < (max(map(len, best)), [-len(ln) for ln in best]):
            best = lines
    return best


def _line_count(stats: dict, n_words: int) -> int:
    """The most common number of lines for texts of this many words (nearest known)."""
    known = {int(w): c for w, c in stats["lines"].items()}
    if not known:
        return 1
    nearest = min(known, key=lambda w: (abs(w - n_words), w))
    return int(max(known[nearest].items(), key=lambda kv: (kv[1], -int(kv[0])))[0])


def plan(text: str, layout: str, stats: dict, font_path: str, seed: int = 0,
         width: int = 64, height: int = 64, box: tuple[float, ...] | None = None
         ) -> list[dict]:
    """The text_boxes of `text` for a width x height image with that layout: lines and
    words, boxes in units of the image side. The seed draws one of the layout's training
    blocks: its line height is the text size, its side (left, right) or centre the anchor;
    the lines are as wide as the font makes them, narrowed to the layout's widest block.
    UserError when the layout has no text in the training data, or a line would be smaller
    than any the model learned from."""
    text = " ".join(text.split())
    if not text:
        return []
    lines = break_lines(text, _line_count(stats, len(text.split())))
    ref = font(font_path, REFERENCE_PX)
    aspect = [(b[2] - b[0]) / max(1, b[3] - b[1]) for b in map(ref.getbbox, lines)]
    if box is not None:
        x, y, w, h = box
        if not (0 <= x < 1 and 0 <= y < 1 and 0 < w and 0 < h and x + w <= 1 and y + h <= 1):
            raise UserError(f"text box {box}: x, y, w, h must lie inside the image (units "
                            "of its side, e.g. 0.1,0.4,0.8,0.2)")
        x0, y0, x1, y1 = x, y, x + w, y + h
        line_h = (y1 - y0) / len(lines)
    else:
        by_count = stats["blocks"].get(layout, {})
        if not by_count:
            raise UserError(f"layout {layout!r}: no training image has its text there; "
                            f"layouts with text: {', '.join(sorted(stats['blocks'])) or 'none'}"
                            "; pass a text box instead")
        near = min(by_count, key=lambda c: (abs(int(c) - len(lines)), int(c)))
        bx0, by0, bx1, by1 = random.Random(seed).choice(by_count[near])
        line_h = (by1 - by0) / int(near)
        widest = max(b[2] - b[0] for blocks in by_count.values() for b in blocks)
        # lines as wide as the font draws them at that height, narrowed to fit the layout
        need = max(a * line_h * height / width for a in aspect)
        if need > widest:
            line_h *= widest / need
            need = widest
        cy = (by0 + by1) / 2
        block_h = line_h * len(lines)
        y0 = by0 if layout == "top" else by1 - block_h if layout == "bottom" else cy - block_h / 2
        x0 = bx0 if layout == "left" else bx1 - need if layout == "right" else \
            (bx0 + bx1 - need) / 2
        x0, y0 = min(max(x0, 0.0), 1 - need), min(max(y0, 0.0), 1 - block_h)
        x1, y1 = x0 + need, y0 + block_h
    smallest = SMALLEST_SHARE * stats.get("min_line_height", 0.0)
    if line_h < smallest:
        raise UserError(f'"{text}": too long to be legible at {width}x{height}: its lines '
                        f"would be {line_h * height:.1f} px high, the smallest text the "
                        f"model learned {stats['min_line_height'] * height:.1f} px; shorten "
                        "it or give it a larger text box")
    return [{"text": line, "box": [round(v, 4) for v in (x0, y0 + i * line_h, x1,
                                                         y0 + (i + 1) * line_h)],
             "words": []} for i, line in enumerate(lines)]
