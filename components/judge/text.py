"""Text metrics: does the model write the words a prompt asks for?

Held-out text prompts (the captions' own words, attributes cycling as in the adherence
prompts) ask for one or two words: half from the words the training images show, half
from evaluate.text_unseen, words no training image has. Each generated image is read by
the pipeline's OCR at the size the model draws (`text_side`: the native size through the
learned upscaler, as `generate` delivers that size; the native size without one), and
compared with the requested text: word recall (share of requested words read), whole-text
exact share, and CER. The same OCR on real val images at the same size, against their own
text (text_boxes), is the ceiling this OCR allows at that size: `text_recall_ratio` =
generated / real. The same images through the VAE (encoded, decoded, upscaled) give
`text_*_vae`: what any U-Net can reach through these decoders. (At the native size itself
nothing the model draws reads: docs/lab/2026-12-glyph-conditioning.md.)
`text_word_recall_map_only` is the control for an upscaler that reads glyph maps: the
same prompts sampled with an empty glyph map (the U-Net puts no ink where the text goes),
upscaled with the prompts' maps: the words the upscaler writes on its own.
`text_exact_typeset` checks the typeset option: the same images at 800 x 800 with their
text typeset over them, read whole.
"""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from components.config import Params
from components.ingest.ocr import cer, normalise, read_texts
from components.labelling import text_boxes
from components.labelling.captions import caption
from components.labelling.labeller import LAYOUTS
from components.models.buckets import nearest
from components.models.generator import Generator
from components.models.images import load_batch, to_pil
from components.models.typeset import typeset

TYPESET_SIDE = 800  # the typeset check's output size (generate's largest)


def shown_words(rows: pd.DataFrame) -> set[str]:
    """The words the images of `rows` show (their text_boxes), upper-cased."""
    return {w.upper() for b in rows["text_boxes"] for ln in text_boxes.loads(b)
            for w in ln["text"].split()}


