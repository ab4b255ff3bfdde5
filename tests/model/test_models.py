"""Model behaviour: shapes, save/load, the two course bugs, determinism, a tiny stage."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.config import Diffusion, Sampler, Unet, Vae
from components.contracts import UserError
from components.models.diffusion import (
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    make_sampler,
    sample,
    training_loss,
)
from components.models.generator import Generator
from components.models.glyphs import glyph_map
from components.models.images import load_image_tensor
from components.models.layout import fit_layouts
from components.models.unet import ContextUnet, load_unet, save_unet, split_context
from components.models.vae import VAE, load_vae, save_vae, vae_loss
from components.training.unet import train_unet
from components.training.vae import train_vae

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"  # brand.font's default

TINY_VAE = Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2], latent_channels=4,
               epochs=1, batch_size=4, bf16=False)


@pytest.mark.parametrize("cfg, latent", [
    (TINY_VAE, (4, 8, 8)),
    (Vae(image_size=32, base_channels=8, channel_mult=[1, 2], latent_channels=3,
         loss="bce"), (3, 16, 16)),
])
def test_vae_shapes(cfg: Vae, latent: tuple[int, int, int]) -> None:
    vae = VAE(cfg).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, *latent)
    assert vae.latent_shape() == latent
    y = vae.decode(mean)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_scale_reg_teaches_the_decoder_downsampled_latents() -> None:
    """vae.scale_reg: the decoder also learns to turn a 2x average-pooled latent into the
    2x average-pooled image; without the term it is never asked to, and does it worse."""
    torch.manual_seed(0)
    # blocky images (4 px cells): pooling them keeps their content
    x = torch.rand(8, 3, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3) * 2 - 1

    def pooled_error(scale_reg: float) -> float:
        torch.manual_seed(0)
        vae = VAE(TINY_VAE.model_copy(update={"scale_reg": scale_reg})).train()
        opt = torch.optim.Adam(vae.parameters(), 3e-3)
        for _ in range(60):
            loss = vae_loss(vae, x, torch.Generator().manual_seed(0))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            mean, _ = vae.encode(x)
            small = vae.decode(torch.nn.functional.avg_pool2d(mean, 2))
            return float((small - torch.nn.functional.avg_pool2d(x, 2)).pow(2).mean())

    assert pooled_error(1.0) < 0.5 * pooled_error(0.0)


@pytest.mark.parametrize("norm", ["group", "channel"])
def test_vae_save_load_round_trip_each_norm(tmp_path: Path, norm: str) -> None:
    cfg = TINY_VAE.model_copy(update={"norm": norm})
    vae = VAE(cfg).eval()
    save_vae(vae, cfg, tmp_path)
    again = load_vae(tmp_path)
    assert again.cfg.norm == norm
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.decode(vae.encode(x)[0]), again.decode(again.encode(x)[0]))


def test_a_vae_saved_before_the_norm_setting_loads_with_group_norm(tmp_path: Path) -> None:
    cfg = TINY_VAE.model_copy(update={"norm": "channel"})
    save_vae(VAE(cfg), cfg, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["vae"]["norm"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_vae(tmp_path).cfg.norm == "group"


def test_channel_norm_treats_a_crop_as_part_of_the_whole() -> None:
    """What training on crops needs: the crop of the normalised map is the normalised
    crop (GroupNorm's statistics span the map, so for it they differ)."""
    x = torch.randn(2, 16, 16, 16) * torch.linspace(0.2, 3, 16)  # spread varies across it
    crop = (..., slice(2, 10), slice(4, 12))
    channel, group = (VAE(TINY_VAE.model_copy(update={"norm": n})) for n in ("channel", "group"))
    cn = channel.encoder.mid.norm1
    assert torch.allclose(cn(x)[crop], cn(x[crop]), atol=1e-5)
    gn = group.encoder.mid.norm1
    assert not torch.allclose(gn(x)[crop], gn(x[crop]), atol=1e-2)


def test_load_image_flattens_transparency_on_white(tmp_path: Path) -> None:
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("L", (40, 40), 0).save(tmp_path / "grey.png")
    assert torch.allclose(load_image_tensor(tmp_path / "clear.png", 16), torch.ones(3, 16, 16))
    assert load_image_tensor(tmp_path / "grey.png", 16).shape == (3, 16, 16)


def test_train_vae_writes_outputs(tmp_path: Path) -> None:
    paths = []
    for i, colour in enumerate(["red", "blue", "green", "yellow", "white", "black"]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (64, 64), colour).save(p)
        paths.append(p)
    m = train_vae(TINY_VAE.model_copy(update={"val_per_epoch": 1}), paths[:4], paths[4:],
                  tmp_path / "vae")
    assert {"weights.safetensors", "config.json", "recon.png"} <= {
        p.name for p in (tmp_path / "vae").iterdir()}
    assert m["epochs"] == 1 and m["images_per_s"] > 0 and np.isfinite(m["val_psnr"])
    # the model folder keeps the results, not the run's timings: its hash reproduces
    kept = json.loads((tmp_path / "vae" / "metrics.json").read_text())
    assert "seconds" not in kept and "images_per_s" not in kept
    assert kept["val_psnr"] == m["val_psnr"] and kept["epochs"] == 1
    # the curve watches 1 val image; the reported PSNR is the saved weights' on both
    from components.models.images import load_batch
    from components.training.runtime import runtime
    from components.training.vae import evaluate_recon

    assert m["val_images_per_epoch"] == 1 and m["val_images"] == 2
    psnr, _ssim, _ = evaluate_recon(load_vae(tmp_path / "vae"), load_batch(paths[4:], 32), 64,
                                    runtime("cpu", False))
    assert psnr == pytest.approx(m["val_psnr"], abs=1e-3)
    with pytest.raises(UserError):
        train_vae(TINY_VAE, [], paths, tmp_path / "none")


def test_random_crop_is_a_seeded_window_on_the_latent_grid() -> None:
    from components.training.vae import random_crop

    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    assert random_crop(x, 0, 4, torch.Generator()) is x  # 0: whole images
    seen = set()
    for seed in range(20):
        a = random_crop(x, 16, 4, torch.Generator().manual_seed(seed))
        b = random_crop(x, 16, 4, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b) and a.shape == (2, 3, 16, 16)
        i, j = divmod(int(a[0, 0, 0, 0]), 32)
        assert i % 4 == 0 and j % 4 == 0 and i <= 16 and j <= 16
        assert torch.equal(a, x[..., i : i + 16, j : j + 16])
        seen.add((i, j))
    assert len(seen) > 5


def test_q_sample_uses_sqrt_one_minus_alpha_bar() -> None:
    schedule = NoiseSchedule(Diffusion(timesteps=100))
    t = torch.full((20000,), 10)
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0))
    xt = schedule.q_sample(torch.zeros(20000, 1), t, noise)
    want = 1 - schedule.alphas_cumprod[10]  # small t: (1 - ab)^2 would be ~100x smaller
    assert xt.var().item() == pytest.approx(want.item(), rel=0.05)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_predictions_invert_the_training_target(prediction: str) -> None:
    schedule = NoiseSchedule(Diffusion(timesteps=1000, schedule="cosine",
                                       prediction=prediction))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    # v stays exact at the very last step, where sqrt(alpha-bar) is ~5e-5
    for step in ([10, 500, 999] if prediction == "v" else [10, 500]):
        t = torch.full((3,), step)
        xt = schedule.q_sample(x0, t, noise)
        got_x0, got_eps = schedule.predictions(schedule.target(x0, noise, t), step, xt)
        assert torch.allclose(got_x0, x0, atol=1e-3) and torch.allclose(got_eps, noise,
                                                                         atol=1e-3)


