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


def test_the_generator_hands_the_prompts_glyph_map_to_a_glyph_upscaler(tmp_path) -> None:
    """generate plans each prompt's text once: the U-Net gets its glyph map at the sample
    size, an upscaler that reads glyph maps the same layout drawn at its output size."""
    from test_models import StubEncoder, write_tiny_cache

    from components.config import Sampler, Unet, Vae
    from components.models.generator import Generator
    from components.models.glyphs import glyph_batch
    from components.models.upscaler import Upscaler
    from components.models.vae import VAE, save_vae
    from components.training.unet import train_unet

    cache = write_tiny_cache(tmp_path / "latents")
    vae = VAE(Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2]))
    save_vae(vae, vae.cfg, tmp_path / "vae")
    train_unet(Unet(n_feat=8, steps=3, batch_size=4, warmup=1, bf16=False),
               Diffusion(timesteps=50), cache, tmp_path / "unet", "stub", tmp_path / "vae")
    gen = Generator.load(tmp_path / "vae", tmp_path / "unet", Sampler(steps=2),
                         text_encoder=StubEncoder())
    gen.upscaler = Upscaler(factor=4, width=4, depth=1, glyphs=True)
    seen = {}
    unet_forward, upscale = gen.unet.forward, gen.upscaler.upscale
    gen.unet.forward = lambda x, t, c, glyph=None: (seen.setdefault("unet", glyph),
                                                   unet_forward(x, t, c, glyph))[1]
    gen.upscaler.upscale = lambda images, glyphs=None: (seen.setdefault("upscaler", glyphs),
                                                        upscale(images, glyphs))[1]
    prompt = 'red poster, text at the centre, reading "SALE"'
    box = (0.1, 0.3, 0.8, 0.4)  # x, y, w, h
    assert gen.generate([prompt], seed=3, text_box=box, width=100, height=100)[0].size \
        == (100, 100)
    layouts = gen.text_layouts([prompt], 3, box)
    small, big = glyph_batch(layouts, 32, 32, gen.font_path), glyph_batch(layouts, 128, 128,
                                                                          gen.font_path)
    assert small.amax() == 1.0  # the word is drawn
    assert torch.equal(seen["unet"][:1], small)  # the conditional half of guidance
    assert torch.equal(seen["upscaler"], big)
