"""The Context U-Net: predicts the noise in a latent, given the timestep, a caption and
(glyph_channels > 0) a glyph map: the requested words drawn where they go (glyphs.py).

    x ─ init_conv ─ down1 ─ down2 ─ to_vec ─ up0 ─┐
         │           │       └──────────────── up1(ctx1 * h + time1) ─┐
         │           └──────────────────────────────── up2(ctx2 * h + time2) ─┐
         └────────────────────────────────────────────── out(ctx3 * h + time3, x)

Time (a float in [0, 1], through sinusoidal features) and the caption embedding each go
through small MLPs; the context *multiplies* and the time *adds* to the decoder features
(the course model does so at h/4 and h/2 only; full_res_context also at full size, where
a small mark such as a logo is drawn).
The glyph map, at the image's full resolution, goes through a small strided encoder
(GlyphEncoder) down to the latent's size and is concatenated with the noisy latent at the
input; the full-size skip (x into `out`) carries it to the output. Captions give the
U-Net *that* there is text; only the glyph map says *which letters* (a subword caption
encoder cannot spell at this scale: docs/lab/2026-12-glyph-conditioning.md).
An all-zero caption embedding with an all-zero glyph map is the unconditional input used
for classifier-free guidance. Two bugs of the widely copied course version are fixed
here: the 1x1 shortcut conv of a residual block is built in __init__ (so it is trained
and saved), and norms are GroupNorm (BatchNorm statistics would differ between training
and EMA sampling).

Saved as one safetensors file holding both weight sets: `model.<name>` (raw, to resume)
and `ema.<name>` (what sampling uses), plus config.json with the constructor arguments.
training/unet.py trains it on the latent cache; the objective and the samplers live in
diffusion.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from components.config import Unet as UnetCfg
from components.contracts import (
    UserError,
    write_json,
)

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(next(g for g in (8, 4, 2, 1) if ch % g == 0), ch)


class ResidualConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), norm(cout), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1), norm(cout), nn.GELU())
        # the course version built this inside forward(): untrained and never saved
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.conv1(x))
        return (self.shortcut(x) + h) / math.sqrt(2)


class UnetDown(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.net = nn.Sequential(ResidualConvBlock(cin, cout), ResidualConvBlock(cout, cout),
                                 nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class UnetUp(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, 2),
                                 ResidualConvBlock(cout, cout), ResidualConvBlock(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, skip], dim=1))


class EmbedFC(nn.Module):
    """A small MLP that maps a vector (time features or caption) to a channel vector."""

    def __init__(self, din: int, dout: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(din, dout), nn.GELU(), nn.Linear(dout, dout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, :, None, None]


class GlyphEncoder(nn.Module):
    """A glyph map (B, 1, H*f, W*f), 0..1, -> features (B, channels, H, W): one stride-2
    conv per halving (f a power of two), then a 3x3 conv. An empty map gives the same
    features for every image (the encoder sees no ink): "no text here"."""

    def __init__(self, channels: int, down: int):
        super().__init__()
        if down < 1 or down & (down - 1):
            raise UserError(f"unet: glyph maps {down}x the latent size; the VAE's down "
                            "factor must be a power of two")
        layers: list[nn.Module] = []
        cin = 1
        for i in range(down.bit_length() - 1):
            cout = channels // 2 if i < down.bit_length() - 2 else channels
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GELU()]
            cin = cout
        layers += [nn.Conv2d(cin, channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, glyph: torch.Tensor) -> torch.Tensor:
        return self.net(glyph)


def split_context(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A caption as token states (B, L, D), zero rows being padding, or one vector (B, D)
    -> (tokens, valid (B, L), pooled (B, D)): the L2-normalised mean of the valid states,
    which is the sentence vector of a mean-pooling encoder. All zeros is no caption."""
    tokens = c[:, None] if c.dim() == 2 else c
    valid = tokens.abs().amax(-1) > 0
    summed = (tokens * valid[..., None].to(tokens.dtype)).sum(1)
    pooled = summed / valid.sum(1, keepdim=True).clamp(min=1).to(tokens.dtype)
    return tokens, valid, torch.nn.functional.normalize(pooled.float(), dim=-1).to(c.dtype)