def test_cosine_schedule_is_monotone() -> None:
    ab = NoiseSchedule(Diffusion(timesteps=50, schedule="cosine")).alphas_cumprod
    assert (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < 0.01


def test_unet_shortcut_conv_is_a_saved_parameter() -> None:
    net = ContextUnet(in_channels=4, n_feat=8, context_dim=6, height=16)
    keys = set(net.state_dict())
    assert "init_conv.shortcut.weight" in keys  # 4 -> 8 channels needs the 1x1 conv
    before = len(list(net.modules()))
    out = net(torch.randn(2, 4, 16, 16), torch.rand(2), torch.randn(2, 6))
    assert out.shape == (2, 4, 16, 16)
    assert len(list(net.modules())) == before


def test_cross_attention_reads_tokens_and_ignores_padding() -> None:
    torch.manual_seed(0)
    plain = ContextUnet(4, 8, 6, 8).eval()
    net = ContextUnet(4, 8, 6, 8, cross_attention=True).eval()
    net.load_state_dict(plain.state_dict(), strict=False)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    tokens = torch.randn(2, 3, 6)
    padded = torch.cat([tokens, torch.zeros(2, 4, 6)], 1)
    with torch.no_grad():
        # at init (zero output projection) it is the plain U-Net on the pooled vector
        pooled = torch.nn.functional.normalize(tokens.mean(1), dim=-1)
        assert torch.allclose(net(x, t, tokens), plain(x, t, pooled), atol=1e-5)
        for p in net.parameters():  # any trained weights
            p.add_(0.1 * torch.randn_like(p))
        out = net(x, t, tokens)
        assert torch.allclose(out, net(x, t, padded), atol=1e-5)  # padding is not read
        reordered = tokens[:, [2, 0, 1]]  # same pooled vector, other tokens per position
        assert torch.isfinite(net(x, t, torch.zeros(2, 7, 6))).all()  # no caption
        changed = tokens.clone()
        changed[:, 1] = torch.randn(2, 6)
        assert not torch.allclose(out, net(x, t, changed), atol=1e-4)
        assert torch.allclose(out, net(x, t, reordered), atol=1e-4)  # a set, not a sequence



def test_attention_pool_sees_what_the_mean_hides_and_ignores_padding() -> None:
    torch.manual_seed(0)
    plain = ContextUnet(4, 8, 6, 8).eval()
    pooled = ContextUnet(4, 8, 6, 8, pool_queries=2).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    tokens = torch.randn(2, 3, 6)
    shift = torch.randn(2, 6)
    same_mean = tokens.clone()  # two words changed, their mean (the pooled vector) kept
    same_mean[:, 0] += shift
    same_mean[:, 1] -= shift
    padded = torch.cat([tokens, torch.zeros(2, 4, 6)], 1)
    with torch.no_grad():
        assert torch.allclose(plain(x, t, tokens), plain(x, t, same_mean), atol=1e-5)
        out = pooled(x, t, tokens)
        assert not torch.allclose(out, pooled(x, t, same_mean), atol=1e-4)
        assert torch.allclose(out, pooled(x, t, padded), atol=1e-5)
        empty = torch.zeros(2, 5, 6)  # no caption: the pool adds zeros, nothing undefined
        assert torch.equal(pooled.pool(*split_context(empty)[:2]), torch.zeros(2, 12))
        assert torch.isfinite(pooled(x, t, empty)).all()


def test_cross_attention_computes_what_multihead_attention_does() -> None:
    from components.models.unet import CrossAttention

    torch.manual_seed(0)
    ours = CrossAttention(8, 6)
    ref = torch.nn.MultiheadAttention(8, ours.heads, kdim=6, vdim=6, batch_first=True)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p))
        ref.q_proj_weight.copy_(ours.to_q.weight)
        ref.k_proj_weight.copy_(ours.to_k.weight)
        ref.v_proj_weight.copy_(ours.to_v.weight)
        ref.in_proj_bias.copy_(torch.cat([ours.to_q.bias, ours.to_k.bias, ours.to_v.bias]))
        ref.out_proj.load_state_dict(ours.to_out.state_dict())
        x, tokens = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 6)
        valid = torch.tensor([[True, True, False], [True, False, False]])
        q = ours.norm(x).flatten(2).transpose(1, 2)
        kv = torch.cat([ours.null.expand(2, -1, -1), tokens], 1)
        pad = torch.cat([torch.zeros(2, 1, dtype=torch.bool), ~valid], 1)
        expected, _ = ref(q, kv, kv, key_padding_mask=pad, need_weights=False)
        expected = x + expected.transpose(1, 2).reshape(x.shape)
        assert torch.allclose(ours(x, tokens, valid), expected, atol=1e-5)

