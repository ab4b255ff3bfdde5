"""Aspect-ratio buckets: every image in the one nearest its aspect, batches that never mix
them, a U-Net that trains on several and a generator that samples each in its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_models import StubEncoder, write_tiny_cache

from components.config import Diffusion, Formats, Sampler, Unet, Vae
from components.models.buckets import aspect_range, draw, epoch_batches, nearest, sizes
from components.models.generator import Generator
from components.models.vae import VAE, save_vae
from components.training.unet import train_unet


def test_each_aspect_goes_to_its_nearest_bucket_and_the_limits_follow_the_buckets() -> None:
    buckets = Formats().buckets
    asked = [(800, 400), (1080, 1920), (1000, 1000), (1200, 1000), (1500, 500), (800, 1000),
             (1920, 1080)]
    assert [nearest(w, h, buckets) for w, h in asked] == [
        "banner", "story", "poster", "poster", "strip", "portrait", "landscape"]
    assert nearest(2, 1, {"a": (1, 1), "b": (4, 1)}) == "a"  # a tie: the first listed
    assert aspect_range(buckets, 1.25) == pytest.approx((0.5625 / 1.25, 3 * 1.25))
    # each bucket about 64 x 64 pixels at its aspect, on the U-Net's 16 px grid
    assert sizes(buckets, 64, 4) == {"poster": (64, 64), "portrait": (64, 80),
                                     "story": (48, 80), "landscape": (80, 48),
                                     "banner": (96, 48), "strip": (96, 32)}


def test_an_epoch_never_mixes_buckets_and_takes_every_row_once() -> None:
    groups = {"poster": torch.arange(0, 7), "banner": torch.arange(7, 10)}
    batches = epoch_batches(groups, 3, torch.Generator().manual_seed(0))
    for name, rows in batches:
        assert len(rows) <= 3 and set(rows.tolist()) <= set(groups[name].tolist())
    assert sorted(r for _, rows in batches for r in rows.tolist()) == list(range(10))
    assert [n for n, _ in batches] != ["poster"] * 3 + ["banner"]  # the order is shuffled
    again = epoch_batches(groups, 3, torch.Generator().manual_seed(0))
    assert all(a == b and torch.equal(x, y) for (a, x), (b, y) in zip(batches, again,
                                                                       strict=True))
    # data-parallel: each bucket trimmed to whole slices (7 -> 6, 3 -> 2)
    trimmed = epoch_batches(groups, 4, torch.Generator().manual_seed(0), multiple=2)
    assert sorted(len(r) for _, r in trimmed) == [2, 2, 4]
    # one bucket: exactly one permutation in order, as training drew before buckets
    one = epoch_batches({"poster": torch.arange(7)}, 3, torch.Generator().manual_seed(5))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat([r for _, r in one]), perm)


def test_a_bucket_is_drawn_by_its_count_and_one_bucket_draws_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert draw([5], gen) == 0 and torch.equal(gen.get_state(), state)
    picks = [draw([3, 0, 1], gen) for _ in range(400)]
    assert 1 not in picks and 0.65 < picks.count(0) / 400 < 0.85


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, Path, list]:
    """A U-Net trained on a cache of posters and banners, the batch shapes it saw."""
    import components.models.diffusion as diffusion

    root = tmp_path_factory.mktemp("mixed")
    cache = write_tiny_cache(root / "latents", banners=6)
    vae = VAE(Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2]))
    save_vae(vae, vae.cfg, root / "vae")
    shapes, real = [], diffusion.training_loss

    def recording(net, schedule, x0, *args, **kw):
        shapes.append(tuple(x0.shape))
        return real(net, schedule, x0, *args, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(diffusion, "training_loss", recording)
        train_unet(Unet(n_feat=8, steps=30, batch_size=4, warmup=5, bf16=False,
                        checkpoint_every=0), Diffusion(timesteps=50), cache, root / "unet",
                   "stub", vae_dir=root / "vae")
    return root / "vae", root / "unet", shapes


def test_the_unet_trains_on_batches_of_one_bucket_each(mixed) -> None:
    _, unet_dir, shapes = mixed
    assert set(shapes) == {(4, 4, 8, 8), (4, 4, 8, 16)}  # both formats, never mixed
    config = json.loads((unet_dir / "config.json").read_text())
    # rows 2, 5, 8, 11, 14 of the 16 train rows are banners
    assert {f: v["train_images"] for f, v in config["formats"].items()} == {
        "poster": 11, "banner": 5}
    assert config["formats"]["banner"]["size"] == [64, 32]


def test_a_trained_format_is_sampled_at_its_bucket_without_a_warning(mixed, capsys) -> None:
    vae_dir, unet_dir, _ = mixed
    gen = Generator.load(vae_dir, unet_dir, Sampler(steps=2), text_encoder=StubEncoder())
    assert gen.sample_size(800, 400) == (64, 32) and gen.format_of(800, 400) == "banner"
    banner = gen.generate(["red banner"], seed=1, width=81, height=41)[0]  # odd sizes
    assert banner.size == (81, 41) and capsys.readouterr().err == ""
    story = gen.generate(["red story"], seed=1, width=45, height=80)[0]
    said = capsys.readouterr().err.strip().splitlines()
    assert story.size == (45, 80) and gen.format_of(45, 80) is None
    assert len(said) == 1 and "trained on banner 2:1, poster 1:1 only" in said[0]


def test_a_prompt_naming_a_trained_format_is_sampled_in_it(mixed) -> None:
    """No size asked: the format word outside the quoted text decides ("OUR STORY" is
    text to show, not a format); a size asked wins."""
    vae_dir, unet_dir, _ = mixed
    gen = Generator.load(vae_dir, unet_dir, Sampler(steps=2), text_encoder=StubEncoder())
    assert gen.named_format(['red solid banner, reading "OUR STORY".']) == "banner"
    assert gen.named_format(["red solid banner", "blue solid poster"]) is None
    assert gen.generate(['red solid banner, reading "SALE".'])[0].size == (64, 32)
    assert gen.generate(["red solid poster"])[0].size == (32, 32)
    assert gen.generate(["red solid banner"], width=50, height=50)[0].size == (50, 50)


def test_text_is_planned_with_the_statistics_of_the_format_sampled(mixed) -> None:
    """Banners place their text as the training banners do; a layout the format never had
    text in, and other formats, use all the training images' statistics."""
    from components.models.layout import fit_layouts

    vae_dir, unet_dir, _ = mixed
    gen = Generator.load(vae_dir, unet_dir, Sampler(steps=2), text_encoder=StubEncoder())
    square = [{"text": "SALE", "box": [0.1, 0.4, 0.9, 0.6], "words": []}]
    wide = [{"text": "SALE", "box": [0.05, 0.1, 0.65, 0.4], "words": []}]
    gen.layout_stats = {**fit_layouts([("centre", square), ("top", square)]),
                        "formats": {"banner": fit_layouts([("centre", wide)])}}
    prompt = ['a banner, text at the centre, reading "SALE"']
    banner = gen.text_layouts(prompt, size=(64, 32))[0][0]["box"]
    poster = gen.text_layouts(prompt, size=(32, 32))[0][0]["box"]
    assert (banner[1], banner[3]) == (0.1, 0.4)  # the banners' block: its height and place
    assert (poster[1], poster[3]) == (0.4, 0.6)
    top = gen.text_layouts(['text at the top, reading "SALE"'], size=(64, 32))[0][0]["box"]
    assert top[1] == 0.4  # no banner with text at the top: all images' statistics
