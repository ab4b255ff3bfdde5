"""Encode every captioned image once: VAE posterior mean/log-variance + caption embeddings
(token-level states, float16, for cross-attention; one vector for an encoder without).
Each image has labels.caption_variants captions (the template's, then other phrasings of
its labels: models/prompts.py), each also without the free text (OCR text,
description): the U-Net draws one phrasing per step, and trains on the text-free one for
a share of steps (unet.text_drop), so that it learns the attributes' words in a user's
many ways of saying them rather than memorising each image by its unique text. Every
distinct caption is encoded once (captions.npy); caption_rows.npy gives each row's
(with text, without) x variant positions there. With latents.flip, every
train image also gets a mirrored copy whose caption says left where the original says
right (and the other way round).

Each row also gets its glyph map (models/glyphs.py: the words of its `text_boxes`, drawn
in brand.font at its format's size, uint8), and the stage fits the layout planner's
statistics on the train rows (layout.json); both travel with the model, with a copy of
the font (font.ttf), so generation draws its glyph maps exactly as training did.

Images keep their aspect: each row is encoded at its format's size (its aspect bucket,
models/buckets.py), so the latents, posterior variances and glyph maps are stored per
format (mean_<format>.npy, logvar_..., glyphs_...; index.parquet gives each row's format
and its row there); the caption arrays are shared. The vocabulary its prompts are read
with (vocabulary.json: models/prompts.py) travels with the model too. Arrays are plain .npy files
(memory-mapped by the U-Net stage), rows indexed by index.parquet. Entries are also
kept in a content-keyed store (.cache/latents): an image's key hashes its bytes, the VAE
weights and its format's size; a caption's key hashes the caption and the text encoder.
A re-run encodes only what changed (new images, edited captions, everything after a
retrained VAE) and a changed input can never pass for a cached one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from components.config import Params
from components.contracts import (
    CAPTION_FIELDS,
    CAPTIONS,
    LATENTS,
    VAE_DIR,
    UserError,
    atomic_dir,
    atomic_path,
    progress,
    read_json,
    read_table,
    sha256_bytes,
    sha256_file,
    write_json,
    write_table,
)
from components.labelling import text_boxes
from components.labelling.captions import caption, vocabulary, without_text
from components.models.buckets import format_sizes, groups
from components.models.glyphs import REFERENCE_PX, font, glyph_map
from components.models.images import load_batch
from components.models.layout import fit_layouts
from components.models.prompts import phrasings
from components.models.text_encoders import get_encoder, save_encoder
from components.models.vae import load_vae

CACHE = Path(".cache") / "latents"  # content-keyed entries, kept across runs (DVC clears outs)
TEXT_ENCODER = "text_encoder"  # a fitted encoder (tfidf) travels with the latents and model
# what generation needs to draw glyph maps and read prompts (travels with the model)
MODEL_FILES = ["layout.json", "font.ttf", "vocabulary.json"]
CACHE_FILES = ["captions.npy", "caption_rows.npy", "index.parquet", "meta.json", *MODEL_FILES]
FORMAT_ARRAYS = ["mean", "logvar", "glyphs"]  # per format: <name>_<format>.npy


class LatentCache:
    """The latents stage's output, memory-mapped (the U-Net stage reads only its rows)."""

    def __init__(self, latents_dir: Path):
        d = Path(latents_dir)
        missing = [n for n in CACHE_FILES if not (d / n).exists()]
        if missing:
            raise UserError(f"{d}: latent cache incomplete (missing {', '.join(missing)}); "
                            "run the latents stage first")
        # every distinct caption's states (M, L, D) float16, or vectors (M, D); each row's
        # positions there (N, 2, variants): [0] with its text, [1] without
        self.captions = np.load(d / "captions.npy", mmap_mode="r")
        self.caption_rows = np.load(d / "caption_rows.npy", mmap_mode="r")
        self.index = pd.read_parquet(d / "index.parquet")
        self.meta = read_json(d / "meta.json")
        files = {f: {a: d / f"{a}_{f}.npy" for a in FORMAT_ARRAYS} for f in self.meta["formats"]}
        missing = [p.name for fs in files.values() for p in fs.values() if not p.exists()]
        if missing:
            raise UserError(f"{d}: latent cache incomplete (missing {', '.join(missing)}); "
                            "run the latents stage first")
        # format -> mean, logvar (N_f, C, h, w) float32 and glyphs (N_f, H, W) uint8
        self.formats = {f: {a: np.load(p, mmap_mode="r") for a, p in fs.items()}
                        for f, fs in files.items()}

    def identity(self) -> str:
        """A hash of what was encoded (every row's cache key) and how (meta.json)."""
        return sha256_bytes("\n".join([*self.index["key"], json.dumps(
            self.meta, sort_keys=True)]).encode())

    def rows(self, split: str) -> np.ndarray:
        return self.index.loc[self.index["split"] == split, "row"].to_numpy(np.int64)

    def by_format(self, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """format -> (the split's rows of that format, their rows in the format's arrays),
        formats in the cache's order (most images first), empty ones left out."""
        part = self.index[self.index["split"] == split]
        out = {f: part[part["format"] == f] for f in self.meta["formats"]}
        return {f: (p["row"].to_numpy(np.int64), p["format_row"].to_numpy(np.int64))
                for f, p in out.items() if len(p)}


def _load_or_none(path: Path):
    try:
        return np.load(path)
    except (OSError, ValueError):  # absent, torn or foreign: encode again
        return None


def _encode_missing(keys: list[str], kind: str, encode) -> tuple[list, int]:
    """Entries of the content-keyed store for `keys`; the missing ones are computed by
    `encode(indices) -> arrays` and stored, each key once (a caption without text is also
    its own attributes-only caption: encoding it twice, in other batches, could round the
    two copies apart), so a run that computes an entry uses exactly the bytes a later run
    reads back. Returns (entries, how many were computed)."""
    files = [CACHE / kind / k[:2] / f"{k}.npy" for k in keys]
    entries = [_load_or_none(f) for f in files]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}  # each key's first index
    todo = [i for i, e in enumerate(entries) if e is None and first[keys[i]] == i]
    if todo:
        for i, arr in zip(todo, encode(todo), strict=True):
            with atomic_path(files[i]) as tmp, open(tmp, "wb") as fh:
                np.save(fh, arr)
            entries[i] = arr
        entries = [entries[first[k]] if e is None else e for k, e in zip(keys, entries,
                                                                          strict=True)]
    wanted = set(keys)  # entries of an older VAE or encoder are never read again: drop them
    for f in (CACHE / kind).rglob("*.npy"):
        if f.stem not in wanted:
            f.unlink(missing_ok=True)
    return entries, len(todo)


