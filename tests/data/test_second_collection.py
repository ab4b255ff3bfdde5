"""The labellers and OCR on material tinyldm did not make: the second collection
(tests/second_collection.py, seed 0; never tuned on), and known-answer images for the
cases it showed (a letter or a circle is not the logo, a logo on a halftone is, black and
white backgrounds, text on a card, a footer beside a headline, text on a texture)."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from components.config import Brand, load_params
from components.ingest.ocr import cer, read_many, read_words
from components.labelling.labeller import auto_labels, label_background

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from second_collection import (  # noqa: E402
    FONTS,
    PALETTE,
    logo_shape,
    render,
    rgb,
    write_brand,
    write_collection,
)

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ["background", "background_kind", "gradient_to", "layout", "figure_size",
          "saturation", "logo"]


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def brand(tmp_path_factory):
    return Brand(**write_brand(tmp_path_factory.mktemp("brand")))


def test_the_second_collection_is_its_own_and_deterministic() -> None:
    source = (Path(__file__).resolve().parents[1] / "second_collection.py").read_text()
    assert "synthetic" not in source.split('"""', 2)[2]  # no code of the built-in generator
    a, ta, ea = render(3, 0)
    b, tb, eb = render(3, 0)
    assert ta == tb and ea == eb and a.tobytes() == b.tobytes()
    assert render(3, 1)[0].tobytes() != a.tobytes()


def test_labels_and_ocr_on_forty_images_of_the_second_collection(tmp_path, params,
                                                                  brand) -> None:
    """Measured on these 40 (seed 0): background, kind, gradient colour, saturation and
    logo 1.0 (logo precision and recall 1.0), layout 0.95, figure size 0.875, OCR CER 0.089
    (bench/bench_second_collection.py, 150 images of seed 1: docs/lab). The floors
    leave an image or two of slack."""
    rows = write_collection(tmp_path / "images", 40, 0)
    images = [Image.open(r["path"]).convert("RGB") for r in rows]
    reads = read_many(images, params.ocr)
    got = [auto_labels(im, json.loads(o["words"]), brand, params.labels)
           for im, o in zip(images, reads, strict=True)]
    acc = {f: sum(g[f] == r[f] for g, r in zip(got, rows, strict=True)) / 40 for f in FIELDS}
    for f in ["background", "background_kind", "gradient_to", "saturation", "logo"]:
        assert acc[f] >= 0.95, (f, acc)
    assert acc["layout"] >= 0.92 and acc["figure_size"] >= 0.82, acc
    said = Counter((r["logo"], g["logo"]) for g, r in zip(got, rows, strict=True))
    assert said[("no", "yes")] == 0 and said[("yes", "no")] <= 1, said
    errors = [cer(o["text"], r["text"]) for o, r in zip(reads, rows, strict=True)]
    assert sum(errors) / 40 <= 0.11, errors


def _poster(size: tuple[int, int], colour: str) -> Image.Image:
    return Image.new("RGB", size, rgb(PALETTE[colour]))


def _text(im: Image.Image, xy: tuple, text: str, px: int, fill: tuple) -> None:
    ImageDraw.Draw(im).text(xy, text, font=ImageFont.truetype(FONTS[3], px), fill=fill)


def _ring(im: Image.Image, xy: tuple, side: int, fill: tuple) -> None:
    im.paste(Image.new("RGB", (side, side), fill), xy, logo_shape("ring", side))


