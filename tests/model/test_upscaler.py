"""The learned upscaler: what it starts as, that training on a collection beats an
interpolating resize on held-out images of it, the stage's files, and generate using it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from components.config import Upscaler as UpscalerCfg
from components.config import Vae, load_params
from components.ingest.synthetic import render
from components.judge.fidelity import detail_ratio
from components.models.images import from_pil, load_image_tensor, to_pil
from components.models.upscaler import Upscaler, load_upscaler
from components.models.vae import VAE, save_vae
from components.training.runtime import runtime
from components.training.upscaler import fit, lanczos, psnr, train_upscaler

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture(scope="module")
def posters(tmp_path_factory) -> list[Path]:
    """24 built-in posters at 128 px, as files."""
    p = load_params(PARAMS)
    root = tmp_path_factory.mktemp("posters")
    out = []
    for i in range(24):
        path = root / f"{i}.png"
        Image.open(io.BytesIO(render(i, 11, 128, p.brand, p.synthetic, p.labels)[0])).save(path)
        out.append(path)
    return out


def test_an_untrained_upscaler_is_bilinear_at_factor_times_the_size() -> None:
    x = torch.rand(2, 3, 8, 12) * 2 - 1
    up = Upscaler(factor=4, width=8, depth=2)
    assert torch.equal(up(x), F.interpolate(x, scale_factor=4, mode="bilinear",
                                            align_corners=False))
    assert [im.size for im in up.upscale(to_pil(x))] == [(48, 32)] * 2


def test_trained_on_a_collection_it_beats_lanczos_on_held_out_images(posters) -> None:
    """Known answer: inputs are the posters at 64 px, targets the same at 128 px; on
    posters it never saw, the trained upscaler is closer to the truth than Lanczos (by
    2.1 dB here) and has more detail beyond 64 px (3.9 vs 1.5)."""
    def at(paths, side):
        return torch.stack([load_image_tensor(p, side) for p in paths])

    train, held = posters[:20], posters[20:]
    y = ((at(train, 128) + 1) * 127.5).round().to(torch.uint8)
    cfg = UpscalerCfg(factor=2, width=32, depth=4, steps=800, batch_size=8, crop=16,
                      bf16=False, device="cpu", glyphs=False)
    model, _loss = fit(cfg, runtime("cpu", False), [(at(train, 64), y, None)])
    vx, truth = at(held, 64), at(held, 128)
    with torch.no_grad():
        up = model(vx).clamp(-1, 1)
    base = lanczos(vx, 2)
    assert psnr([up], [truth]) > psnr([base], [truth]) + 1.0
    ratio = [detail_ratio(im, base=64) for im in to_pil(up)]
    assert np.mean(ratio) > 1.5 * np.mean([detail_ratio(im, base=64) for im in to_pil(base)])


def test_the_stage_writes_a_model_that_loads(tmp_path: Path, posters) -> None:
    vae = VAE(Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2]))
    save_vae(vae, vae.cfg, tmp_path / "vae")
    cfg = UpscalerCfg(factor=2, width=8, depth=2, steps=5, batch_size=4, bf16=False)
    m = train_upscaler(cfg, tmp_path / "vae", [str(p) for p in posters[:8]],
                       [str(p) for p in posters[8:12]], tmp_path / "upscaler")
    assert m["output_size"] == 64 and m["train_images"] == 8 and "val_psnr_lanczos" in m
    again = load_upscaler(tmp_path / "upscaler")
    assert again.factor == 2
    assert (tmp_path / "upscaler" / "metrics.json").exists()
    assert "seconds" not in (tmp_path / "upscaler" / "metrics.json").read_text()
    empty = train_upscaler(cfg, tmp_path / "vae", [str(p) for p in posters[:8]], [],
                           tmp_path / "upscaler2")  # no val images: trained, not compared
    assert "val_psnr" not in empty and empty["train_images"] == 8


def test_images_too_small_for_a_sharp_target_are_left_out(tmp_path: Path, posters,
                                                          capsys) -> None:
    """A target is the stored image at factor x the native size: one stored smaller
    would be upsampled (blur to learn), so it is left out and counted; with none large
    enough, all train, and one line says so."""
    vae = VAE(Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2]))
    save_vae(vae, vae.cfg, tmp_path / "vae")
    small = []
    for i, p in enumerate(posters[:3]):  # 48 px: under 2 x 32
        small.append(str(tmp_path / f"small{i}.png"))
        Image.open(p).resize((48, 48)).save(small[-1])
    cfg = UpscalerCfg(factor=2, width=8, depth=2, steps=2, batch_size=4, bf16=False)
    m = train_upscaler(cfg, tmp_path / "vae", [str(p) for p in posters[:5]] + small, [],
                       tmp_path / "up")
    assert (m["train_images"], m["train_images_too_small"]) == (5, 3)
    assert capsys.readouterr().err == ""
    m = train_upscaler(cfg, tmp_path / "vae", small, [], tmp_path / "up2")
    assert (m["train_images"], m["train_images_too_small"]) == (3, 0)
    assert "no train image is stored at 2x the native size" in capsys.readouterr().err


def test_generate_sizes_go_through_the_upscaler_only_when_larger(monkeypatch) -> None:
    """Generator.to_size: above the native size the upscaler runs first, then Lanczos to
    exactly the size asked (odd ones too); at or below it, Lanczos alone."""
    from components.models.generator import Generator

    gen = Generator.__new__(Generator)
    gen.config = {"latent_shape": [4, 8, 8]}
    monkeypatch.setattr(Generator, "native_size", property(lambda self: 32))
    calls = []

    class Spy(Upscaler):
        def upscale(self, images, glyphs=None):
            calls.append(images[0].size)
            return super().upscale(images, glyphs)

    gen.upscaler = Spy(factor=4, width=4, depth=1)
    ims = [Image.new("RGB", (32, 32), "red")]
    assert gen.to_size(ims, 201, 77)[0].size == (201, 77) and calls == [(32, 32)]
    assert gen.to_size(ims, 24, 32)[0].size == (24, 32) and len(calls) == 1
    gen.upscaler = None
    assert gen.to_size(ims, 201, 77)[0].size == (201, 77)


def test_a_glyph_upscaler_draws_the_letters_where_the_sample_has_ink(tmp_path: Path) -> None:
    """upscaler.glyphs: trained on posters whose words are unreadable at the input size
    (and plain ones), with each target's glyph map, it draws the text band from the map:
    closer to the truth with the image's own map than with another word's or none; and
    given a map over a plain sample (no ink there), it draws no letters."""
    from components.models.glyphs import glyph_batch, glyph_map

    font = load_params(PARAMS).brand.font
    words = ["SALE", "OPEN", "SHOP", "NEW", "BIG", "FRESH"]
    texts = [[{"text": words[i % 6], "box": [0.05, 0.35, 0.95, 0.65], "words": []}]
             if i % 3 else [] for i in range(36)]  # every third plain
    big = []
    for i, lines in enumerate(texts):
        im = Image.new("RGB", (64, 64), (40 + 5 * i, 200 - 4 * i, 90))
        im.paste(Image.new("RGB", (64, 64), "white"), (0, 0), glyph_map(lines, 64, 64, font))
        big.append(im)
    y = from_pil(big)
    x = F.interpolate(y, size=(16, 16), mode="area")  # 4 px letters: a blur
    g = glyph_batch(texts, 64, 64, font)
    cfg = UpscalerCfg(factor=4, width=32, depth=3, steps=600, batch_size=8, crop=16,
                      bf16=False, device="cpu", glyphs=True)
    u8 = ((y + 1) * 127.5).round().to(torch.uint8)
    model, _ = fit(cfg, runtime("cpu", False), [(x[:30], u8[:30],
                                                 (g[:30] * 255).round().to(torch.uint8))])
    band = slice(22, 42)  # the pixel rows of the text box

    def error(rows, glyphs):
        with torch.no_grad():
            out = model(x[rows], glyphs)
        return float((out - y[rows])[..., band, :].abs().mean())

    text, plain = [31, 32, 34, 35], [30, 33]
    own, other = g[text], torch.roll(g[text], 1, 0)
    assert error(text, own) < 0.6 * error(text, other)
    assert error(text, own) < 0.6 * error(text, None)
    letters = float((y[text] - y[[30] * 4])[..., band, :].abs().mean())  # text vs plain
    assert error(plain, g[text[:2]]) < 0.3 * letters


def test_smudged_blurs_only_the_text_areas_of_the_chosen_images() -> None:
    """Known answer: a glyph map with ink in one 4x4 block at factor 4 marks one input
    pixel, grown to its 3x3 neighbourhood; those pixels of the chosen image take their
    5x5 mean, everything else (and the other image) stays."""
    from components.training.upscaler import smudged

    x = torch.zeros(2, 3, 8, 8)
    x[:, :, 4, 4] = 1.0
    glyphs = torch.zeros(2, 1, 32, 32)
    glyphs[:, :, 16:20, 16:20] = 1.0  # input pixel (4, 4)
    out = smudged(x, glyphs, 4, torch.tensor([True, False]))
    assert torch.equal(out[1], x[1])
    want = x[0].clone()
    want[:, 3:6, 3:6] = 1 / 25  # every 5x5 window there holds the one bright pixel
    assert torch.allclose(out[0], want)