def pad_stack(entries: list[np.ndarray]) -> np.ndarray:
    """Caption vectors (D,) -> (N, D); token states (L_i, D) -> (N, max L, D) float16, the
    rows after each caption's end all zero (what the U-Net reads as padding)."""
    if entries[0].ndim == 1:
        return np.stack(entries).astype(np.float32)
    out = np.zeros((len(entries), max(len(e) for e in entries), entries[0].shape[-1]),
                   np.float16)
    for i, e in enumerate(entries):
        out[i, : len(e)] = e
    return out


MIRROR = {"left": "right", "right": "left"}


def mirrored(caps: pd.DataFrame, template: str) -> pd.DataFrame:
    """The train rows as their mirror images: flip set, layout left <-> right, and the
    caption written again from the template. (Mirrored text is no longer text: for
    text-heavy posters this teaches backwards letters, so it is off by default.)"""
    out = caps[caps["split"] == "train"].copy()
    out["flip"] = True
    out["layout"] = out["layout"].map(lambda v: MIRROR.get(v, v))
    out["caption"] = [caption(r, template) for r in out[CAPTION_FIELDS].to_dict("records")]
    return out


def variants(caps: pd.DataFrame, template: str, n: int) -> list[list[list[str]]]:
    """Each row's [with its text, without] x n captions: its caption as stored (or the
    template's without the text), then other phrasings of its labels (prompts.phrasings;
    a mirrored row phrases its own labels with its own seed)."""
    out = []
    for r, text, i, flip in zip(caps[CAPTION_FIELDS].to_dict("records"), caps["caption"],
                                caps["id"], caps["flip"], strict=True):
        seed, bare = f"{i}|flip" if flip else i, without_text(r)
        out.append([[text, *phrasings(r, n - 1, seed)],
                    [caption(bare, template), *phrasings(bare, n - 1, seed)]])
    return out