def test_round_letters_and_circles_are_not_the_ring_logo_but_the_ring_is(params,
                                                                          brand) -> None:
    im = _poster((384, 384), "blue")
    _text(im, (40, 150), "GOOD FOOD", 64, (255, 255, 255))  # O's the ring's size
    ImageDraw.Draw(im).ellipse((280, 290, 340, 350), fill=(255, 255, 255))  # a disk
    ImageDraw.Draw(im).ellipse((40, 290, 100, 350), outline=(255, 255, 255), width=3)
    words = json.loads(read_words(im, params.ocr)["words"])
    for read in ([], words):  # letters crowd each other; OCR also says they are a word
        assert auto_labels(im, read, brand, params.labels)["logo"] == "no"
    _ring(im, (300, 24), 60, (255, 255, 255))
    assert auto_labels(im, words, brand, params.labels)["logo"] == "yes"
    edge = [{"text": "TOP", "conf": 90, "box": [0, 0, 384, 4]}]  # a word at the very top
    assert auto_labels(im, edge, brand, params.labels)["logo"] == "yes"  # bars only itself


def test_a_logo_on_a_halftone_is_found(params, brand) -> None:
    im = _poster((384, 384), "gold")
    draw = ImageDraw.Draw(im)
    for y in range(0, 384, 9):  # dots of a darker shade on a grid
        for x in range(0, 384, 9):
            draw.ellipse((x + 2, y + 2, x + 6, y + 6), fill=(120, 90, 0))
    assert auto_labels(im, [], brand, params.labels)["background_kind"] == "texture"
    assert auto_labels(im, [], brand, params.labels)["logo"] == "no"
    _ring(im, (290, 290), 64, (20, 20, 20))
    assert auto_labels(im, [], brand, params.labels)["logo"] == "yes"


@pytest.mark.parametrize("colour", ["black", "white"])
def test_a_black_or_white_background_is_named_as_the_brand_names_it(colour, params,
                                                                      brand) -> None:
    """Greys have no hue: a palette with black and white names a grey pixel by lightness
    (and a grey is drawn as it is: saturation vivid)."""
    got = label_background(_poster((256, 256), colour), brand, params.labels)
    assert (got["background"], got["saturation"]) == (colour, "vivid")
    tinted = label_background(_poster((256, 256), "green"), brand, params.labels)
    assert tinted["background"] == "green"


def test_text_on_a_card_a_footer_and_text_on_grain_are_read(params) -> None:
    card = _poster((576, 192), "green")
    ImageDraw.Draw(card).rounded_rectangle((230, 70, 340, 120), radius=10, fill="white")
    _text(card, (246, 80), "CHOIR", 26, (20, 20, 20))
    assert read_words(card, params.ocr)["text"] == "CHOIR"

    footer = _poster((384, 384), "red")
    _text(footer, (60, 120), "BREAD", 80, (255, 255, 255))
    _text(footer, (250, 330), "ALL WELCOME", 16, (255, 255, 255))
    assert cer(read_words(footer, params.ocr)["text"], "BREAD\nALL WELCOME") == 0

    import numpy as np

    rng = np.random.default_rng(0)
    grain = np.asarray(_poster((384, 384), "violet"), np.float32)
    grain = Image.fromarray(np.clip(grain + rng.normal(0, 38, (384, 384, 1)), 0, 255)
                            .astype(np.uint8))
    _text(grain, (70, 150), "POTTERY", 56, (255, 255, 255))
    assert read_words(grain, params.ocr)["text"] == "POTTERY"


@pytest.mark.parametrize("shape", ["disk", "tile"])
def test_a_shape_without_the_logos_holes_is_not_the_logo(shape, brand) -> None:
    """A white disk correlates with the ring, a rounded tile with the monogram (0.6-0.7,
    above the 0.5 threshold): only the holes tell them apart."""
    from components.labelling.labeller import find_logo, segment

    im = _poster((256, 256), "blue")
    box = (150, 150, 200, 200)
    if shape == "disk":
        ImageDraw.Draw(im).ellipse(box, fill="white")
    else:
        ImageDraw.Draw(im).rounded_rectangle(box, radius=8, fill="white")
    seg = segment(im)
    assert find_logo(seg, brand.logos, 0.5, holes=False)[0] == "yes"
    assert find_logo(seg, brand.logos, 0.5)[0] == "no"
