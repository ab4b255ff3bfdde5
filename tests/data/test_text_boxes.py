"""Where the text is: the generator's boxes, OCR's, manual corrections, and glyph maps."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import load_params
from components.ingest.synthetic import render
from components.labelling.text_boxes import from_ocr, loads, retext
from components.models.glyphs import glyph_map

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def _ink(img: np.ndarray) -> np.ndarray:
    """Pixels of the generator's text colours (white or near-black ink)."""
    return np.minimum(np.abs(img - 255).max(-1), np.abs(img - 24).max(-1)) < 60


@pytest.mark.parametrize("index", range(8))
def test_the_glyph_map_of_the_generators_boxes_lies_on_its_text(index: int) -> None:
    p = load_params(PARAMS, ["synthetic.logo_share=0", "synthetic.gradient_share=0"])
    png, truth = render(index, 5, 256, p.brand, p.synthetic, p.labels)
    import io

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    lines = loads(truth.text_boxes)
    assert [ln["text"] for ln in lines] == truth.text.split("\n")
    assert all(" ".join(w["text"] for w in ln["words"]) == ln["text"] for ln in lines)
    glyph = np.asarray(glyph_map(lines, 256, 256, p.brand.font)) > 127
    ink = _ink(img)
    # the glyphs are drawn where the letters are (edges are anti-aliased on both sides) ...
    assert (glyph & ink).sum() / glyph.sum() > 0.8
    assert (glyph & ink).sum() / ink.sum() > 0.8
    # ... and every word's box holds its own letters: no ink of the word outside the box
    for ln in lines:
        for w in ln["words"]:
            x0, y0, x1, y1 = (round(v * 256) for v in w["box"])
            inside = ink[y0:y1, x0:x1].sum()
            assert inside > 0.9 * ink[max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3].sum()


def test_glyph_maps_are_deterministic_and_black_without_text() -> None:
    font = load_params(PARAMS).brand.font
    lines = [{"text": "SUMMER SALE", "box": [0.1, 0.4, 0.9, 0.6], "words": []}]
    a, b = glyph_map(lines, 128, 96, font), glyph_map(lines, 128, 96, font)
    assert a.tobytes() == b.tobytes() and a.size == (128, 96)
    on = np.argwhere(np.asarray(a) > 127)
    (top, left), (bottom, right) = on.min(0), on.max(0)
    assert 0.1 * 128 - 1 <= left and right <= 0.9 * 128 + 1  # fitted into its box
    assert 0.4 * 96 - 1 <= top and bottom <= 0.6 * 96 + 1
    assert right - left > 0.7 * 0.8 * 128  # as large as the box allows (width-bound)
    assert not np.asarray(glyph_map([], 64, 64, font)).any()


def test_ocr_words_become_lines_in_units_of_the_image() -> None:
    words = [{"text": "BIG", "conf": 90, "box": [10, 20, 30, 10], "line": [1, 1, 1]},
             {"text": "SALE", "conf": 90, "box": [50, 22, 40, 10], "line": [1, 1, 1]},
             {"text": "NOW", "conf": 80, "box": [30, 60, 30, 12], "line": [1, 1, 2]}]
    lines = from_ocr(words, 100, 200)
    assert [ln["text"] for ln in lines] == ["BIG SALE", "NOW"]
    assert lines[0]["box"] == [0.1, 0.1, 0.9, 0.16]
    assert lines[1]["words"][0]["box"] == [0.3, 0.3, 0.6, 0.36]


def test_a_corrected_transcription_keeps_its_box() -> None:
    lines = [{"text": "B1G SA1E", "box": [0.1, 0.1, 0.9, 0.2], "words": []},
             {"text": "N0W", "box": [0.3, 0.3, 0.6, 0.4], "words": []}]
    fixed = retext(lines, "BIG SALE\nNOW")
    assert [(ln["text"], ln["box"]) for ln in fixed] == [("BIG SALE", [0.1, 0.1, 0.9, 0.2]),
                                                         ("NOW", [0.3, 0.3, 0.6, 0.4])]
    assert [w["text"] for w in fixed[0]["words"]] == ["BIG", "SALE"]
    assert fixed[0]["words"][0]["box"][0] == 0.1 and fixed[0]["words"][1]["box"][2] == 0.9
    merged = retext(lines, "BIG SALE NOW")  # other line count: the box around them all
    assert merged[0]["box"] == [0.1, 0.1, 0.9, 0.4]
    assert retext(lines, "") == [] and json.dumps(retext([], "X")) == "[]"
