"""Captions: the label fields through `labels.caption_template`, and their length in the text
encoder's own tokens."""

from __future__ import annotations

from components.config import Params
from components.contracts import (
    CAPTION_FIELDS,
)


def caption(row: dict, template: str) -> str:
    """The template filled with a row's fields (text and description flattened to one line);
    an empty field leaves no double spaces."""
    values = {f: " ".join(str(row.get(f, "") or "").split()) for f in CAPTION_FIELDS}
    return " ".join(template.format(**values).split()).removesuffix(" .").strip()


def token_counts(params: Params, captions: list[str]) -> tuple[list[int], int | None]:
    """Caption lengths in the chosen text encoder's own tokens, and its limit (tfidf has
    none: words are counted)."""
    if params.text_encoder.name == "tfidf":
        return [len(c.split()) for c in captions], None
    from components.models.text_encoders import get_encoder

    enc = get_encoder(params.text_encoder)
    return (enc.count_tokens(captions) if captions else []), enc.max_tokens
