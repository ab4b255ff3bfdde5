"""Latent cache: a re-run encodes only what changed, and a changed image, caption, VAE or
text-encoder setting can never be served a stale entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.config import Params, load_params
from components.contracts import (
    CAPTIONS,
    LATENTS,
    SPLIT,
    VAE_DIR,
    read_json,
    read_table,
    write_table,
)
from components.ingest.ocr import ocr
from components.ingest.scrape import scrape
from components.ingest.validate import validate
from components.labelling.labels import labels
from components.models.images import load_batch
from components.models.vae import load_vae
from components.training.latents import LatentCache, latents, variants
from components.training.vae import vae

TINY = ["scrape.sources=[{kind: synthetic, n: 12, seed: 2, size: 64}]", "ocr.workers=2",
        "labels.split={train: 0.7, val: 0.3, test: 0.0}",
        "vae.image_size=32", "vae.base_channels=8", "vae.epochs=1", "vae.batch_size=8"]


@pytest.fixture
def collected(workdir) -> Params:
    params = load_params(overrides=TINY)
    for stage in (scrape, ocr, validate, labels, vae):
        stage(params)
    return params


def all_means(cache: LatentCache) -> np.ndarray:
    """Every row's latent mean, flattened, in the index's order."""
    return np.stack([np.asarray(cache.formats[f]["mean"][r]).ravel()
                     for f, r in zip(cache.index["format"], cache.index["format_row"],
                                     strict=True)])


def _distinct_captions(params: Params) -> set[str]:
    """Every phrasing of the train/val captions, with their text and without."""
    caps = read_table(CAPTIONS, "captions")
    caps = caps[caps["split"].isin(["train", "val"])].assign(flip=False)
    return {c for row in variants(caps, params.labels.caption_template,
                                  params.labels.caption_variants) for kind in row for c in kind}


def _caption_states(cache: LatentCache) -> np.ndarray:
    """Each row's caption states: (N, 2, variants, ...)."""
    return np.asarray(cache.captions)[np.asarray(cache.caption_rows)]


def test_rerun_encodes_only_what_changed(collected: Params, workdir) -> None:
    params = collected
    first = latents(params)
    n = first["images"]
    # every phrasing of every caption, with its free text and without: each distinct
    # string once (a caption whose image reads nothing is its own text-free caption)
    distinct = len(_distinct_captions(params))
    assert n == 12 and first["images_encoded"] == n and first["captions_encoded"] == distinct
    k = params.labels.caption_variants
    assert distinct < 2 * k * n  # some of these images read nothing
    before = LatentCache(LATENTS)
    mean, text = all_means(before), _caption_states(before)
    assert text.shape[:3] == (n, 2, k)
    assert not np.allclose(text[:, 0], text[:, 1])  # without what the image reads
    assert not np.allclose(text[:, 0, 0], text[:, 0, 1])  # in other words

    again = latents(params)
    assert again["images_encoded"] == 0 and again["captions_encoded"] == 0
    assert np.array_equal(all_means(LatentCache(LATENTS)), mean)

    caps = read_table(CAPTIONS, "captions")
    edited = caps["id"].iloc[0]
    caps.loc[0, "caption"] = "muted teal gradient poster, text at the top, reading \"HI\""
    write_table(caps, CAPTIONS, "captions")
    m = latents(params)
    assert m["images_encoded"] == 0 and m["captions_encoded"] == 1
    after = LatentCache(LATENTS)
    row = int(after.index.set_index("id").loc[edited, "row"])
    now = _caption_states(after)
    assert not np.allclose(now[row, 0, 0], text[row, 0, 0])  # the stored caption, edited
    assert np.array_equal(now[row, :, 1:], text[row, :, 1:])  # phrased from its labels
    others = [i for i in range(n) if i != row]
    assert np.array_equal(now[others], text[others])

    vae(load_params(overrides=[*TINY, "vae.seed=1"]))  # a retrained VAE: new weights
    m = latents(params)
    assert m["images_encoded"] == n and m["captions_encoded"] == 0
    assert not np.allclose(all_means(LatentCache(LATENTS)), mean)

    m = latents(load_params(overrides=[*TINY, "text_encoder.max_tokens=16"]))
    distinct = _distinct_captions(params)
    assert m["images_encoded"] == 0 and m["captions_encoded"] == len(distinct)
    # what generation will encode prompts with (Generator.load reads it from the U-Net)
    assert LatentCache(LATENTS).meta["text_encoder_config"]["max_tokens"] == 16
    store = workdir / ".cache" / "latents"  # stale entries are dropped, the store stays small
    assert len(list((store / "image").rglob("*.npy"))) == n
    assert len(list((store / "text").rglob("*.npy"))) == len(distinct)
    assert (VAE_DIR / "weights.safetensors").exists()