def text_cases(params: Params, train_words: set[str]) -> list[dict]:
    """evaluate.text_images prompts, alternately from the training words ("seen") and
    from evaluate.text_unseen minus any a training image shows ("unseen"); one or two
    words each, deterministic."""
    seen = sorted(train_words)
    unseen = sorted({w.upper() for w in params.evaluate.text_unseen} - train_words)
    colours, levels = list(params.brand.palette), list(params.labels.saturation_levels)
    cases = []
    for k in range(params.evaluate.text_images):
        kind = "seen" if k % 2 == 0 or not unseen else "unseen"
        pool = seen if kind == "seen" else unseen
        if not pool:
            continue
        words = random.Random(k).sample(pool, min(len(pool), 1 + (k // 2) % 2))
        row = {"background": colours[k % len(colours)], "background_kind": "solid",
               "gradient_to": "none", "saturation": levels[k % len(levels)],
               "layout": LAYOUTS[(k // 2) % len(LAYOUTS)], "figure_size": "none",
               "logo": "no", "text": " ".join(words),
               "format": nearest(1, 1, params.formats.buckets)}
        cases.append({"kind": kind, "text": row["text"],
                      "prompt": caption(row, params.labels.caption_template)})
    return cases


def scores(reads: list[str], wanted: list[str]) -> dict:
    """Word recall (requested words read, case-insensitive), whole-text exact share and
    mean CER (upper-cased) of OCR readings against the requested texts."""
    n_words = found = exact = 0
    errors = []
    for got, want in zip(reads, wanted, strict=True):
        got_n, want_n = normalise(got).upper(), normalise(want).upper()
        words = want_n.split()
        read = got_n.split()
        n_words += len(words)
        found += sum(1 for w in words if w in read)
        exact += got_n == want_n
        errors.append(cer(got_n, want_n))
    if not wanted:
        return {}
    return {"word_recall": round(found / max(1, n_words), 4),
            "exact": round(exact / len(wanted), 4),
            "cer": round(float(np.mean(errors)), 4)}


def labelled_grid(images: list[Image.Image], labels: list[str], cell: int = 128,
                  cols: int = 8) -> Image.Image:
    """Images in rows of `cols`, each with its label (the requested text) under it."""
    pad = 18
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell, rows * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % cols) * cell, (i // cols) * (cell + pad)
        grid.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        draw.text((x + 3, y + cell + 3), label[:22], fill="black")
    return grid


def text_metrics(gen: Generator, params: Params, train: pd.DataFrame, val: pd.DataFrame
                 ) -> tuple[dict, Image.Image | None]:
    """The text metrics of `gen` (names text_*) and a grid of its text prompts' images
    with the requested text under each; ({}, None) when evaluate.text_images is 0."""
    n = params.evaluate.text_images
    if n == 0:
        return {}, None
    cases = text_cases(params, shown_words(train))
    native = gen.native_size
    side = native * (gen.upscaler.factor if gen.upscaler is not None else 1)
    metrics: dict = {"text_side": side}
    fake: list[Image.Image] = []  # at `side`, as generate delivers that size
    typeset_800: list[Image.Image] = []
    blind: list[Image.Image] = []  # the control below
    if cases:
        prompts = [c["prompt"] for c in cases]
        layouts = gen.text_layouts(prompts, params.evaluate.seed)
        fake = gen.to_size(gen.generate(prompts, seed=params.evaluate.seed, layouts=layouts),
                           side, side, layouts)
        if gen.upscaler is not None and gen.upscaler.glyphs:  # the control: no map for the
            # U-Net (so no ink where the text goes), the map for the upscaler alone
            blind = gen.to_size(gen.generate(prompts, seed=params.evaluate.seed,
                                             layouts=[[] for _ in prompts]), side, side,
                                layouts)
        if gen.font_path:  # the typeset option's check: exact words at 800 x 800
            typeset_800 = [typeset(im.resize((TYPESET_SIDE, TYPESET_SIDE),
                                             Image.Resampling.LANCZOS), lines, gen.font_path)
                           for im, lines in zip(fake, layouts, strict=True)]
    square = val["format"] == nearest(1, 1, params.formats.buckets)  # as the prompts are
    with_text = val[square & val["text_boxes"].map(lambda b: bool(text_boxes.loads(b)))].head(n)
    lines = [text_boxes.loads(b) for b in with_text["text_boxes"]]
    real, through_vae = [], []
    if len(with_text):
        x = load_batch(with_text["path"].tolist(), native)
        real = to_pil(load_batch(with_text["path"].tolist(), side))
        with torch.no_grad():
            through_vae = gen.to_size(to_pil(gen.vae.decode(gen.vae.encode(x)[0])), side, side,
                                      lines)
    parts = {"fake": fake, "real": real, "vae": through_vae, "typeset": typeset_800,
             "map_only": blind}
    reads = iter(read_texts([im for ims in parts.values() for im in ims], params.ocr))
    read = {k: [next(reads) for _ in ims] for k, ims in parts.items()}
    wanted = [c["text"] for c in cases]
    for kind in ("seen", "unseen"):
        pick = [i for i, c in enumerate(cases) if c["kind"] == kind]
        got = scores([read["fake"][i] for i in pick], [wanted[i] for i in pick])
        suffix = "" if kind == "seen" else "_unseen"
        metrics |= {f"text_{k}{suffix}": v for k, v in got.items()}
    truth = [" ".join(ln["text"] for ln in ls) for ls in lines]
    for part in ("real", "vae"):
        metrics |= {f"text_{k}_{part}": v for k, v in scores(read[part], truth).items()}
    if typeset_800:
        metrics["text_exact_typeset"] = scores(read["typeset"], wanted)["exact"]
    if blind:
        metrics["text_word_recall_map_only"] = scores(read["map_only"], wanted)["word_recall"]
    real_recall = metrics.get("text_word_recall_real")
    for suffix in ("", "_unseen"):
        if real_recall and f"text_word_recall{suffix}" in metrics:
            metrics[f"text_recall_ratio{suffix}"] = round(
                metrics[f"text_word_recall{suffix}"] / real_recall, 4)
    metrics["text_images"] = len(fake)
    grid = labelled_grid(fake, wanted) if fake else None
    return metrics, grid