@pytest.mark.parametrize("height", [8, 12, 16, 32])
def test_unet_handles_multiples_of_four(height: int) -> None:
    net = ContextUnet(in_channels=3, n_feat=8, context_dim=5, height=height)
    assert net(torch.randn(1, 3, height, height), torch.rand(1), torch.zeros(1, 5)).shape \
        == (1, 3, height, height)


def test_text_weight_puts_the_loss_on_the_letters() -> None:
    """vae.text_weight: the weight map is 1 + w on ink (a white bar on blue, grown by a
    pixel) and 1 on the background; the weighted loss is the weighted mean (known
    answer), and with no weight the plain mean."""
    from components.models.vae import reconstruction_loss
    from components.training.vae import ink_weights

    im = torch.full((1, 3, 64, 64), -1.0)
    im[:, 2] = 0.7  # blue
    im[:, :, 30:34, 10:54] = 1.0  # a white bar: "text"
    w = ink_weights(im, 4.0)
    assert w.shape == (1, 1, 64, 64)
    assert torch.all(w[0, 0, 30:34, 10:54] == 5.0) and w[0, 0, 29, 20] == 5.0  # grown
    assert torch.all(w[0, 0, :20] == 1.0) and torch.all(w[0, 0, 45:] == 1.0)
    raw, x = torch.zeros(1, 3, 2, 2), torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2) \
        .expand(1, 3, 2, 2)
    weight = torch.tensor([1.0, 1.0, 1.0, 5.0]).view(1, 1, 2, 2)
    assert reconstruction_loss(raw, x, "mse", weight).item() == pytest.approx(
        (1 + 4 + 9 + 5 * 16) / 8)
    assert reconstruction_loss(raw, x, "mse").item() == pytest.approx(30 / 4)


