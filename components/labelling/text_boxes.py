"""Where an image's text is: its lines and words with their boxes (the label system's
`text_boxes` field), from the generator's ground truth or from OCR word boxes.

Format, JSON in the tables: a list of lines in reading order,
    [{"text": "SUMMER SALE", "box": [x0, y0, x1, y1],
      "words": [{"text": "SUMMER", "box": [...]}, {"text": "SALE", "box": [...]}]}, ...]
with boxes in units of the image's width and height (0..1, so they hold at any size the
models resize to). The glyph maps (models/glyphs.py) are rendered from these boxes.
"""

from __future__ import annotations

import json

from components.contracts import CAPTIONS, read_table

Box = list[float]


def relative(lines: list[dict], width: float, height: float) -> list[dict]:
    """Pixel boxes (x0, y0, x1, y1) -> units of the image side, 4 decimals."""
    def rel(box) -> Box:
        x0, y0, x1, y1 = box
        return [round(x0 / width, 4), round(y0 / height, 4), round(x1 / width, 4),
                round(y1 / height, 4)]

    return [{"text": ln["text"], "box": rel(ln["box"]),
             "words": [{"text": w["text"], "box": rel(w["box"])} for w in ln["words"]]}
            for ln in lines]


def union(boxes: list[Box]) -> Box:
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
            max(b[3] for b in boxes)]


def from_ocr(words: list[dict], width: int, height: int) -> list[dict]:
    """Tesseract's words (ocr.parquet `words`: text, box as left/top/width/height in
    pixels, line as block/paragraph/line numbers) grouped into lines, in its order."""
    lines: dict[tuple, list[dict]] = {}
    for w in words:
        left, top, w_px, h_px = w["box"]
        lines.setdefault(tuple(w["line"]), []).append(
            {"text": w["text"], "box": [left, top, left + w_px, top + h_px]})
    return relative([{"text": " ".join(w["text"] for w in ws),
                      "box": union([w["box"] for w in ws]), "words": ws}
                     for ws in lines.values()], width, height)


def retext(lines: list[dict], text: str) -> list[dict]:
    """The boxes of `lines` holding a corrected transcription `text` (a manual label): its
    line i takes line box i (when the line counts differ, all lines share the box around
    the old ones, in equal bands), its words split each line box by their length."""
    new = [ln for ln in text.split("\n") if ln.strip()]
    if not lines or not new:
        return []
    if len(new) == len(lines):
        boxes = [ln["box"] for ln in lines]
    else:
        x0, y0, x1, y1 = union([ln["box"] for ln in lines])
        band = (y1 - y0) / len(new)
        boxes = [[x0, y0 + i * band, x1, y0 + (i + 1) * band] for i in range(len(new))]
    out = []
    for line, (x0, y0, x1, y1) in zip(new, boxes, strict=True):
        words = line.split()
        unit = (x1 - x0) / max(1, len(" ".join(words)))
        at, placed = x0, []
        for word in words:
            placed.append({"text": word, "box": [round(at, 4), y0, round(at + unit * len(word),
                                                                       4), y1]})
            at += unit * (len(word) + 1)
        out.append({"text": " ".join(words), "box": [x0, y0, x1, y1], "words": placed})
    return out


def dumps(lines: list[dict]) -> str:
    return json.dumps(lines, separators=(",", ":"))


def loads(text: str | None) -> list[dict]:
    return json.loads(text) if text else []


def of_images(*path_lists: list[str]) -> tuple[list[list[dict]], ...]:
    """Each image's lines (the captions table's `text_boxes`), for lists of image paths
    (an image the table lacks: no text): what the image trainers draw glyph maps from."""
    boxes = read_table(CAPTIONS, "captions").set_index("path")["text_boxes"]
    return tuple([loads(boxes.get(p)) for p in paths] for paths in path_lists)