def glyph_maps(caps: pd.DataFrame, sizes: dict[str, tuple[int, int]], font_path: str
               ) -> list[np.ndarray]:
    """Each row's glyph map (H, W) uint8 at its format's size, mirrored where the row is."""
    font(font_path, REFERENCE_PX)  # a missing font: one line naming brand.font
    out = []
    for boxes, flip, f in zip(caps["text_boxes"], caps["flip"], caps["format"], strict=True):
        drawn = np.asarray(glyph_map(text_boxes.loads(boxes), *sizes[f], font_path))
        out.append(np.ascontiguousarray(drawn[:, ::-1]) if flip else drawn)  # no text: black
    return out


def layout_statistics(train: pd.DataFrame) -> dict:
    """The layout planner's statistics of the train rows, and under "formats" those of
    each format's own rows (a banner's text is placed as banners place it)."""
    def fit(rows: pd.DataFrame) -> dict:
        return fit_layouts([(lay, text_boxes.loads(b)) for lay, b in
                            zip(rows["layout"], rows["text_boxes"], strict=True)])

    return {**fit(train), "formats": {f: fit(rows) for f, rows in
                                      train.groupby("format", sort=False)}}


def latents(params: Params) -> dict:
    caps = read_table(CAPTIONS, "captions")
    caps = caps[caps["split"].isin(["train", "val"])].assign(flip=False)
    if caps.empty:
        raise UserError(f"{CAPTIONS}: no train/val rows to encode")
    if params.latents.flip:
        caps = pd.concat([caps, mirrored(caps, params.labels.caption_template)])
    caps = caps.reset_index(drop=True)
    vae = load_vae(VAE_DIR)
    size = vae.cfg.image_size
    buckets = params.formats.buckets
    unknown = sorted(set(caps["format"]) - set(buckets))
    if unknown:
        raise UserError(f"{CAPTIONS}: format(s) {unknown} are not in formats.buckets; re-run "
                        "the labels stage")
    sizes = format_sizes(buckets, vae.cfg)
    vae_hash = sha256_file(VAE_DIR / "weights.safetensors")[:16]
    encoder = get_encoder(params.text_encoder,
                          fit_captions=caps.loc[caps["split"] == "train", "caption"].tolist())
    # an image's latent depends on its bytes (the id is their sha256), the VAE weights and
    # the size it is resized to (its format's); a caption's vector on the caption and the
    # encoder
    image_keys = [sha256_bytes(f"{i}|{vae_hash}|{sizes[b][0]}x{sizes[b][1]}"
                               f"{'|flip' if f else ''}".encode())
                  for i, f, b in zip(caps["id"], caps["flip"], caps["format"], strict=True)]
    per_row = variants(caps, params.labels.caption_template, params.labels.caption_variants)
    texts = list(dict.fromkeys(c for row in per_row for kind in row for c in kind))
    position = {c: i for i, c in enumerate(texts)}
    caption_rows = np.array([[[position[c] for c in kind] for kind in row] for row in per_row],
                            np.int32)  # (N, 2, variants)
    text_keys = [sha256_bytes(f"{encoder.identity}|tokens|{c}".encode()) for c in texts]

    def encode_images(todo: list[int]) -> list[np.ndarray]:
        """Each row's (2, C, h, w) posterior, in batches of one format."""
        out, bs = {}, params.latents.batch_size
        batches = [(f, [todo[k] for k in pos[j : j + bs].tolist()])
                   for f, pos in groups(caps["format"].iloc[todo].tolist()).items()
                   for j in range(0, len(pos), bs)]
        with torch.no_grad():
            for f, chunk in progress(batches, desc="latents", unit="batch"):
                rows = caps.iloc[chunk]
                x = load_batch(rows["path"].tolist(), sizes[f])
                flip = torch.tensor(rows["flip"].tolist(), dtype=torch.bool)
                x[flip] = x[flip].flip(-1)
                mean, logvar = vae.encode(x)
                out |= dict(zip(chunk, torch.stack([mean, logvar], 1).float().numpy(),
                                strict=True))
        return [out[i] for i in todo]

    def encode_texts(todo: list[int]) -> list[np.ndarray]:
        """Each caption's token states without padding (L_i, D), or its vector (D,);
        encoded shortest first, so a batch pads little."""
        order, out = sorted(todo, key=lambda i: len(texts[i])), {}
        for j in range(0, len(order), 256):
            part = order[j : j + 256]
            enc = encoder.encode([texts[i] for i in part])
            out |= dict(zip(part, enc.vectors if enc.tokens is None else
                            [t[np.abs(t).max(-1) > 0].astype(np.float16) for t in enc.tokens],
                            strict=True))
        return [out[i] for i in todo]

    glyphs = glyph_maps(caps, sizes, params.brand.font)
    train = caps[(caps["split"] == "train") & ~caps["flip"]]  # as the images were drawn
    layout_stats = layout_statistics(train)
    posteriors, n_images = _encode_missing(image_keys, "image", encode_images)
    vectors, n_texts = _encode_missing(text_keys, "text", encode_texts)
    # per format, most images first: rows, and (N_f, 2, C, h, w) posteriors (mean, logvar)
    counts = caps["format"].value_counts(sort=False)
    order = sorted(counts.index, key=lambda f: (-counts[f], list(buckets).index(f)))
    rows = {f: np.flatnonzero(caps["format"].to_numpy() == f) for f in order}
    post = {f: np.stack([posteriors[i] for i in r]).astype(np.float32) for f, r in rows.items()}
    format_row = np.zeros(len(caps), np.int64)
    for r in rows.values():
        format_row[r] = np.arange(len(r))
    states = pad_stack(vectors)
    every_mean = np.concatenate([p[:, 0].ravel() for p in post.values()])
    scale = float(1.0 / max(every_mean.std(), 1e-6))
    glyph_arrays = {f: np.stack([glyphs[i] for i in r]) for f, r in rows.items()}
    native = [vae.cfg.latent_channels, *(size // vae.down_factor,) * 2]
    truncated = (sum(n > encoder.max_tokens for n in encoder.count_tokens(
        caps["caption"].tolist())) if hasattr(encoder, "count_tokens") else 0)

    index = pd.DataFrame({
        "id": caps["id"], "row": np.arange(len(caps), dtype=np.int64), "split": caps["split"],
        "caption": caps["caption"],
        "key": [sha256_bytes("|".join([a, *(text_keys[i] for i in r.ravel())]).encode())[:16]
                for a, r in zip(image_keys, caption_rows, strict=True)],
        "flip": caps["flip"].astype(bool), "format": caps["format"], "format_row": format_row,
    })
    meta = {"scale_factor": scale, "latent_shape": native,
            "formats": {f: {"ratio": list(buckets[f]), "size": list(sizes[f]),
                            "latent_shape": list(post[f].shape[2:]), "images": len(r)}
                        for f, r in rows.items()},
            "max_stretch": params.formats.max_stretch,
            "text_dim": int(states.shape[-1]), "text_tokens": int(states.shape[1])
            if states.ndim == 3 else 0, "text_encoder": encoder.name,
            # the settings that made the states, bf16 resolved: generation encodes prompts
            # the same way (the U-Net's config.json carries them)
            "text_encoder_config": {**params.text_encoder.model_dump(mode="json"),
                                    "bf16": bool(getattr(encoder, "bf16", False))},
            "caption_variants": params.labels.caption_variants,
            "vae_weights": vae_hash, "image_size": size,
            "glyphs": sha256_bytes(b"".join(a.tobytes() for a in glyph_arrays.values()))[:16],
            "font": sha256_file(Path(params.brand.font))[:16]}
    with atomic_dir(LATENTS) as tmp:
        for f in rows:
            np.save(tmp / f"mean_{f}.npy", post[f][:, 0])
            np.save(tmp / f"logvar_{f}.npy", post[f][:, 1])
            np.save(tmp / f"glyphs_{f}.npy", glyph_arrays[f])
        np.save(tmp / "captions.npy", states)
        np.save(tmp / "caption_rows.npy", caption_rows)
        write_json(tmp / "layout.json", layout_stats)
        write_json(tmp / "vocabulary.json", asdict(vocabulary(params)))
        shutil.copyfile(params.brand.font, tmp / "font.ttf")
        write_table(index, tmp / "index.parquet", "latent_index")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        save_encoder(encoder, tmp / TEXT_ENCODER)
    return {"images": len(caps), "images_encoded": n_images, "captions": len(texts),
            "captions_encoded": n_texts,
            "glyph_maps_with_text": int(sum(g.max() > 0 for g in glyphs)),
            "scale_factor": round(scale, 5),
            "latent_shape": "x".join(map(str, native)),
            "captions_truncated": int(truncated),
            "captions_truncated_share": round(truncated / len(caps), 4)}