def test_ddim_eta0_is_deterministic_and_ddpm_seeded() -> None:
    net = ContextUnet(in_channels=4, n_feat=8, context_dim=6, height=8).eval()
    schedule = NoiseSchedule(Diffusion(timesteps=50))
    c = torch.randn(2, 6)

    def run(sampler, seed: int) -> torch.Tensor:
        sampler.set_timesteps(5)
        return sample(net, schedule, sampler, c, (4, 8, 8), 3.0,
                      torch.Generator().manual_seed(seed))

    ddim = DDIMSampler(schedule, eta=0.0)
    assert torch.equal(run(ddim, 0), run(ddim, 0))
    # eta=0: the only randomness is the starting noise
    x = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8)
    x0 = torch.randn(2, 4, 8, 8)
    a = ddim.step(x0, eps, 40, 30, x, torch.Generator().manual_seed(1))
    b = ddim.step(x0, eps, 40, 30, x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    ddpm = DDPMSampler(schedule)
    assert torch.equal(run(ddpm, 3), run(ddpm, 3))
    assert not torch.equal(run(ddpm, 3), run(ddpm, 4))
    assert make_sampler(Sampler(name="ddpm", steps=7), schedule).timesteps.numel() == 7


def write_tiny_cache(root: Path, n: int = 24, dim: int = 6, shape=(4, 8, 8),
                     encoder: str = "stub", banners: int = 0) -> Path:
    """A latent cache of n rows (n - 8 train, 4 val, 4 test); `banners`: every third row up
    to that many is a 2:1 banner (latents (C, h, 2h)), the others square posters."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    c, h = shape[0], shape[1]
    formats = ["poster"] * n
    for i in range(2, n, 3)[:banners]:
        formats[i] = "banner"
    latent = {"poster": (h, h), "banner": (h, 2 * h)}
    # every other row reads "SALE" at the centre, the rest nothing; layout statistics and
    # font to match
    boxes = [[{"text": "SALE", "box": [0.2, 0.35, 0.8, 0.65], "words": []}] if i % 2 else []
             for i in range(n)]
    format_row, meta_formats = np.zeros(n, np.int64), {}  # glyph maps: 4x the latent side
    for f in dict.fromkeys(formats):
        rows = [i for i in range(n) if formats[i] == f]
        format_row[rows] = np.arange(len(rows))
        lh, lw = latent[f]
        np.save(root / f"mean_{f}.npy", rng.normal(size=(len(rows), c, lh, lw)).astype(np.float32))
        np.save(root / f"logvar_{f}.npy", np.full((len(rows), c, lh, lw), -4.0, np.float32))
        np.save(root / f"glyphs_{f}.npy", np.stack([np.asarray(glyph_map(
            boxes[i], lw * 4, lh * 4, FONT)) for i in rows]))
        meta_formats[f] = {"ratio": [lw // lh, 1], "size": [lw * 4, lh * 4],
                           "latent_shape": [lh, lw], "images": len(rows)}
    save_captions(root, rng.normal(size=(n, dim)), rng.normal(size=(n, dim)))
    split = ["train"] * (n - 8) + ["val"] * 4 + ["test"] * 4
    pd.DataFrame({"id": [f"i{i}" for i in range(n)], "row": np.arange(n), "split": split,
                  "caption": [f"caption {i}" for i in range(n)],
                  "key": [f"k{i}" for i in range(n)], "format": formats,
                  "format_row": format_row}).to_parquet(root / "index.parquet")
    (root / "meta.json").write_text(json.dumps({
        "scale_factor": 0.9, "latent_shape": list(shape), "text_dim": dim,
        "text_encoder": encoder, "formats": meta_formats, "max_stretch": 1.25}))
    (root / "layout.json").write_text(json.dumps(fit_layouts([("centre", b) for b in boxes])))
    shutil.copyfile(FONT, root / "font.ttf")
    (root / "vocabulary.json").write_text(json.dumps({
        "colours": {c: c for c in ("red", "blue", "green")},
        "saturation": ["vivid", "soft", "muted"], "formats": list(meta_formats)}))
    return root


def save_captions(root: Path, with_text: np.ndarray, without: np.ndarray) -> None:
    """One phrasing per row: its caption vector with its text, and without."""
    n = len(with_text)
    np.save(root / "captions.npy", np.concatenate([with_text, without]).astype(np.float32))
    np.save(root / "caption_rows.npy", np.stack([np.arange(n), np.arange(n, 2 * n)], 1)
            [:, :, None].astype(np.int32))


def tiny_cache_and_vae(root: Path) -> Path:
    """A tiny latent cache at root/latents and a random VAE at root/vae: what train_unet
    reads. Returns the cache folder."""
    cache = write_tiny_cache(root / "latents")
    vae = VAE(Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2]))
    save_vae(vae, vae.cfg, root / "vae")
    return cache


@dataclass
class _Encoded:
    vectors: np.ndarray


class StubEncoder:
    """Deterministic 6-d 'embedding' per prompt, so tests need no pretrained model."""

    def encode(self, texts: list[str]) -> _Encoded:
        vecs = [np.random.default_rng(abs(hash(t)) % 2**32).normal(size=6) for t in texts]
        return _Encoded(np.asarray(vecs, dtype=np.float32))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("models")
    cache = write_tiny_cache(root / "latents")
    vae = VAE(Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2]))
    save_vae(vae, vae.cfg, root / "vae")
    metrics = train_unet(Unet(n_feat=8, steps=60, batch_size=4, warmup=5, bf16=False),
                         Diffusion(timesteps=50), cache, root / "unet", "stub",
                         vae_dir=root / "vae")
    return root / "vae", root / "unet", metrics


def test_train_unet_writes_its_files(trained) -> None:
    _, unet_dir, metrics = trained
    assert {"weights.safetensors", "config.json", "loss.csv", "samples.png"} <= {
        p.name for p in unet_dir.iterdir()}
    assert metrics["steps"] == 60 and np.isfinite(metrics["final_loss"])
    config = json.loads((unet_dir / "config.json").read_text())
    assert config["scale_factor"] == 0.9 and config["latent_shape"] == [4, 8, 8]
    assert config["image_size"] == 32 and config["text_encoder"] == "stub"
    assert pd.read_csv(unet_dir / "loss.csv")["step"].tolist() == [50, 60]
    kept = json.loads((unet_dir / "metrics.json").read_text())
    assert "seconds" not in kept and "steps_per_s" not in kept
    assert kept["final_loss"] == metrics["final_loss"]
    raw, ema = load_unet(unet_dir, ema=False), load_unet(unet_dir, ema=True)
    assert not torch.equal(raw.out[0].weight, ema.out[0].weight)


@pytest.mark.parametrize("full_res", [False, True])
def test_save_unet_round_trip(tmp_path: Path, full_res: bool) -> None:
    torch.manual_seed(0)
    net = ContextUnet(4, 8, 6, 8, cross_attention=True, full_res_context=full_res).eval()
    for p in net.parameters():  # trained weights (zero-initialised projections are not)
        p.data.add_(0.1 * torch.randn_like(p))
    save_unet(net, None, {"note": 1}, tmp_path)
    again = load_unet(tmp_path)
    assert again.full_res_context is full_res
    args = torch.randn(1, 4, 8, 8), torch.rand(1), torch.randn(1, 3, 6)
    with torch.no_grad():
        out = net(*args)
        assert torch.equal(out, again(*args))
        if full_res:  # the caption also steers the full-size decoder features
            net.context_embed3.net[-1].bias.add_(1.0)
            assert not torch.allclose(out, net(*args))


def test_unet_saved_before_full_res_context_loads_as_it_was(tmp_path: Path) -> None:
    net = ContextUnet(4, 8, 6, 8).eval()
    save_unet(net, None, {}, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["unet"]["full_res_context"]  # as older versions wrote it
    (tmp_path / "config.json").write_text(json.dumps(config))
    again = load_unet(tmp_path)
    assert not again.full_res_context and not hasattr(again, "context_embed3")


def test_generator_same_seed_same_image_and_size(trained) -> None:
    vae_dir, unet_dir, _ = trained
    gen = Generator.load(vae_dir, unet_dir, Sampler(steps=4), text_encoder=StubEncoder())
    a = gen.generate(["red poster", "blue poster"], seed=7)
    b = gen.generate(["red poster", "blue poster"], seed=7)
    assert a[0].size == (32, 32)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    other = gen.generate(["red poster"], seed=8)[0]
    assert not np.array_equal(np.asarray(other), np.asarray(a[0]))
    sized = gen.generate(["red poster"], seed=7, width=48, height=40, steps=3, guidance=2.0)
    assert sized[0].size == (48, 40)


@pytest.mark.parametrize("bf16", [True, False])
def test_the_unet_samples_in_the_precision_sampler_bf16_sets(trained, bf16: bool) -> None:
    vae_dir, unet_dir, _ = trained
    gen = Generator.load(vae_dir, unet_dir, Sampler(steps=2, bf16=bf16),
                         text_encoder=StubEncoder())
    seen = []
    gen.unet.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    image = gen.generate(["red poster"], seed=1)[0]
    assert set(seen) == {torch.bfloat16 if bf16 else torch.float32} and image.size == (32, 32)


def test_other_formats_are_sampled_in_their_own_aspect(trained, capsys, monkeypatch) -> None:
    """A banner or story is sampled at its aspect (about the native pixel count, on the
    U-Net's grid), not as a square stretched into it; the output is exactly the size
    asked, with a one-line warning that the model saw squares only."""
    vae_dir, unet_dir, _ = trained
    gen = Generator.load(vae_dir, unet_dir, Sampler(steps=3), text_encoder=StubEncoder())
    banner = gen.generate(["red poster"], seed=1, width=81, height=40)[0]
    assert banner.size == (81, 40)
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "81x40 is sampled at 32x16" in said[0]
    assert gen.generate(["red poster"], seed=1, width=50, height=50)[0].size == (50, 50)
    assert capsys.readouterr().err == ""  # square: the native size, nothing to say
    monkeypatch.setattr(Generator, "native_size", property(lambda self: 64))
    gen.formats = {}  # a model from before formats (buckets): squares only
    assert [gen.sample_size(w, h) for w, h in [(800, 400), (450, 800), (800, 800),
                                               (800, None), (None, None)]] == [
        (96, 48), (48, 80), (64, 64), (64, 64), (64, 64)]


def test_the_unet_runs_on_latents_of_another_aspect() -> None:
    net = ContextUnet(4, 8, 6, 8, cross_attention=True, glyph_channels=4, glyph_down=4).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 4, 8, 16), torch.rand(2), torch.randn(2, 3, 6),
                  torch.zeros(2, 1, 32, 64))
    assert out.shape == (2, 4, 8, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, steps", [("ddpm", 30), ("ddim", 10), ("dpmpp2m", 10)])
def test_every_sampler_gives_finite_images_of_the_right_size(trained, name: str,
                                                              steps: int) -> None:
    vae_dir, unet_dir, _ = trained
    gen = Generator.load(vae_dir, unet_dir, Sampler(name=name, steps=steps),
                         text_encoder=StubEncoder())
    images = gen.generate(["red poster", "blue poster"], seed=1)
    arrays = [np.asarray(im) for im in images]
    assert all(a.shape == (32, 32, 3) and np.isfinite(a).all() for a in arrays)
    again = gen.generate(["red poster", "blue poster"], seed=1)  # multistep state reset
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(arrays, again, strict=True))


def test_dpm_solver_converges_to_ddim_with_many_steps() -> None:
    """Both integrate the same ODE: with enough steps their answers meet."""
    net = ContextUnet(in_channels=4, n_feat=8, context_dim=6, height=8).eval()
    schedule = NoiseSchedule(Diffusion(timesteps=200, schedule="cosine", prediction="v"))
    c = torch.randn(2, 6)

    def run(name: str, steps: int) -> torch.Tensor:
        return sample(net, schedule, make_sampler(Sampler(name=name, steps=steps), schedule),
                      c, (4, 8, 8), 1.0, torch.Generator().manual_seed(0))

    ref = run("ddim", 200)
    err_dpm = (run("dpmpp2m", 25) - ref).abs().mean()
    err_ddim = (run("ddim", 25) - ref).abs().mean()
    assert err_dpm < err_ddim  # second order beats first order at the same step count


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, module, name: str, calls: int) -> None:
    """Make module.name raise KeyboardInterrupt (a user's Ctrl-C) on call number `calls`."""
    real, count = getattr(module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def _same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_text_drop_trains_on_the_captions_without_their_free_text(tmp_path: Path) -> None:
    cache = write_tiny_cache(tmp_path / "latents")
    vae = VAE(Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2]))
    save_vae(vae, vae.cfg, tmp_path / "vae")

    def run(name: str, drop: float) -> Path:
        train_unet(Unet(n_feat=8, steps=6, batch_size=4, warmup=1, bf16=False, text_drop=drop,
                        checkpoint_every=0), Diffusion(timesteps=50), cache, tmp_path / name,
                   "stub", tmp_path / "vae")
        return tmp_path / name

    never, always = run("never", 0.0), run("always", 1.0)
    assert not _same_weights(never, always)
    # with attribute captions equal to the full ones, dropping the text changes nothing
    with_text = np.load(cache / "captions.npy")[:len(np.load(cache / "caption_rows.npy"))]
    save_captions(cache, with_text, with_text)
    assert _same_weights(never, run("same", 1.0))


def test_unet_draws_one_of_each_rows_phrasings_per_step(tmp_path: Path) -> None:
    cache = write_tiny_cache(tmp_path / "latents")
    vae = VAE(Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2]))
    save_vae(vae, vae.cfg, tmp_path / "vae")
    states, rows = np.load(cache / "captions.npy"), np.load(cache / "caption_rows.npy")

    def run(name: str, second: np.ndarray | None, share: float = 0.5) -> Path:
        """Train with each row's one phrasing, or with a second one (states `second`) drawn
        when the template's (the first) is not: 1 - share of the steps."""
        if second is None:
            np.save(cache / "caption_rows.npy", rows)
            np.save(cache / "captions.npy", states)
        else:
            np.save(cache / "captions.npy", np.concatenate([states, second]))
            extra = len(states) + np.arange(len(second)).reshape(rows.shape)
            np.save(cache / "caption_rows.npy", np.concatenate([rows, extra], 2))
        train_unet(Unet(n_feat=8, steps=6, batch_size=4, warmup=1, bf16=False,
                        template_share=share, checkpoint_every=0), Diffusion(timesteps=50),
                   cache, tmp_path / name, "stub", tmp_path / "vae")
        return tmp_path / name

    one = run("one", None)
    assert _same_weights(one, run("same", states[rows.reshape(-1)]))  # the same words twice
    assert not _same_weights(one, run("other", -states[rows.reshape(-1)]))
    assert _same_weights(one, run("template", -states[rows.reshape(-1)], share=1.0))