class CrossAttention(nn.Module):
    """Decoder features attend to the caption's token states, so a word can steer a region
    (a pooled vector mixes every word into one). A learned null token is always there to
    attend to (an empty caption has no other key), and the output projection starts at
    zero: training begins from the plain Context U-Net. Written out with two matmuls:
    at these sizes (64 queries, about 30 keys) torch's fused CPU attention kernel
    (nn.MultiheadAttention's) costs more than they do: the U-Net step was 10% slower."""

    def __init__(self, ch: int, context_dim: int):
        super().__init__()
        self.heads = next(h for h in (4, 2, 1) if ch % h == 0)
        self.norm = norm(ch)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(context_dim, ch)
        self.to_v = nn.Linear(context_dim, ch)
        self.to_out = nn.Linear(ch, ch)
        self.null = nn.Parameter(torch.zeros(1, 1, context_dim))
        for proj in (self.to_q, self.to_k, self.to_v):  # as nn.MultiheadAttention does
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor
                ) -> torch.Tensor:
        b, ch, h, w = x.shape
        heads, d = self.heads, ch // self.heads
        q = self.to_q(self.norm(x).flatten(2).transpose(1, 2))            # (B, HW, ch)
        kv = torch.cat([self.null.expand(b, -1, -1).to(tokens.dtype), tokens], 1)
        k, v = self.to_k(kv), self.to_v(kv)                                 # (B, 1+L, ch)
        q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), valid], 1)
        scores = (q @ k.transpose(-1, -2)).float() * d ** -0.5              # (B, H, HW, 1+L)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        out = (scores.softmax(-1).to(v.dtype) @ v).transpose(1, 2).flatten(2)  # softmax in fp32
        out = self.to_out(out)
        return x + out.transpose(1, 2).reshape(b, ch, h, w).to(x.dtype)


class AttentionPool(nn.Module):
    """Learned queries, each attending over the caption's token states: one vector per
    query, so a single word (the layout's, the logo's) reaches the context MLPs whole. The
    mean over ~30 tokens dilutes it: captions differing in one such word have cosine 0.99.
    No caption (no valid token) gives zeros, as the mean-pooled vector does."""

    def __init__(self, dim: int, queries: int, key_dim: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.randn(queries, key_dim) * key_dim ** -0.5)
        self.to_k = nn.Linear(dim, key_dim)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        t = self.norm(tokens)
        scores = (self.query.to(t.dtype) @ self.to_k(t).transpose(1, 2)).float()  # (B, Q, L)
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        weights = torch.nan_to_num(scores.softmax(-1))  # a row with no valid token: 0
        return (weights.to(t.dtype) @ t).flatten(1)  # (B, Q * dim)


