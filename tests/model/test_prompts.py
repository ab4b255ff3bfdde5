"""The label vocabulary both ways: captions phrased from labels, prompts read back."""

from __future__ import annotations

import pytest

from components.config import load_params
from components.labelling.captions import caption, vocabulary
from components.models.prompts import PHRASES, Vocabulary, normalise, phrasings, read_prompt

ROW = {"background": "red", "background_kind": "gradient", "gradient_to": "pink",
       "layout": "top", "figure_size": "small", "saturation": "vivid", "logo": "yes",
       "text": "SUMMER SALE", "description": "", "format": "poster"}


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return vocabulary(load_params())


def test_phrasings_are_deterministic_varied_and_say_colour_and_text() -> None:
    first = phrasings(ROW, 12, "img-1")
    assert first == phrasings(ROW, 12, "img-1") and first != phrasings(ROW, 12, "img-2")
    assert len(set(first)) == 12
    assert all("red" in c.lower() and '"SUMMER SALE"' in c for c in first)
    bare = phrasings({**ROW, "text": ""}, 12, "img-1")  # the same draws without the text
    assert all('"' not in c and "red" in c.lower() for c in bare)


@pytest.mark.parametrize("field", ["layout", "logo", "figure_size", "background_kind"])
def test_every_phrase_reads_back_as_its_value(field: str, vocab: Vocabulary) -> None:
    for value, options in PHRASES[field].items():
        for words in options:
            got = read_prompt(f"red poster, {words}", vocab).fields.get(field)
            assert got == value, (words, got)


def test_each_phrasing_of_a_row_reads_back_as_its_labels(vocab: Vocabulary) -> None:
    for seed in range(40):
        for text in phrasings(ROW, 4, f"s{seed}"):
            f = read_prompt(text, vocab).fields
            assert f["background"] == "red", text
            for k in ("layout", "logo", "figure_size", "saturation", "gradient_to"):
                assert f.get(k, ROW[k]) == ROW[k], (k, text)


@pytest.mark.parametrize(("prompt", "want"), [
    ("An orange flyer, headline up top, put our logo on it",
     {"background": "orange", "layout": "top", "logo": "yes", "format": "poster"}),
    ("navy poster, no logo please, words in the middle",
     {"background": "blue", "logo": "no", "layout": "centre", "format": "poster"}),
    ("crimson to gold fade", {"background": "red", "gradient_to": "yellow",
                              "background_kind": "gradient"}),
    ("teal background fading into yellow", {"background": "teal", "gradient_to": "yellow",
                                            "background_kind": "gradient"}),
    ("pastel green, right-aligned text, logo-free", {"background": "green",
                                                     "saturation": "soft",
                                                     "layout": "right", "logo": "no"}),
    ('a poster saying "RED SALE AT THE TOP"', {"format": "poster"}),  # quotes are not read
    ("don't add the logo, blue", {"logo": "no", "background": "blue"}),
    ("blue, logo, no logo elsewhere, logo", {"logo": "yes", "background": "blue"}),
])
def test_read_prompt_known_answers(prompt: str, want: dict, vocab: Vocabulary) -> None:
    assert read_prompt(prompt, vocab).fields == want


def test_colour_words_map_to_the_nearest_palette_hue_and_greys_only_to_greys(
        vocab: Vocabulary) -> None:
    assert {w: vocab.colours[w] for w in ("navy", "crimson", "turquoise", "scarlet",
                                          "emerald", "gold")} == {
        "navy": "blue", "crimson": "red", "turquoise": "teal", "scarlet": "red",
        "emerald": "green", "gold": "yellow"}
    assert "white" not in vocab.colours and "grey" not in vocab.colours  # no greys: unsaid
    assert "violet" not in vocab.colours  # as near purple as pink: ambiguous, left out
    dark = vocabulary(load_params(overrides=[
        "brand.palette={red: '#e63946', blue: '#2f6fdb', black: '#111111', white: '#fafafa'}"]))
    assert dark.colours["black"] == "black" and dark.colours["ivory"] == "white"
    assert dark.colours["crimson"] == "red" and dark.colours["navy"] == "blue"


def test_normalise_rewrites_in_canonical_words_and_leaves_template_prompts(
        vocab: Vocabulary) -> None:
    params = load_params()
    template = caption({**ROW, "background_kind": "solid", "gradient_to": "none"},
                       params.labels.caption_template)
    assert normalise(template, vocab) == template
    assert normalise('Make a crimson flyer that says "HI" up top, with our logo', vocab) == \
        'red poster, text at the top, logo yes, reading "HI".'
    assert normalise("a nice picture", vocab) == "a nice picture"  # nothing it knows
    # the first phrasing of each image is in those words: what normalised prompts look like
    for seed in range(20):
        first = phrasings(ROW, 1, f"s{seed}")[0]
        assert normalise(first, vocab) == first