@pytest.mark.parametrize("banners", [0, 6])
def test_unet_killed_and_resumed_equals_straight_run(tmp_path: Path, monkeypatch,
                                                     banners: int) -> None:
    import components.models.diffusion as diffusion

    monkeypatch.chdir(tmp_path)
    cache = write_tiny_cache(tmp_path / "latents", banners=banners)
    vae = VAE(Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2]))
    save_vae(vae, vae.cfg, tmp_path / "vae")
    cfg = Unet(n_feat=8, steps=40, batch_size=4, warmup=5, bf16=False, checkpoint_every=20)
    args = (Diffusion(timesteps=50), cache)
    train_unet(cfg, *args, tmp_path / "straight", "stub", tmp_path / "vae")
    assert not (tmp_path / ".cache" / "checkpoints" / "unet").exists()  # cleared when done

    with monkeypatch.context() as m:
        _interrupt_after(m, diffusion, "training_loss", 27)
        with pytest.raises(KeyboardInterrupt):
            train_unet(cfg, *args, tmp_path / "resumed", "stub", tmp_path / "vae")
    assert not (tmp_path / "resumed").exists()  # nothing half-written
    assert len(list((tmp_path / ".cache" / "checkpoints" / "unet").glob("*.pt"))) == 1
    other = train_unet(cfg.model_copy(update={"steps": 30}), *args, tmp_path / "other",
                       "stub", tmp_path / "vae")
    assert other["resumed_at"] == 0  # other settings never resume this run's checkpoint
    with monkeypatch.context() as m:
        _interrupt_after(m, diffusion, "training_loss", 27)
        with pytest.raises(KeyboardInterrupt):
            train_unet(cfg, *args, tmp_path / "resumed", "stub", tmp_path / "vae")
    m = train_unet(cfg, *args, tmp_path / "resumed", "stub", tmp_path / "vae")
    assert m["resumed_at"] == 20
    assert _same_weights(tmp_path / "straight", tmp_path / "resumed")
    assert (pd.read_csv(tmp_path / "straight" / "loss.csv")
            .equals(pd.read_csv(tmp_path / "resumed" / "loss.csv")))


