"""Captions: the label fields through `labels.caption_template`, the vocabulary a model's
prompts are read with (models/prompts.py), and caption lengths in the text encoder's own
tokens."""

from __future__ import annotations

import colorsys

from PIL import ImageColor

from components.config import Params
from components.contracts import (
    CAPTION_FIELDS,
    TEXT_FIELDS,
)
from components.models.prompts import Vocabulary

# colour words users say that CSS does not name (CSS's 148 names are read too)
MORE_COLOURS = {"scarlet": "#ff2400", "amber": "#ffbf00", "emerald": "#50c878",
                "mint": "#98ff98", "lilac": "#c8a2c8", "mustard": "#e1ad01", "rose": "#ff007f",
                "peach": "#ffcba4", "cobalt": "#0047ab", "lemon": "#fff44f", "ruby": "#e0115f",
                "sapphire": "#0f52ba", "cherry": "#d2042d", "tangerine": "#f28500",
                "grey": "#808080", "gray": "#808080"}
GREY_BELOW = 0.25  # HSV saturation under which a colour word (or palette colour) is a grey
WORD_CONFIDENCE = 0.53  # a colour word maps to a palette colour only this clearly nearest


def caption(row: dict, template: str) -> str:
    """The template filled with a row's fields (text and description flattened to one line);
    an empty field leaves no double spaces."""
    values = {f: " ".join(str(row.get(f, "") or "").split()) for f in CAPTION_FIELDS}
    return " ".join(template.format(**values).split()).removesuffix(" .").strip()


def without_text(row: dict) -> dict:
    """The row without its free text (what the image reads, a description)."""
    return {**row, **dict.fromkeys(TEXT_FIELDS, "")}


def _hsv(colour: str | tuple) -> tuple[float, float, float]:
    """A colour (#hex, a name, or an RGB tuple: PIL's colormap caches names it read as
    tuples) in HSV, 0-1."""
    rgb = ImageColor.getrgb(colour) if isinstance(colour, str) else colour
    return colorsys.rgb_to_hsv(*(v / 255 for v in rgb[:3]))


def vocabulary(params: Params) -> Vocabulary:
    """The words a prompt may name this label system's values with: each palette name,
    and each colour word (CSS's and MORE_COLOURS) whose hue is clearly nearest one palette
    colour (a grey word: the palette's grey nearest in lightness, when it has greys)."""
    palette = {n: _hsv(c) for n, c in params.brand.palette.items()}
    greys = {n: v for n, (_, s, v) in palette.items() if s < GREY_BELOW}
    hues = {n: h for n, (h, s, _) in palette.items() if s >= GREY_BELOW}
    colours = {}
    for word, hex_colour in {**ImageColor.colormap, **MORE_COLOURS}.items():
        h, s, v = _hsv(hex_colour)
        if s < GREY_BELOW or v < GREY_BELOW:
            if greys:
                colours[word] = min(greys, key=lambda n: abs(greys[n] - v))
            continue
        if len(hues) < 2:
            continue
        (d1, name), (d2, _) = sorted((min(abs(h - ph), 1 - abs(h - ph)), n)
                                     for n, ph in hues.items())[:2]
        if 1 - d1 / max(d1 + d2, 1e-9) >= WORD_CONFIDENCE:
            colours[word] = name
    colours |= {n: n for n in params.brand.palette}  # its own names win
    return Vocabulary(colours, list(params.labels.saturation_levels),
                      list(params.formats.buckets))


def token_counts(params: Params, captions: list[str]) -> tuple[list[int], int | None]:
    """Caption lengths in the chosen text encoder's own tokens, and its limit (tfidf has
    none: words are counted)."""
    if params.text_encoder.name == "tfidf":
        return [len(c.split()) for c in captions], None
    from components.models.text_encoders import get_encoder

    enc = get_encoder(params.text_encoder)
    return (enc.count_tokens(captions) if captions else []), enc.max_tokens
