"""The glyph-conditioned U-Net: the glyph map reaches it, is dropped with the caption for
guidance, and decides what is drawn where the text goes (and nothing else)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from components.config import Diffusion
from components.models.diffusion import DDIMSampler, NoiseSchedule, sample, training_loss
from components.models.glyphs import glyph_map
from components.models.unet import ContextUnet

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
BOX = [0.05, 0.3, 0.95, 0.7]  # the text band: latent rows 2-5 of 8
WORDS = ["SALE", "OPEN", "SHOP", "NEW", "BIG", "FRESH"]


class Recorder(nn.Module):
    """Records what a model is called with; predicts zeros."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def forward(self, x, t, c, glyph=None):
        self.calls.append((c.clone(), None if glyph is None else glyph.clone()))
        return torch.zeros_like(x)


def test_the_glyph_map_is_dropped_together_with_the_caption() -> None:
    rec, schedule = Recorder(), NoiseSchedule(Diffusion(timesteps=50))
    c, glyph = torch.ones(64, 6), torch.ones(64, 1, 32, 32)
    training_loss(rec, schedule, torch.zeros(64, 4, 8, 8), c, 0.5, torch.Generator()
                  .manual_seed(0), glyph=glyph)
    seen_c, seen_g = rec.calls[0]
    kept_c, kept_g = seen_c.amax(1) > 0, seen_g.flatten(1).amax(1) > 0
    assert 10 < int(kept_c.sum()) < 54  # about half dropped
    assert torch.equal(kept_c, kept_g)  # never one without the other

    # guidance: the conditional half gets the glyph map, the unconditional an empty one
    rec.calls.clear()
    sampler = DDIMSampler(schedule, 0.0)
    sampler.set_timesteps(2)
    sample(rec, schedule, sampler, torch.ones(3, 6), (4, 8, 8), 2.0, None, torch.ones(3, 1,
                                                                                     32, 32))
    c2, g2 = rec.calls[0]
    assert torch.equal(c2[:3].amax(1) > 0, torch.ones(3, dtype=torch.bool))
    assert g2[:3].min() == 1 and g2[3:].max() == 0 and c2[3:].abs().max() == 0


def _glyph(word: str) -> torch.Tensor:
    lines = [{"text": word, "box": BOX, "words": []}]
    return torch.from_numpy(np.array(glyph_map(lines, 32, 32, FONT))).float().div(255)


@pytest.fixture(scope="module")
def glyph_unet() -> tuple[ContextUnet, NoiseSchedule]:
    """A tiny glyph-conditioned U-Net trained on latents whose channel 0 is the glyph map
    pooled to the latent size (the text) and whose other channels are the caption's
    background value: what it draws in the text band can only come from the glyph map."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    glyphs = torch.stack([_glyph(w) for w in WORDS])[:, None]       # (6, 1, 32, 32)
    text = nn.functional.avg_pool2d(glyphs, 4) * 4 - 1              # (6, 1, 8, 8)
    schedule = NoiseSchedule(Diffusion(timesteps=100))
    model = ContextUnet(4, 16, 2, 8, glyph_channels=8, glyph_down=4)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(300):
        w = torch.randint(0, len(WORDS), (32,), generator=gen)
        bg = torch.randint(0, 2, (32,), generator=gen).float() * 2 - 1
        x0 = torch.cat([text[w], bg.view(-1, 1, 1, 1).expand(-1, 3, 8, 8)], 1)
        c = torch.stack([bg, -bg], 1)
        loss = training_loss(model, schedule, x0, c, 0.1, gen, glyph=glyphs[w])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), schedule


def _draw(model, schedule, word: str) -> torch.Tensor:
    sampler = DDIMSampler(schedule, 0.0)
    sampler.set_timesteps(20)
    return sample(model, schedule, sampler, torch.tensor([[1.0, -1.0]]), (4, 8, 8), 1.0,
                  [torch.Generator().manual_seed(0)], _glyph(word)[None, None])[0]


def test_changing_only_the_word_changes_the_text_region_not_the_background(glyph_unet):
    model, schedule = glyph_unet
    sale, open_ = _draw(model, schedule, "SALE"), _draw(model, schedule, "OPEN")
    band = slice(2, 6)  # latent rows of BOX
    text_change = (sale[0, band] - open_[0, band]).abs().mean()
    background_change = (sale[1:] - open_[1:]).abs().mean()
    assert text_change > 0.15
    assert background_change < 0.25 * text_change
    # and what it draws there is the requested word's shape
    for word, got in [("SALE", sale), ("OPEN", open_)]:
        want = nn.functional.avg_pool2d(_glyph(word)[None, None], 4)[0, 0] * 4 - 1
        corr = np.corrcoef(got[0, band].flatten(), want[band].flatten())[0, 1]
        assert corr > 0.8, (word, corr)


def _text_posters(root, n: int = 24) -> tuple[list, list[list[dict]]]:
    """n 32 px posters, each a colour with one of WORDS in white in BOX, and their lines."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    paths, texts = [], []
    for i in range(n):
        lines = [{"text": WORDS[i % len(WORDS)], "box": BOX, "words": []}]
        im = Image.new("RGB", (32, 32), (40 + 8 * i, 200 - 6 * i, 90))
        im.paste(Image.new("RGB", (32, 32), "white"), (0, 0), glyph_map(lines, 32, 32, FONT))
        im.save(path := root / f"{i}.png")
        paths.append(path)
        texts.append(lines)
    return paths, texts