def _vae_images(tmp_path: Path, n: int = 10) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 40), (25 * i, 200 - 15 * i, 90)).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("ema, crop, text_weight, buckets", [
    (0.0, 0, 0.0, False), (0.9, 16, 0.0, False), (0.0, 16, 3.0, False), (0.0, 0, 0.0, True)])
def test_vae_killed_and_resumed_equals_straight_run(tmp_path: Path, monkeypatch, ema: float,
                                                    crop: int, text_weight: float,
                                                    buckets: bool) -> None:
    """buckets: half the images are 2:1 banners; batches of one shape each, resumed as
    they were drawn."""
    import components.training.vae as vae_module  # where the loop looks vae_loss up

    monkeypatch.chdir(tmp_path)
    paths = _vae_images(tmp_path)
    cfg = TINY_VAE.model_copy(update={"epochs": 3, "checkpoint_every": 1, "ema": ema,
                                      "early_stop_patience": 5, "crop": crop,
                                      "text_weight": text_weight})
    kw = {}
    if buckets:
        shapes = []
        real_loss = vae_module.vae_loss
        monkeypatch.setattr(vae_module, "vae_loss", lambda net, x, *a: (
            shapes.append(tuple(x.shape[-2:])), real_loss(net, x, *a))[1])
        kw = {"formats": (["poster", "banner"] * 4, ["poster", "banner"]),
              "sizes": {"poster": (32, 32), "banner": (64, 32)}}
    straight = train_vae(cfg, paths[:8], paths[8:], tmp_path / "straight", **kw)
    if buckets:  # 4 of each: one batch of each shape an epoch, never mixed
        assert sorted(shapes) == [(32, 32)] * 3 + [(32, 64)] * 3
    with monkeypatch.context() as m:
        _interrupt_after(m, vae_module, "vae_loss", 2 * 2 + 1)  # 2 steps an epoch: in epoch 3
        with pytest.raises(KeyboardInterrupt):
            train_vae(cfg, paths[:8], paths[8:], tmp_path / "resumed", **kw)
    resumed = train_vae(cfg, paths[:8], paths[8:], tmp_path / "resumed", **kw)
    assert resumed["resumed_at_epoch"] == 2
    assert resumed["epoch_losses"] == straight["epoch_losses"]
    assert _same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_tfidf_encoder_travels_with_the_unet_to_the_generator(tmp_path: Path) -> None:
    from components.models.text_encoders import TfidfTextEncoder, save_encoder

    captions = [f"vivid {c} solid poster reading {w}" for c in ("red", "blue", "green")
                for w in ("SALE", "NEW", "OPEN", "HOT", "BIG", "FREE", "CLUB", "SHOP")]
    cache = write_tiny_cache(tmp_path / "latents", n=len(captions), dim=4, encoder="tfidf")
    enc = TfidfTextEncoder.fit(captions, 4)
    save_captions(cache, enc.encode(captions).vectors,
                  enc.encode([c.split(" reading")[0] for c in captions]).vectors)
    save_encoder(enc, cache / "text_encoder")
    vae = VAE(Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2]))
    save_vae(vae, vae.cfg, tmp_path / "vae")
    train_unet(Unet(n_feat=8, steps=5, batch_size=4, warmup=1, bf16=False),
               Diffusion(timesteps=50), cache, tmp_path / "unet", "tfidf", tmp_path / "vae")
    assert (tmp_path / "unet" / "text_encoder" / "tfidf.json").exists()
    gen = Generator.load(tmp_path / "vae", tmp_path / "unet", Sampler(steps=2))
    assert isinstance(gen.text_encoder, TfidfTextEncoder)
    assert gen.generate(["vivid red solid poster reading SALE"])[0].size == (32, 32)