def time_features(t: torch.Tensor, dim: int = 32) -> torch.Tensor:
    """t in [0, 1] (B,) -> sinusoidal features (B, dim); easier for an MLP than a scalar."""
    freqs = torch.exp(torch.arange(dim // 2, dtype=torch.float32, device=t.device)
                      * (math.log(1000.0) / (dim // 2 - 1)))
    angles = t.float()[:, None] * freqs[None] * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ContextUnet(nn.Module):
    def __init__(self, in_channels: int, n_feat: int, context_dim: int, height: int,
                 cross_attention: bool = False, pool_queries: int = 0,
                 full_res_context: bool = False, glyph_channels: int = 0,
                 glyph_down: int = 1):
        super().__init__()
        if height % 4:
            raise UserError(f"unet: latent height {height} is not a multiple of 4; "
                            "change vae.image_size or vae.channel_mult")
        self.in_channels, self.n_feat = in_channels, n_feat
        self.context_dim, self.height = context_dim, height
        self.cross_attention, self.pool_queries = cross_attention, pool_queries
        self.full_res_context = full_res_context
        self.glyph_channels, self.glyph_down = glyph_channels, glyph_down
        n = n_feat
        if glyph_channels:
            self.glyph_encoder = GlyphEncoder(glyph_channels, glyph_down)
        self.init_conv = ResidualConvBlock(in_channels + glyph_channels, n)
        self.down1 = UnetDown(n, n)            # h/2
        self.down2 = UnetDown(n, 2 * n)        # h/4
        self.to_vec = nn.Sequential(nn.AvgPool2d(height // 4), nn.GELU())

        self.time_embed1 = EmbedFC(32, 2 * n)
        self.time_embed2 = EmbedFC(32, n)
        # the caption: its mean-pooled vector, and one vector per learned query
        if pool_queries:
            self.pool = AttentionPool(context_dim, pool_queries)
        self.context_embed1 = EmbedFC(context_dim * (1 + pool_queries), 2 * n)
        self.context_embed2 = EmbedFC(context_dim * (1 + pool_queries), n)
        if full_res_context:
            self.time_embed3 = EmbedFC(32, n)
            self.context_embed3 = EmbedFC(context_dim * (1 + pool_queries), n)

        self.up0 = nn.Sequential(nn.ConvTranspose2d(2 * n, 2 * n, height // 4, height // 4),
                                 norm(2 * n), nn.GELU())
        self.up1 = UnetUp(4 * n, n)
        self.up2 = UnetUp(2 * n, n)
        self.out = nn.Sequential(nn.Conv2d(2 * n, n, 3, padding=1), norm(n), nn.GELU(),
                                 nn.Conv2d(n, in_channels, 3, padding=1))
        if cross_attention:  # at h/4 and h/2 (and h), where a token is worth a region
            self.attn1 = CrossAttention(2 * n, context_dim)
            self.attn2 = CrossAttention(n, context_dim)
            if full_res_context:
                self.attn3 = CrossAttention(n, context_dim)

    @classmethod
    def from_config(cls, cfg: UnetCfg, in_channels: int, context_dim: int, height: int,
                    n_feat: int | None = None, glyph_down: int = 1) -> ContextUnet:
        """The U-Net that `unet.*` describes, for latents (in_channels, height, height),
        captions of context_dim and glyph maps glyph_down x the latent's size (n_feat:
        another width, for benches)."""
        return cls(in_channels, n_feat or cfg.n_feat, context_dim, height,
                   cfg.cross_attention, cfg.pool_queries, cfg.full_res_context,
                   cfg.glyph_channels, glyph_down)

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "n_feat": self.n_feat,
                "context_dim": self.context_dim, "height": self.height,
                "cross_attention": self.cross_attention, "pool_queries": self.pool_queries,
                "full_res_context": self.full_res_context,
                "glyph_channels": self.glyph_channels, "glyph_down": self.glyph_down}

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                glyph: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noisy latent; t: (B,) in [0, 1]; c: the caption, token states
        (B, L, context_dim) with zero rows as padding, or one vector (B, context_dim);
        glyph: (B, 1, H * glyph_down, W * glyph_down) in 0..1 (None: no text)."""
        if self.glyph_channels:
            if glyph is None:
                b, _, h, w = x.shape
                glyph = x.new_zeros(b, 1, h * self.glyph_down, w * self.glyph_down)
            x = torch.cat([x, self.glyph_encoder(glyph.to(x.dtype))], 1)
        x = self.init_conv(x)
        down1 = self.down1(x)
        down2 = self.down2(down1)
        trained = down2.shape[-2:] == (self.height // 4,) * 2
        # another size or aspect than trained on: the same global mean, and below the same
        # global map spread over that size
        hidden = self.to_vec(down2) if trained else self.to_vec[1](down2.mean((2, 3), True))

        tf = time_features(t).to(x.dtype)
        tokens, valid, pooled = split_context(c.to(x.dtype))
        if self.pool_queries:
            pooled = torch.cat([pooled, self.pool(tokens, valid).to(pooled.dtype)], 1)
        temb1, temb2 = self.time_embed1(tf), self.time_embed2(tf)
        cemb1, cemb2 = self.context_embed1(pooled), self.context_embed2(pooled)

        up0 = self.up0(hidden)
        if not trained:
            up0 = F.interpolate(up0, size=down2.shape[-2:], mode="bilinear", align_corners=False)
        up1 = cemb1 * up0 + temb1
        if self.cross_attention:
            up1 = self.attn1(up1, tokens, valid)
        up2 = cemb2 * self.up1(up1, down2) + temb2
        if self.cross_attention:
            up2 = self.attn2(up2, tokens, valid)
        up3 = self.up2(up2, down1)
        if self.full_res_context:
            up3 = self.context_embed3(pooled) * up3 + self.time_embed3(tf)
            if self.cross_attention:
                up3 = self.attn3(up3, tokens, valid)
        return self.out(torch.cat([up3, x], dim=1))


def save_unet(model: ContextUnet, ema_model: ContextUnet | None, config: dict,
              out_dir: Path) -> None:
    """One weights.safetensors with `model.*` (raw) and `ema.*` keys, and config.json
    (`config` plus the constructor arguments under "unet")."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    ema = ema_model if ema_model is not None else model
    tensors |= {f"ema.{k}": v.detach().clone().contiguous()
                for k, v in ema.state_dict().items()}
    save_file(tensors, str(out_dir / WEIGHTS))
    write_json(out_dir / CONFIG, {**config, "unet": model.config()})


def read_unet_config(model_dir: Path) -> dict:
    model_dir = Path(model_dir)
    if not (model_dir / WEIGHTS).exists() or not (model_dir / CONFIG).exists():
        raise UserError(f"{model_dir}: no trained U-Net there (needs {WEIGHTS} and "
                        f"{CONFIG}); run the unet stage first")
    return json.loads((model_dir / CONFIG).read_text())


def load_unet(model_dir: Path, ema: bool = True) -> ContextUnet:
    """The EMA weights (ema=True, for sampling) or the raw ones, in eval mode."""
    config = read_unet_config(model_dir)
    model = ContextUnet(**config["unet"])
    prefix = "ema." if ema else "model."
    tensors = load_file(str(Path(model_dir) / WEIGHTS))
    model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                           if k.startswith(prefix)})
    return model.eval()