def test_a_glyph_decoder_draws_the_letters_from_the_glyph_map(tmp_path) -> None:
    """vae.glyph_channels: trained with each image's glyph map, the decoder draws the text
    band from it: reconstructions with the image's own map are closer in the band than
    with another word's map or none (no map = no text)."""
    from components.config import Vae
    from components.models.glyphs import glyph_batch
    from components.models.images import load_batch
    from components.models.vae import load_vae
    from components.training.vae import train_vae

    paths, texts = _text_posters(tmp_path / "images")
    cfg = Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2], latent_channels=4,
              epochs=30, batch_size=8, bf16=False, crop=0, glyph_channels=8,
              checkpoint_every=0, val_per_epoch=0)
    train_vae(cfg, paths[:20], paths[20:], tmp_path / "vae", None, None,
              (texts[:20], texts[20:]), FONT)
    vae = load_vae(tmp_path / "vae")
    assert vae.reads_glyphs
    x = load_batch(paths, 32)
    own = glyph_batch(texts, 32, 32, FONT)
    other = glyph_batch(texts[1:] + texts[:1], 32, 32, FONT)
    with torch.no_grad():
        z = vae.encode(x)[0]
        band = slice(9, 23)  # the pixel rows of BOX

        def error(glyphs):
            return float((vae.decode(z, glyphs) - x)[..., band, :].abs().mean())

        assert torch.equal(vae.decode(z), vae.decode(z, torch.zeros_like(own)))
        assert error(own) < 0.75 * error(other)
        assert error(own) < 0.75 * error(None)


def test_the_generator_hands_the_prompts_glyph_map_to_a_glyph_decoder(tmp_path) -> None:
    """generate draws each prompt's glyph map once and gives the same map to the U-Net and
    to a decoder that reads glyph maps (the words the user asked for, where planned)."""
    from test_models import StubEncoder, write_tiny_cache

    from components.config import Sampler, Unet, Vae
    from components.models.generator import Generator
    from components.models.vae import VAE, save_vae
    from components.training.unet import train_unet

    cache = write_tiny_cache(tmp_path / "latents")
    vae = VAE(Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2], glyph_channels=4))
    save_vae(vae, vae.cfg, tmp_path / "vae")
    train_unet(Unet(n_feat=8, steps=3, batch_size=4, warmup=1, bf16=False),
               Diffusion(timesteps=50), cache, tmp_path / "unet", "stub", tmp_path / "vae")
    gen = Generator.load(tmp_path / "vae", tmp_path / "unet", Sampler(steps=2),
                         text_encoder=StubEncoder())
    seen = {}
    unet_forward, decode = gen.unet.forward, gen.vae.decode
    gen.unet.forward = lambda x, t, c, glyph=None: (seen.setdefault("unet", glyph),
                                                   unet_forward(x, t, c, glyph))[1]
    gen.vae.decode = lambda z, glyphs=None: (seen.setdefault("vae", glyphs),
                                             decode(z, glyphs))[1]
    prompt = 'red poster, text at the centre, reading "SALE"'
    box = (0.1, 0.3, 0.8, 0.4)  # x, y, w, h
    gen.generate([prompt], seed=3, text_box=box)
    want = gen.glyph_maps(gen.text_layouts([prompt], 3, box))
    assert want.amax() == 1.0  # the word is drawn
    assert torch.equal(seen["vae"], want)
    assert torch.equal(seen["unet"][:1], want)  # the conditional half of guidance


def test_glyph_blur_replaces_the_texts_area_by_its_local_mean_known_answer() -> None:
    """vae.glyph_blur = 3: pixels within the window of a stroke take the mean of their 3x3
    neighbourhood (inside the image), all others stay; no glyph map: the image itself."""
    from components.config import Vae
    from components.models.vae import VAE

    vae = VAE(Vae(image_size=16, base_channels=8, channel_mult=[1, 2], glyph_channels=2,
                  glyph_blur=3))
    x = torch.zeros(1, 3, 8, 8)
    x[..., 4, 4] = 0.9  # one bright pixel: the letter
    glyphs = torch.zeros(1, 1, 8, 8)
    glyphs[..., 4, 4] = 1.0
    out = vae.encoder_input(x, glyphs)
    want = x.clone()
    want[..., 3:6, 3:6] = 0.1  # 0.9 over 9 pixels
    assert torch.allclose(out, want)
    assert torch.equal(vae.encoder_input(x, None), x)
    assert torch.equal(VAE(Vae(image_size=16, base_channels=8, channel_mult=[1, 2],
                               glyph_channels=2)).encoder_input(x, glyphs), x)