def test_min_snr_weighting_is_off_by_default_and_capped_when_on() -> None:
    t = torch.arange(0, 1000, 50)
    assert torch.equal(NoiseSchedule(Diffusion()).loss_weight(t), torch.ones(len(t)))
    for prediction in ("eps", "v"):
        w = NoiseSchedule(Diffusion(min_snr_gamma=5, prediction=prediction)).loss_weight(t)
        assert (w > 0).all() and (w <= 1 + 1e-6).all()
        assert w[0] < w[len(w) // 2]  # the nearly clean steps are the ones held back


def test_the_models_do_not_need_torchvision() -> None:
    """No module of ours imports torchvision, and where it is not installed (the CPU build
    here) every model module imports without it. Where it is installed, torchmetrics
    imports it on its own (seen on a CUDA machine), so only the first half applies."""
    import importlib.util
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    ours = [p for d in ("components", "flows", "bench") for p in (root / d).glob("*.py")
            if "torchvision" in p.read_text()]
    assert ours == []
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here; libraries import it when they find it")
    code = ("import components.models.generator, components.models.unet, components.models.vae, "
            "components.judge.evaluate, components.training.latents, sys; "
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("unet_kw", [{"pool_queries": 2}, {"cross_attention": True}, {},
                                     {"cross_attention": True, "full_res_context": True}])
def test_the_models_compute_on_their_inputs_device(unet_kw: dict) -> None:
    """No tensor made on the CPU inside forward or the losses (a CUDA run would stop at
    it): on the meta device a stray CPU tensor raises just as it would beside CUDA."""
    meta = torch.device("meta")
    unet = ContextUnet(in_channels=4, n_feat=8, context_dim=6, height=8, **unet_kw).to(meta)
    x0, c = torch.randn(2, 4, 8, 8, device=meta), torch.randn(2, 5, 6, device=meta)
    loss = training_loss(unet, NoiseSchedule(Diffusion(timesteps=50)), x0, c, 0.1,
                         torch.Generator().manual_seed(0))
    assert loss.device == meta
    vae = VAE(TINY_VAE.model_copy(update={"scale_reg": 1.0})).to(meta)
    assert vae_loss(vae, torch.randn(2, 3, 32, 32, device=meta),
                    torch.Generator().manual_seed(0)).device == meta


def test_vae_early_stopping_keeps_the_best_epoch(tmp_path: Path, monkeypatch) -> None:
    """No epoch after the first is 'better' by 100 dB: with patience 1 training stops after
    epoch 2 and saves epoch 1's weights, whose PSNR is the one reported."""
    from components.models.images import load_batch
    from components.training.runtime import runtime
    from components.training.vae import evaluate_recon

    monkeypatch.chdir(tmp_path)
    paths = _vae_images(tmp_path)
    cfg = TINY_VAE.model_copy(update={"epochs": 6, "early_stop_patience": 1,
                                      "early_stop_min_delta": 100.0, "ema": 0.5})
    m = train_vae(cfg, paths[:8], paths[8:], tmp_path / "vae")
    assert m["stopped_early"] and m["epochs"] == 2 and m["best_epoch"] == 1
    curve = pd.read_csv(tmp_path / "vae" / "loss.csv")
    assert list(curve["epoch"]) == [1, 2] and m["val_psnr"] == pytest.approx(
        curve["val_psnr"][0], abs=1e-3)
    psnr, _ssim, _ = evaluate_recon(load_vae(tmp_path / "vae"),
                                    load_batch(paths[8:], cfg.image_size), 64,
                                    runtime("cpu", False))
    assert psnr == pytest.approx(m["val_psnr"], abs=1e-3)  # the saved weights are epoch 1's
