"""Text that reads: the typeset option and the OCR text metrics, on known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from components.config import load_params
from components.contracts import UserError
from components.ingest.ocr import read_texts
from components.judge.text import scores, text_cases
from components.models.glyphs import glyph_map
from components.models.layout import parse_box
from components.models.prompts import read_prompt
from components.models.typeset import typeset

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
RED, CREAM = (230, 57, 70), (250, 240, 220)


@pytest.fixture(scope="module")
def params():
    return load_params(PARAMS)


def test_scores_known_answers() -> None:
    got = scores(["summer  SAIE", "", "OPEN\nHOUSE"], ["SUMMER SALE", "OPEN", "OPEN HOUSE"])
    assert got["word_recall"] == round(3 / 5, 4)  # SUMMER, OPEN, HOUSE of 5 words
    assert got["exact"] == round(1 / 3, 4)        # line breaks are spaces
    assert got["cer"] == round((1 / 11 + 1 + 0) / 3, 4)
    assert scores([], []) == {}


def test_ocr_text_metrics_on_a_legible_and_a_blank_image(params) -> None:
    lines = [{"text": "OPEN HOUSE", "box": [0.08, 0.4, 0.92, 0.6], "words": []}]
    legible = Image.new("RGB", (128, 128), RED)
    legible.paste(Image.new("RGB", legible.size, "white"), (0, 0),
                  glyph_map(lines, 128, 128, FONT))
    blank = Image.new("RGB", (128, 128), RED)
    reads = read_texts([legible, blank], params.ocr)
    assert scores(reads[:1], ["OPEN HOUSE"]) == {"word_recall": 1.0, "exact": 1.0, "cer": 0.0}
    assert scores(reads[1:], ["OPEN HOUSE"]) == {"word_recall": 0.0, "exact": 0.0, "cer": 1.0}


def test_typeset_writes_exactly_the_requested_words_in_the_models_ink(params) -> None:
    # a "generated" 800 px image: red, with the model's own blurry cream letters (not the
    # requested words) where the text was planned
    lines = [{"text": "SUMMER SALE", "box": [0.1, 0.42, 0.9, 0.58], "words": []}]
    scribble = glyph_map([{**lines[0], "text": "SUNMFR SAIF"}], 800, 800, FONT)
    image = Image.new("RGB", (800, 800), RED)
    image.paste(Image.new("RGB", image.size, CREAM), (0, 0),
                scribble.filter(ImageFilter.GaussianBlur(2)))
    out = typeset(image, lines, FONT)
    assert out.size == (800, 800)
    assert read_texts([out], params.ocr) == ["SUMMER SALE"]
    px = np.asarray(out).reshape(-1, 3).astype(int)
    ink = np.asarray(glyph_map(lines, 800, 800, FONT)).reshape(-1) == 255
    paper = np.asarray(glyph_map(lines, 800, 800, FONT).filter(ImageFilter.MaxFilter(9))
                       ).reshape(-1) == 0
    assert np.abs(px[ink] - CREAM).max() <= 40          # the model's ink colour, kept
    assert np.abs(px[paper] - RED).max() <= 2           # its letters painted over: red
    assert typeset(image, [], FONT) is image            # no text, nothing to do


def test_prompt_layout_words_and_text_boxes() -> None:
    def layout_of(prompt: str) -> str | None:
        return read_prompt(prompt).fields.get("layout")

    assert layout_of('vivid red solid poster, text at the top, reading "LEFT OVERS"') == "top"
    assert layout_of("an orange flyer, headline centered") == "centre"
    assert layout_of("a blue poster") is None
    assert parse_box("0.1, 0.4,0.8,0.2") == (0.1, 0.4, 0.8, 0.2)
    with pytest.raises(UserError, match="x,y,w,h"):
        parse_box("0.1,0.4")


def test_text_cases_split_seen_and_unseen_words(params) -> None:
    cases = text_cases(params, {"SALE", "OPEN", "SUMMER"})
    assert len(cases) == params.evaluate.text_images
    seen = [c for c in cases if c["kind"] == "seen"]
    unseen = [c for c in cases if c["kind"] == "unseen"]
    assert len(seen) == len(unseen)
    assert all(set(c["text"].split()) <= {"SALE", "OPEN", "SUMMER"} for c in seen)
    assert not any(set(c["text"].split()) & {"SALE", "OPEN", "SUMMER"} for c in unseen)
    assert all(f'reading "{c["text"]}"' in c["prompt"] for c in cases)
    assert cases == text_cases(params, {"SALE", "OPEN", "SUMMER"})  # deterministic


def test_a_prompt_without_a_layout_word_takes_the_trainings_usual_one() -> None:
    """A collection whose text is always at the top: "a poster reading SALE" is planned
    there, not at a centre the model never saw; a layout word still wins."""
    from types import SimpleNamespace

    from components.models.generator import GREEKED, Generator
    from components.models.layout import fit_layouts

    top = [{"text": "SALE", "box": [0.2, 0.05, 0.8, 0.2], "words": []}]
    bottom = [{"text": "SALE", "box": [0.2, 0.8, 0.8, 0.95], "words": []}]
    gen = Generator.__new__(Generator)
    gen.layout_stats = fit_layouts([("top", top), ("top", top), ("bottom", bottom)])
    gen.font_path, gen.latent_shape, gen.vae = FONT, (4, 16, 16), SimpleNamespace(down_factor=4)
    gen.formats = {}  # squares only
    gen.vocabulary = None  # a model from before vocabulary.json
    plain, asked = gen.text_layouts(['a poster reading "SALE"',
                                     'a poster, text at the bottom, reading "SALE"'])
    assert plain[0]["box"][3] <= 0.5 and asked[0]["box"][1] >= 0.5
    # a layout asked for without words: greeked lines there; neither: no text at all
    greeked, bare = gen.text_layouts(["a poster, title along the bottom", "a blue poster"])
    assert greeked[0]["box"][1] >= 0.5 and set(greeked[0]["text"]) <= {GREEKED[0], " "}
    assert bare == []


class _Perfect:
    """A stand-in generator that writes exactly the requested words where its layouts say,
    white on red, at the native size (64 px) and, through a stand-in upscaler, sharp at 4x
    the size where the sample has ink: known answers for the text metrics."""

    native_size, font_path = 64, FONT
    upscaler = type("Up", (), {"factor": 4, "glyphs": True})()
    vae = type("Vae", (), {"encode": lambda self, x: (x, None), "decode": lambda self, z: z})()

    def text_layouts(self, prompts, seed):
        return [[{"text": p.split('"')[1], "box": [0.05, 0.35, 0.95, 0.65], "words": []}]
                for p in prompts]

    @staticmethod
    def draw(lines, side):
        im = Image.new("RGB", (side, side), RED)
        im.paste(Image.new("RGB", im.size, "white"), (0, 0), glyph_map(lines, side, side, FONT))
        return im

    def generate(self, prompts, seed, layouts):
        return [self.draw(lines, self.native_size) for lines in layouts]

    def to_size(self, images, width, height, layouts):
        inked = [np.asarray(im).reshape(-1, 3).std(0).max() > 0 for im in images]
        return [self.draw(lines if ink else [], width)
                for ink, lines in zip(inked, layouts, strict=True)]


def test_text_metrics_known_answers_with_a_perfect_generator(params) -> None:
    """Every requested word read at text_side (256 px); the control (no ink from the
    U-Net, the map for the upscaler) reads nothing; the typeset outputs read exactly."""
    import pandas as pd

    from components.judge.text import text_metrics

    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(
        update={"text_images": 8})})
    train = pd.DataFrame({"text_boxes": ['[{"text": "SALE NOW", "box": [0, 0, 1, 1]}]']})
    val = pd.DataFrame({"text_boxes": ["[]"], "format": ["poster"], "path": ["none.png"]})
    metrics, grid = text_metrics(_Perfect(), params, train, val)
    assert metrics["text_side"] == 256 and metrics["text_images"] == 8
    assert metrics["text_word_recall"] == 1.0 and metrics["text_exact"] == 1.0
    assert metrics["text_word_recall_unseen"] == 1.0
    assert metrics["text_word_recall_map_only"] == 0.0
    assert metrics["text_exact_typeset"] == 1.0
    assert grid is not None
