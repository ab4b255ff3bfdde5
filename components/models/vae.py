"""The VAE: images <-> latents (the network, its loss, save/load; training/vae.py trains it).

Encoder and decoder mirror each other: one residual block (GroupNorm + SiLU + 3x3 conv,
twice) per resolution, a stride-2 conv between resolutions on the way down and
nearest-upsample + conv on the way up. `channel_mult` has one entry per resolution, so
the down factor is 2^(len(channel_mult) - 1): [1, 2, 2] turns 64x64x3 into 16x16xC.

With `glyph_channels` > 0 the decoder also reads the image's glyph map (models/glyphs.py:
its words drawn in brand.font where they are, at full resolution): before each of its
blocks and its output, a small conv stack adds the map, resized to that level, to the
features. The latents then need not carry the letters' shapes (a 16x16 latent cannot: OCR
read 0.065 of the words of a plain decoder's reconstructions); they carry where the ink
is and its colour, and the decoder draws the letters from the map. Generation draws the
map from the prompt's text and its planned layout through the same renderer. With
`glyph_blur` (a window of k pixels) the encoder sees the text's area (the map's strokes
grown by the window) replaced by the image's mean over the window around each pixel: the
latents then hold a smooth patch of the ink's colour where text is, never the letters'
shapes, so the U-Net has no letters to draw and none can come out misaligned with the map.

Loss = reconstruction (mse / l1 on [-1, 1], or bce on logits vs [0, 1] targets) +
beta * KL, with the KL summed over latent elements and divided by the image's element
count, so beta means the same thing at any image size."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from components.config import Vae as VaeCfg
from components.contracts import (
    UserError,
    write_json,
)

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"


class ChannelNorm(nn.Module):
    """LayerNorm over each pixel's channels. GroupNorm's statistics span the whole feature
    map, so a VAE trained on 32 px crops meets other statistics on a whole 64 px image
    (measured: a 32-channel VAE reconstructed 32 px tiles at 26.3 dB, whole images at
    21.1); this one has no statistic over the image's extent, so crops and whole images
    go through the same function."""

    def __init__(self, ch: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(ch)), nn.Parameter(torch.zeros(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias,
                            1e-6).permute(0, 3, 1, 2)


def norm(ch: int, kind: str = "group") -> nn.Module:
    if kind == "channel":
        return ChannelNorm(ch)
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if ch % g == 0)
    return nn.GroupNorm(groups, ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kind: str = "group"):
        super().__init__()
        self.norm1, self.conv1 = norm(cin, kind), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout, kind), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, base: int, mult: list[int], latent: int, kind: str = "group"):
        super().__init__()
        chs = [base * m for m in mult]
        self.conv_in = nn.Conv2d(3, chs[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        cin = chs[0]
        for i, ch in enumerate(chs):
            self.blocks.append(ResBlock(cin, ch, kind))
            last = i == len(chs) - 1
            self.downs.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, 2, padding=1))
            cin = ch
        self.mid = ResBlock(cin, cin, kind)
        self.norm_out = norm(cin, kind)
        self.conv_out = nn.Conv2d(cin, 2 * latent, 3, padding=1)  # mean and logvar
        # the log-variance starts low (std 0.05): with the default 0 (std 1) the decoder
        # first learns from latents drowned in noise, and blurs (+0.8 dB val PSNR at 10
        # epochs, the same as training without any posterior noise)
        with torch.no_grad():
            self.conv_out.bias[latent:] = -6.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block, down in zip(self.blocks, self.downs, strict=True):
            h = down(block(h))
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class GlyphInput(nn.Module):
    """The glyph map (B, 1, H, W in 0..1), area-resized to a feature map's size, through
    3x3 conv, SiLU, 3x3 conv to its channels (zero-initialised: training starts from the
    plain decoder's function)."""

    def __init__(self, width: int, ch: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, ch, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: torch.Tensor, glyphs: torch.Tensor) -> torch.Tensor:
        g = glyphs if glyphs.shape[-2:] == h.shape[-2:] else F.interpolate(
            glyphs, size=h.shape[-2:], mode="area")
        return h + self.net(g.to(h.dtype))


class Decoder(nn.Module):
    def __init__(self, base: int, mult: list[int], latent: int, kind: str = "group",
                 glyph: int = 0):
        super().__init__()
        chs = [base * m for m in reversed(mult)]
        # the glyph map into each block's input and the output (0: none)
        self.glyph = nn.ModuleList([GlyphInput(glyph, ch) for ch in [chs[0], *chs]]
                                   if glyph else [])
        self.conv_in = nn.Conv2d(latent, chs[0], 3, padding=1)
        self.mid = ResBlock(chs[0], chs[0], kind)
        self.blocks = nn.ModuleList()
        self.ups = nn.ModuleList()
        cin = chs[0]
        for i, ch in enumerate(chs):
            self.blocks.append(ResBlock(cin, ch, kind))
            last = i == len(chs) - 1
            self.ups.append(nn.Identity() if last else nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
            cin = ch
        self.norm_out = norm(cin, kind)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, glyphs: torch.Tensor | None = None) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        if self.glyph and glyphs is None:  # no map: an image without text
            glyphs = z.new_zeros(len(z), 1, 1, 1)
        for i, (block, up) in enumerate(zip(self.blocks, self.ups, strict=True)):
            h = up(block(self.glyph[i](h, glyphs) if self.glyph else h))
        if self.glyph:
            h = self.glyph[-1](h, glyphs)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    def __init__(self, cfg: VaeCfg):
        super().__init__()
        self.cfg = cfg
        self.down_factor = 2 ** (len(cfg.channel_mult) - 1)
        self.encoder = Encoder(cfg.base_channels, cfg.channel_mult, cfg.latent_channels,
                               cfg.norm)
        self.decoder = Decoder(cfg.base_channels, cfg.channel_mult, cfg.latent_channels,
                               cfg.norm, cfg.glyph_channels)

    def latent_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        s = (image_size or self.cfg.image_size) // self.down_factor
        return (self.cfg.latent_channels, s, s)

    def encoder_input(self, x: torch.Tensor, glyphs: torch.Tensor | None) -> torch.Tensor:
        """x with its letters blurred (cfg.glyph_blur, where the glyph map has strokes)."""
        k = self.cfg.glyph_blur
        if not k or glyphs is None:
            return x
        area = F.max_pool2d((glyphs > 0).to(x.dtype), k, 1, k // 2)  # letters' surroundings
        local = F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)
        return x + area * (local - x)

    def encode(self, x: torch.Tensor, glyphs: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] -> (mean, logvar) of the latent posterior; `glyphs`: x's glyph maps
        (its letters are blurred first, with cfg.glyph_blur)."""
        mean, logvar = self.encoder(self.encoder_input(x, glyphs)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @property
    def reads_glyphs(self) -> bool:
        return bool(self.cfg.glyph_channels)

    def decode_raw(self, z: torch.Tensor, glyphs: torch.Tensor | None = None) -> torch.Tensor:
        """What the reconstruction loss sees: logits for bce, [-1, 1] values otherwise.
        `glyphs`: (B, 1, H, W) glyph maps in 0..1 (a decoder without glyph input ignores
        them; one with it reads None as no text)."""
        return self.decoder(z, glyphs) if self.reads_glyphs else self.decoder(z)

    def decode(self, z: torch.Tensor, glyphs: torch.Tensor | None = None) -> torch.Tensor:
        """z -> image in [-1, 1] whatever the training loss."""
        raw = self.decode_raw(z, glyphs)
        if self.cfg.loss == "bce":
            return torch.sigmoid(raw) * 2 - 1
        return raw.clamp(-1, 1)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                part: tuple[int, int] = (0, 1), glyphs: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`part` = (rank, processes): x is that slice of a global batch (training.py);
        the noise is drawn for the whole batch on the CPU generator and sliced alike, so
        the stream is the same on any device and process count."""
        mean, logvar = self.encode(x, glyphs)
        rank, world = part
        eps = torch.randn((len(mean) * world, *mean.shape[1:]), generator=generator,
                          dtype=mean.dtype)[rank::world].to(mean.device)
        z = mean + torch.exp(0.5 * logvar) * eps
        return self.decode_raw(z, glyphs), mean, logvar


def reconstruction_loss(raw: torch.Tensor, x: torch.Tensor, name: str,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """The per-element loss, averaged; with `weight` (broadcast over channels) a weighted
    mean, so the loss keeps its scale."""
    if name == "bce":
        per = F.binary_cross_entropy_with_logits(raw, (x + 1) / 2, reduction="none")
    else:
        per = (F.l1_loss if name == "l1" else F.mse_loss)(raw, x, reduction="none")
    if weight is None:
        return per.mean()
    return (per * weight).mean() / weight.mean()


def vae_loss(model: VAE, x: torch.Tensor, generator: torch.Generator | None = None,
             part: tuple[int, int] = (0, 1), weight: torch.Tensor | None = None,
             glyphs: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruction (weighted per pixel by `weight`, (B, 1, H, W), when given) + beta KL
    (per image element) + scale_reg times the scale-equivariance term (Skorokhodov et al.
    2025, "Improving the diffusability of autoencoders"): the decoder must also turn the
    2x-downsampled latent into the 2x-downsampled image, which takes from the latents the
    fine detail that the image does not have and that a diffusion model cannot learn to
    draw in the same steps. `glyphs`: the images' glyph maps, for a decoder that reads them."""
    raw, mean, logvar = model(x, generator, part, glyphs)
    inner = getattr(model, "module", model)  # model may be wrapped in DDP
    cfg = inner.cfg
    raw, logvar = raw.float(), logvar.float()
    recon = reconstruction_loss(raw, x, cfg.loss, weight)
    if cfg.scale_reg:
        small = inner.decode_raw(F.avg_pool2d(mean, 2), None if glyphs is None else
                                 F.avg_pool2d(glyphs, 2)).float()
        target = F.avg_pool2d(x, 2)[..., : small.shape[-2], : small.shape[-1]]
        recon = recon + cfg.scale_reg * reconstruction_loss(small, target, cfg.loss)
    mean = mean.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    return recon + cfg.beta * kl / x[0].numel()


def save_vae(model: VAE, cfg: VaeCfg, out_dir: Path) -> None:
    """weights.safetensors + config.json (the Vae section; enough to rebuild)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS))
    write_json(out_dir / CONFIG, {"vae": cfg.model_dump(mode="json"),
                                  "down_factor": model.down_factor,
                                  "latent_shape": list(model.latent_shape())})


def load_vae(model_dir: Path) -> VAE:
    model_dir = Path(model_dir)
    if not (model_dir / WEIGHTS).exists() or not (model_dir / CONFIG).exists():
        raise UserError(f"{model_dir}: no trained VAE there (needs {WEIGHTS} and {CONFIG}); "
                        "run the vae stage first")
    # a VAE saved before vae.norm (vae.glyph_channels) existed has GroupNorm (no glyph input)
    saved = json.loads((model_dir / CONFIG).read_text())["vae"]
    cfg = VaeCfg(**{"norm": "group", "glyph_channels": 0} | saved)
    model = VAE(cfg)
    model.load_state_dict(load_file(str(model_dir / WEIGHTS)))
    return model.eval()
