"""A prompt's words and the label vocabulary, both ways: the ways to say each label value
(PHRASES), captions phrased from them (`phrasings`: labels.caption_variants per image), and
the prompt normaliser that reads them back (`read_prompt`, `normalise`: sampler.normalise).

The vocabulary a model knows (its palette with the colour words nearest each name, its
saturation levels and formats) is written by the latents stage and travels with the model
(vocabulary.json), so a served model reads prompts as its own training data named things.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")

# label value -> the ways to say it, the first the canonical one (what `normalise` writes,
# in the caption template's own words). Values of a user's own label system that are not
# here (a palette colour, a saturation level) are said by their name.
PHRASES: dict[str, dict[str, list[str]]] = {
    "layout": {
        "top": ["text at the top", "headline up top", "title at the top", "text along the top",
                "words on top", "top-aligned text", "upper text"],
        "bottom": ["text at the bottom", "text along the bottom", "words at the foot",
                   "caption at the bottom", "bottom-aligned text", "lower text"],
        "centre": ["text at the centre", "centred text", "text in the middle",
                   "centered text", "text in the center", "middle text"],
        "left": ["text at the left", "text on the left", "left-aligned text",
                 "words on the left side", "text to the left"],
        "right": ["text at the right", "text on the right", "right-aligned text",
                  "words on the right side", "text to the right"],
    },
    "logo": {
        "yes": ["logo yes", "with our logo", "with the logo", "logo included", "brand mark",
                "logo in the corner", "branded", "add the logo", "with logo"],
        "no": ["logo no", "no logo", "without a logo", "without the logo", "unbranded",
               "no branding", "no brand mark", "logo-free", "without logo"],
    },
    "figure_size": {
        "none": ["figures none", "no figures", "no shapes", "without shapes",
                 "no decorations"],
        "small": ["figures small", "small figures", "small shapes", "little shapes",
                  "a few small shapes"],
        "medium": ["figures medium", "medium figures", "medium shapes", "mid-sized shapes"],
        "large": ["figures large", "large figures", "large shapes", "big shapes",
                  "big figures"],
    },
    "background_kind": {
        "solid": ["solid", "flat", "plain", "single-colour", "uniform"],
        "gradient": ["gradient", "fade", "ombre", "blended", "graded"],
        "texture": ["texture", "textured", "photo", "photographic", "grainy", "patterned"],
    },
    "saturation": {
        "vivid": ["vivid", "bright", "bold", "saturated", "vibrant"],
        "soft": ["soft", "pastel", "gentle", "light"],
        "muted": ["muted", "dull", "subdued", "desaturated", "dusty"],
    },
    "format": {
        "poster": ["poster", "flyer", "graphic", "design", "ad"],
        "portrait": ["portrait", "post", "feed post"],
        "story": ["story", "vertical", "reel cover"],
        "landscape": ["landscape", "widescreen", "slide"],
        "banner": ["banner", "header", "web banner"],
        "strip": ["strip", "leaderboard", "wide strip"],
    },
}
GRADIENT_TO = ["fading to {}", "into {}", "fading into {}", "blending to {}", "to {}"]
TEXT = ["reading \"{}\"", "that says \"{}\"", "with the words \"{}\"", "headline \"{}\"",
        "\"{}\"", "saying \"{}\"", "the text \"{}\"", "title \"{}\""]
OPENERS = ["", "", "a ", "Make a ", "Design a ", "I need a ", "Create a "]
LAYOUT_WORDS = {"top": "top", "up top": "top", "upper": "top", "bottom": "bottom",
                "lower": "bottom", "centre": "centre", "center": "centre",
                "centred": "centre", "centered": "centre", "middle": "centre",
                "left": "left", "right": "right"}  # a layout said in one word
LOGO_WORDS = ["logo", "brand mark", "branding", "our mark", "emblem"]  # a logo, said alone
NEGATION = re.compile(r"\b(no|without|not|don't|do not|never)\s+(an?\s+|the\s+|our\s+|any\s+)?$")


def phrase(field_: str, value: str, rng: random.Random | None = None) -> str:
    """One way to say a label value: the canonical one, or one drawn by rng."""
    options = PHRASES.get(field_, {}).get(value)
    if not options:
        return value
    return options[0] if rng is None else rng.choice(options)


# how often a phrasing says each label (users leave some unsaid); the colour always
SAID = {"saturation": 0.6, "background_kind": 0.5, "format": 0.5, "gradient_to": 0.3,
        "layout": 0.85, "logo": 0.75, "figure_size": 0.5}


def phrasings(row: dict, n: int, seed: str) -> list[str]:
    """n captions of one image's labels in other words than the template: first in the
    canonical words `normalise` reads prompts into, then synonyms, orders, sentences and
    tag lists; attributes sometimes left unsaid (as users leave them, SAID), the
    background colour and the quoted text always said. Deterministic in `seed` (e.g. the
    image id); a row without text gives the same captions minus it."""
    text = " ".join(str(row.get("text") or "").split())
    desc = " ".join(str(row.get("description") or "").split())
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}|{i}")

        def said(share: float, rng: random.Random = rng) -> bool:
            return rng.random() < share
        if i == 0:  # a gradient (or texture) is always said, "fading to none" seldom
            always = {"background_kind", "gradient_to"} if row.get("background_kind") not in \
                (None, "", "solid") else set()
            keep = {k for k, share in SAID.items() if k in always or said(share)}
            fields = {k: v for k, v in row.items() if k in keep or k == "background"}
            out.append(" ".join(f"{canonical(fields, text)} {desc}".split()))
            continue
        kind, to = row.get("background_kind", ""), row.get("gradient_to", "none")
        colour = [phrase("saturation", row["saturation"], rng)] if said(SAID["saturation"]) \
            and row.get("saturation") else []
        colour.append(row["background"])
        if kind and (kind != "solid" or said(SAID["background_kind"])):
            colour.append(phrase("background_kind", kind, rng))
        noun = phrase("format", row["format"], rng) if row.get("format") else "poster"
        head = " ".join([*colour, noun]) if said(0.7) else f"{noun} on {' '.join(colour)}"
        if kind == "gradient" and to and to != "none":  # said after the colour it leaves
            head += ", " + rng.choice(GRADIENT_TO).format(to)
        clauses = [phrase(f, row[f], rng) for f in ("layout", "logo", "figure_size")
                   if row.get(f) and said(SAID[f])]
        rng.shuffle(clauses)
        if text:
            clauses.insert(rng.randrange(len(clauses) + 1), rng.choice(TEXT).format(text))
        style = rng.random()
        if style < 0.45:  # a tag list
            body = ", ".join([head, *clauses])
        elif style < 0.8:  # a sentence
            rest = ", ".join(clauses).removeprefix("with ")
            body = rng.choice(OPENERS) + head + (" with " + rest if rest else "")
        else:  # clauses first
            body = ", ".join([*clauses, head])
        out.append(" ".join(f"{body[:1].upper()}{body[1:]}. {desc}".split()))
    return out


@dataclass
class Vocabulary:
    """What a model's captions name: colour words -> palette names (the palette's own
    names and the colour words nearest each), saturation levels, formats."""
    colours: dict[str, str] = field(default_factory=dict)
    saturation: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)


@dataclass
class Reading:
    """The label values a prompt asks for (field -> value) and its quoted text."""
    fields: dict[str, str]
    text: str


def quoted_text(prompt: str) -> str:
    """The text the prompt asks to show: its quoted part ("" when it quotes nothing)."""
    m = QUOTED.search(prompt)
    return " ".join((m.group(1) or m.group(2)).split()) if m else ""


def _terms(vocab: Vocabulary) -> list[tuple[str, str, str]]:
    """(words, field, value) a prompt may say, longest first (so "no logo" wins over
    "logo", "text at the top" over "top")."""
    terms = [(p, f, v) for f, values in PHRASES.items() if f not in ("saturation", "format")
             for v, ps in values.items() for p in ps]
    terms += [(p, "saturation", v) for v in vocab.saturation
              for p in {v, *PHRASES["saturation"].get(v, [])}]
    terms += [(p, "format", v) for v in vocab.formats for p in {v, *PHRASES["format"].get(v, [])}]
    terms += [(w, "colour", v) for w, v in vocab.colours.items()]
    terms += [(w, "layout", v) for w, v in LAYOUT_WORDS.items()]
    terms += [(w, "logo", "yes") for w in LOGO_WORDS]
    terms += [(GRADIENT_TO[0].format("none"), "gradient_to", "none")]  # the template's own
    return sorted(set(terms), key=lambda t: -len(t[0]))


def read_prompt(prompt: str, vocab: Vocabulary | None = None) -> Reading:
    """What a prompt asks for, read outside its quoted text: the first saying of each
    field wins; the first colour is the background, a colour after "to"/"into" the
    gradient's end; a logo after "no"/"without" is "no"."""
    vocab = vocab or Vocabulary()
    rest = QUOTED.sub(" | ", prompt).lower()
    found: list[tuple[int, str, str]] = []  # (position, field, value)
    taken = [False] * len(rest)
    for words, f, v in _terms(vocab):
        for m in re.finditer(r"(?<!\w)" + re.escape(words) + r"(?!\w)", rest):
            if any(taken[m.start():m.end()]):
                continue
            taken[m.start():m.end()] = [True] * (m.end() - m.start())
            negated = f == "logo" and NEGATION.search(rest[:m.start()])
            found.append((m.start(), f, "no" if negated else v))
    fields: dict[str, str] = {}
    for pos, f, v in sorted(found):
        if f == "colour":
            after_to = re.search(r"\b(to|into|towards)\s+(the\s+)?$", rest[:pos])
            if "background" in fields and after_to and "gradient_to" not in fields:
                fields["gradient_to"] = v
                fields.setdefault("background_kind", "gradient")
            elif "background" not in fields:
                fields["background"] = v
            continue
        fields.setdefault(f, v)
    if fields.get("background_kind") not in (None, "gradient") and \
            fields.get("gradient_to") != "none":
        fields.pop("gradient_to", None)
    return Reading(fields, quoted_text(prompt))


def normalise(prompt: str, vocab: Vocabulary) -> str:
    """The prompt in the captions' canonical words (the label values it names, in the
    caption template's order, and its quoted text); unchanged when it names none. A
    prompt written with the default caption template comes back as it was."""
    r = read_prompt(prompt, vocab)
    if not r.fields.keys() & {"background", "layout", "logo", "figure_size",
                              "background_kind"}:
        return prompt
    return canonical(r.fields, r.text)


def canonical(fields: dict, text: str = "") -> str:
    """Label values in the captions' canonical words, in the caption template's order,
    the ones not given left out (what `normalise` writes)."""
    f = {k: v for k, v in fields.items() if v}
    head = [phrase("saturation", f["saturation"]) if "saturation" in f else "",
            f.get("background", ""), phrase("background_kind", f.get("background_kind", "")),
            f.get("format", "")]
    clauses = [" ".join(w for w in head if w)]
    if f.get("gradient_to"):
        clauses.append(GRADIENT_TO[0].format(f["gradient_to"]))
    clauses += [phrase(k, f[k]) for k in ("layout", "figure_size", "logo") if k in f]
    if text:
        clauses.append(TEXT[0].format(text))
    return ", ".join(c for c in clauses if c) + "."