def test_flip_adds_a_mirrored_copy_of_each_train_image_with_left_and_right_swapped(
        collected: Params, workdir) -> None:
    plain = latents(collected)
    m = latents(load_params(overrides=[*TINY, "latents.flip=true"]))
    cache = LatentCache(LATENTS)
    idx = cache.index
    flipped, train = idx[idx["flip"]], idx[(idx["split"] == "train") & ~idx["flip"]]
    assert sorted(flipped["id"]) == sorted(train["id"]) and (flipped["split"] == "train").all()
    assert m["images"] == plain["images"] + len(flipped)
    assert m["images_encoded"] == len(flipped)  # the originals come from the store

    caps = read_table(CAPTIONS, "captions").set_index("id")
    swap = {"left": "right", "right": "left"}
    for _, row in flipped.iterrows():
        layout = caps.loc[row["id"], "layout"]
        assert f"text at the {swap.get(layout, layout)}," in row["caption"]
        assert row["caption"].replace(swap.get(layout, layout), layout) == \
            caps.loc[row["id"], "caption"]

    # the mirrored latent is the encoding of the mirrored image
    vae_model = load_vae(VAE_DIR)
    row = flipped.iloc[0]
    x = load_batch([caps.loc[row["id"], "path"]], vae_model.cfg.image_size).flip(-1)
    with torch.no_grad():
        want = vae_model.encode(x)[0][0].numpy()
    assert np.allclose(cache.formats[row["format"]]["mean"][row["format_row"]], want,
                       atol=1e-5)
    assert latents(collected)["images_encoded"] == 0  # switched off: the plain rows again


def test_a_key_is_encoded_once_and_a_rerun_reads_the_same_bytes(tmp_path, monkeypatch) -> None:
    """A caption without text equals its attributes-only caption: one key, twice in a run.
    Encoded in other batches the copies round apart; a cache hit must return exactly what
    the run that computed the entry used."""
    from components.training import latents as stage

    monkeypatch.setattr(stage, "CACHE", tmp_path / "cache")
    calls = []

    def encode(todo):  # a value that depends on the batch it is computed in, like a model's
        calls.append(list(todo))
        return [np.full(3, len(calls) * 10 + i, np.float32) for i in todo]

    keys = ["aa1", "bb2", "aa1", "cc3"]
    fresh, n = stage._encode_missing(keys, "text", encode)
    assert n == 3 and calls == [[0, 1, 3]]  # the repeated key is computed once
    assert np.array_equal(fresh[0], fresh[2])
    again, n = stage._encode_missing(keys, "text", encode)
    assert n == 0 and len(calls) == 1
    assert all(np.array_equal(a, b) for a, b in zip(fresh, again, strict=True))


def test_each_row_gets_its_glyph_map_and_the_model_its_layout_statistics_and_font(
        collected: Params, workdir) -> None:
    """The glyph maps are the rows' text_boxes drawn by the one renderer at the VAE's size
    (a mirrored row: mirrored); layout.json is fitted on the train rows; the font is copied
    byte for byte."""
    from components.labelling import text_boxes
    from components.models.glyphs import glyph_map
    from components.models.layout import fit_layouts

    latents(load_params(overrides=[*TINY, "latents.flip=true"]))
    cache = LatentCache(LATENTS)
    caps = read_table(CAPTIONS, "captions").set_index("id")
    size = collected.vae.image_size
    assert list(cache.formats) == ["poster"]
    assert cache.formats["poster"]["glyphs"].shape == (len(cache.index), size, size)
    for _, row in cache.index.iterrows():
        lines = text_boxes.loads(caps.loc[row["id"], "text_boxes"])
        want = np.asarray(glyph_map(lines, size, size, collected.brand.font))
        got = cache.formats[row["format"]]["glyphs"][row["format_row"]]
        assert np.array_equal(got, want[:, ::-1] if row["flip"] else want)
    assert sum(bool(text_boxes.loads(b)) for b in caps["text_boxes"]) > 0
    train = caps[caps["split"] == "train"]
    pooled = fit_layouts([(lay, text_boxes.loads(b)) for lay, b in
                          zip(train["layout"], train["text_boxes"], strict=True)])
    # all posters here: the one format's statistics are the pooled ones
    assert read_json(LATENTS / "layout.json") == {**pooled, "formats": {"poster": pooled}}
    assert (LATENTS / "font.ttf").read_bytes() == open(collected.brand.font, "rb").read()


def test_each_image_is_encoded_in_its_bucket_and_the_key_holds_the_bucket(workdir) -> None:
    """Posters and banners: each row's latent at its format's size (the labels stage's
    nearest bucket, named in its caption), one array per format; changing one bucket's
    ratio re-encodes exactly that bucket's images."""
    from PIL import Image

    from components.models.buckets import format_sizes, nearest

    params = load_params(overrides=[*TINY, "synthetic.formats={poster: 0.5, banner: 0.5}"])
    for stage in (scrape, ocr, validate, labels, vae):
        stage(params)
    first = latents(params)
    caps = read_table(CAPTIONS, "captions").set_index("id")
    cache = LatentCache(LATENTS)
    idx = cache.index
    assert set(idx["format"]) == {"poster", "banner"}
    sizes = format_sizes(params.formats.buckets, params.vae)
    for _, row in idx.iterrows():
        fmt = caps.loc[row["id"], "format"]
        with Image.open(caps.loc[row["id"], "path"]) as im:
            assert fmt == row["format"] == nearest(*im.size, params.formats.buckets)
        assert f" {fmt}, fading" in row["caption"]
        w, h = sizes[fmt]
        assert cache.formats[fmt]["mean"][row["format_row"]].shape == (4, h // 4, w // 4)
        assert cache.formats[fmt]["glyphs"][row["format_row"]].shape == (h, w)
    assert sorted(read_table(SPLIT, "split")["format"].unique()) == ["banner", "poster"]

    wider = load_params(overrides=[*TINY, "synthetic.formats={poster: 0.5, banner: 0.5}",
                                   "formats.buckets.banner=[5, 2]"])
    again = latents(wider)
    assert again["images_encoded"] == (idx["format"] == "banner").sum() < first["images"]
