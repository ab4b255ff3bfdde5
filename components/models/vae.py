"""The VAE: images <-> latents (the network, its loss, save/load; training/vae.py trains it).

Encoder and decoder mirror each other: one residual block (GroupNorm + SiLU + 3x3 conv,
twice) per resolution, a stride-2 conv between resolutions on the way down and
nearest-upsample + conv on the way up. `channel_mult` has one entry per resolution, so
the down factor is 2^(len(channel_mult) - 1): [1, 2, 2] turns 64x64x3 into 16x16xC.

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


class Decoder(nn.Module):
    def __init__(self, base: int, mult: list[int], latent: int, kind: str = "group"):
        super().__init__()
        chs = [base * m for m in reversed(mult)]
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

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for block, up in zip(self.blocks, self.ups, strict=True):
            h = up(block(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    def __init__(self, cfg: VaeCfg):
        super().__init__()
        self.cfg = cfg
        self.down_factor = 2 ** (len(cfg.channel_mult) - 1)
        self.encoder = Encoder(cfg.base_channels, cfg.channel_mult, cfg.latent_channels,
                               cfg.norm)
        self.decoder = Decoder(cfg.base_channels, cfg.channel_mult, cfg.latent_channels,
                               cfg.norm)

    def latent_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        s = (image_size or self.cfg.image_size) // self.down_factor
        return (self.cfg.latent_channels, s, s)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] -> (mean, logvar) of the latent posterior."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """What the reconstruction loss sees: logits for bce, [-1, 1] values otherwise."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z -> image in [-1, 1] whatever the training loss."""
        raw = self.decoder(z)
        if self.cfg.loss == "bce":
            return torch.sigmoid(raw) * 2 - 1
        return raw.clamp(-1, 1)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                part: tuple[int, int] = (0, 1)
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`part` = (rank, processes): x is that slice of a global batch (training.py);
        the noise is drawn for the whole batch on the CPU generator and sliced alike, so
        the stream is the same on any device and process count."""
        mean, logvar = self.encode(x)
        rank, world = part
        eps = torch.randn((len(mean) * world, *mean.shape[1:]), generator=generator,
                          dtype=mean.dtype)[rank::world].to(mean.device)
        z = mean + torch.exp(0.5 * logvar) * eps
        return self.decode_raw(z), mean, logvar


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
             part: tuple[int, int] = (0, 1), weight: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Reconstruction (weighted per pixel by `weight`, (B, 1, H, W), when given) + beta KL
    (per image element) + scale_reg times the scale-equivariance term (Skorokhodov et al.
    2025, "Improving the diffusability of autoencoders"): the decoder must also turn the
    2x-downsampled latent into the 2x-downsampled image, which takes from the latents the
    fine detail that the image does not have and that a diffusion model cannot learn to
    draw in the same steps."""
    raw, mean, logvar = model(x, generator, part)
    inner = getattr(model, "module", model)  # model may be wrapped in DDP
    cfg = inner.cfg
    raw, logvar = raw.float(), logvar.float()
    recon = reconstruction_loss(raw, x, cfg.loss, weight)
    if cfg.scale_reg:
        small = inner.decode_raw(F.avg_pool2d(mean, 2)).float()
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
    # a VAE saved before vae.norm existed has GroupNorm (same weight names and shapes)
    cfg = VaeCfg(**{"norm": "group"} | json.loads((model_dir / CONFIG).read_text())["vae"])
    model = VAE(cfg)
    model.load_state_dict(load_file(str(model_dir / WEIGHTS)))
    return model.eval()
