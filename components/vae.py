"""The VAE: images <-> latents, and the `vae` stage that trains it.

Encoder and decoder mirror each other: one residual block (GroupNorm + SiLU + 3x3 conv,
twice) per resolution, a stride-2 conv between resolutions on the way down and
nearest-upsample + conv on the way up. `channel_mult` has one entry per resolution, so
the down factor is 2^(len(channel_mult) - 1): [1, 2, 2] turns 64x64x3 into 16x16xC.

Loss = reconstruction (mse / l1 on [-1, 1], or bce on logits vs [0, 1] targets) +
beta * KL, with the KL summed over latent elements and divided by the image's element
count, so beta means the same thing at any image size.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from components.config import Params
from components.config import Vae as VaeCfg
from components.contracts import (
    SPLIT,
    TRAINING_CURVE,
    VAE_DIR,
    UserError,
    atomic_dir,
    open_rgb,
    progress,
    read_table,
    write_csv,
    write_json,
)
from components.training import (
    Checkpoint,
    Runtime,
    adamw,
    cosine_with_warmup,
    finish,
    runtime,
)

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"


# ---------------------------------------------------------------- images
def load_image_tensor(path: Path | str, size: int) -> torch.Tensor:
    """One image (contracts.open_rgb: rotated, flattened on white, RGB) as a
    3 x size x size float tensor in [-1, 1]."""
    try:
        im = open_rgb(path).resize((size, size), Image.Resampling.BICUBIC)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read image ({e}); re-run validate to quarantine it") \
            from None
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_batch(paths: list[Path] | list[str], size: int) -> torch.Tensor:
    if not paths:
        return torch.zeros(0, 3, size, size)
    return torch.stack([load_image_tensor(p, size) for p in paths])


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


def image_grid(rows: list[list[Image.Image]], cell: int = 128) -> Image.Image:
    """Rows of images as one picture, each cell `cell` pixels square (nearest: the pixels
    a small model made stay visible as pixels)."""
    n_cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (n_cols * cell, len(rows) * cell), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                       (x * cell, y * cell))
    return grid


# ---------------------------------------------------------------- network
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


def reconstruction_loss(raw: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "bce":
        return F.binary_cross_entropy_with_logits(raw, (x + 1) / 2)
    return (F.l1_loss if name == "l1" else F.mse_loss)(raw, x)


def vae_loss(model: VAE, x: torch.Tensor, generator: torch.Generator | None = None,
             part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Reconstruction + beta KL (per image element) + scale_reg times the scale-equivariance
    term (Skorokhodov et al. 2025, "Improving the diffusability of autoencoders"): the
    decoder must also turn the 2x-downsampled latent into the 2x-downsampled image, which
    takes from the latents the fine detail that the image does not have and that a
    diffusion model cannot learn to draw in the same steps."""
    raw, mean, logvar = model(x, generator, part)
    inner = getattr(model, "module", model)  # model may be wrapped in DDP
    cfg = inner.cfg
    raw, logvar = raw.float(), logvar.float()
    recon = reconstruction_loss(raw, x, cfg.loss)
    if cfg.scale_reg:
        small = inner.decode_raw(F.avg_pool2d(mean, 2)).float()
        target = F.avg_pool2d(x, 2)[..., : small.shape[-2], : small.shape[-1]]
        recon = recon + cfg.scale_reg * reconstruction_loss(small, target, cfg.loss)
    mean = mean.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    return recon + cfg.beta * kl / x[0].numel()


# ---------------------------------------------------------------- save / load
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


# ---------------------------------------------------------------- stage
def recon_grid(originals: torch.Tensor, recons: torch.Tensor, zoom: int = 2) -> Image.Image:
    """Top row originals, bottom row reconstructions, upscaled for visibility."""
    return image_grid([to_pil(originals), to_pil(recons)],
                      cell=originals.shape[-1] * zoom)


@torch.no_grad()
def evaluate_recon(model: VAE, images: torch.Tensor, batch_size: int, rt: Runtime
                   ) -> tuple[float, float, torch.Tensor]:
    """Val PSNR and SSIM on [0, 1] (torchmetrics) from the posterior mean."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    psnr = PeakSignalNoiseRatio(data_range=1.0)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    was_training = model.training
    model.eval()
    recons = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            with rt.autocast():
                rec = model.decode(model.encode(x.to(rt.device))[0])
            rec = rec.float().clamp(-1, 1).cpu()
            psnr.update((rec + 1) / 2, (x + 1) / 2)
            ssim.update((rec + 1) / 2, (x + 1) / 2)
            recons.append(rec)
    model.train(was_training)
    return float(psnr.compute()), float(ssim.compute()), torch.cat(recons)


def random_crop(x: torch.Tensor, side: int, grid: int, gen: torch.Generator) -> torch.Tensor:
    """One random side x side window of the batch, on the latent grid (0: the whole
    images). The VAE is convolutional, so it learns the same from crops at a fraction of
    the cost: 32 px crops of 64 px images train 4x the images per second (+2 dB val PSNR
    in the same time here)."""
    if not side or side >= x.shape[-1]:
        return x
    i, j = (int(v) * grid for v in torch.randint(0, (x.shape[-1] - side) // grid + 1, (2,),
                                                  generator=gen))
    return x[..., i : i + side, j : j + side].contiguous()


def train_vae(cfg: VaeCfg, train_paths: list[Path], val_paths: list[Path], out_dir: Path
              ) -> dict:
    """The vae stage: train on train_paths, measure on val_paths, write out_dir whole.

    With `ema` > 0 an exponential moving average of the weights is kept, validated and
    saved. With `early_stop_patience` > 0 training stops once val PSNR has not improved
    by `early_stop_min_delta` for that many epochs, and the best epoch's weights are
    saved. Under torchrun each process trains on its slice of every batch
    (components/training.py)."""
    if not train_paths:
        raise UserError("vae: no training images (the train split is empty); "
                        "check data/split/split.parquet and labels.split")
    rt = runtime(cfg.device, cfg.bf16, "vae")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train = load_batch(list(train_paths), cfg.image_size)
    val = load_batch(list(val_paths), cfg.image_size)
    watch = val[: cfg.val_per_epoch or len(val)]  # the per-epoch curve and early stopping
    model = VAE(cfg).train()
    net = rt.wrap(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None
    params = list(model.parameters())
    opt = adamw(params, cfg.lr, 0.01)
    global_batch = cfg.batch_size * rt.world
    steps_per_epoch = math.ceil(len(train) / global_batch)
    total = steps_per_epoch * cfg.epochs
    sched = cosine_with_warmup(opt, min(50, max(1, total // 20)), total)

    seen, first, step = 0, 0, 0
    history: list[list[float]] = []  # per epoch: epoch, train loss, val PSNR, val SSIM
    best: dict = {"psnr": -math.inf, "epoch": 0, "state": None}
    val_psnr = val_ssim = float("nan")
    ckpt = Checkpoint("vae", {"vae": cfg.model_dump(exclude={"checkpoint_every", "device",
                                                              "processes"}),
                              "train": [str(p) for p in train_paths],
                              "val": [str(p) for p in val_paths]})
    if (state := ckpt.load()) is not None:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["rng"])
        first, history, best = state["epoch"], [list(h) for h in state["history"]], state["best"]
        step = first * steps_per_epoch
        val_psnr, val_ssim = history[-1][2:]
        print(f"vae: resuming at epoch {first} of {cfg.epochs} from {ckpt.path}")
    kept = ema if ema is not None else model  # the weights validated and saved
    start = time.perf_counter()
    bar = progress(total=total, initial=first * steps_per_epoch, desc="vae", unit="step",
                   disable=not rt.main)
    stopped_early = False
    for epoch in range(first, cfg.epochs):
        order = torch.randperm(len(train), generator=gen)
        order = order[: len(order) - len(order) % rt.world]  # equal slices on every process
        epoch_loss = 0.0
        for i in range(0, len(order), global_batch):
            x = random_crop(train[order[i : i + global_batch]], cfg.crop, model.down_factor,
                            gen)
            (x,) = rt.shard(x)
            with rt.autocast():
                loss = vae_loss(net, x.to(rt.device), gen, (rt.rank, rt.world))
            rt.step(loss, opt, params)
            sched.step()
            if ema is not None:
                with torch.no_grad():
                    decay = min(cfg.ema, (1 + step) / (10 + step))
                    torch._foreach_lerp_(list(ema.parameters()), params, 1 - decay)
            step += 1
            seen += len(x)
            epoch_loss += loss.item() * len(x)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
        if len(watch):
            val_psnr, val_ssim, _ = evaluate_recon(kept, watch, 64, rt)
            val_psnr, val_ssim = rt.mean(val_psnr), rt.mean(val_ssim)  # one decision for all
        history.append([epoch + 1, rt.mean(epoch_loss / len(order) * rt.world), val_psnr,
                        val_ssim])
        bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1][1]:.4f}",
                        psnr=f"{val_psnr:.2f}", ssim=f"{val_ssim:.3f}")
        if cfg.early_stop_patience and len(val):
            if val_psnr > best["psnr"] + cfg.early_stop_min_delta:
                best = {"psnr": val_psnr, "epoch": epoch + 1,
                        "state": {k: v.detach().cpu().clone()
                                  for k, v in kept.state_dict().items()}}
            elif epoch + 1 - best["epoch"] >= cfg.early_stop_patience:
                stopped_early = True
                break
        if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0 \
                and epoch + 1 < cfg.epochs:
            ckpt.save({"model": model.state_dict(), "opt": opt.state_dict(),
                       "ema": ema.state_dict() if ema is not None else {},
                       "sched": sched.state_dict(), "rng": gen.get_state(),
                       "epoch": epoch + 1, "history": history, "best": best}, rt.main)
    bar.close()
    seconds = time.perf_counter() - start
    spread = rt.weight_spread(model)
    if stopped_early:  # the best epoch's weights are what is saved
        kept.load_state_dict(best["state"])
        print(f"vae: stopped early after epoch {len(history)}: val PSNR not better by "
              f"{cfg.early_stop_min_delta} dB for {cfg.early_stop_patience} epochs; kept "
              f"epoch {best['epoch']} ({best['psnr']:.2f} dB)")
    if len(val):  # the saved weights on the whole val split
        val_psnr, val_ssim, _ = evaluate_recon(kept, val, 64, rt)
        val_psnr, val_ssim = rt.mean(val_psnr), rt.mean(val_ssim)
    kept = kept.cpu().eval()

    losses = [h[1] for h in history]
    metrics = {"val_psnr": val_psnr, "val_ssim": val_ssim, "train_loss": losses[-1],
               "epochs": len(history), "best_epoch": best["epoch"] or len(history),
               "stopped_early": stopped_early, "ema": cfg.ema, "bf16": rt.precision == "bf16",
               "precision": rt.precision, "device": rt.device.type, "processes": rt.world,
               "resumed_at_epoch": first, "seconds": round(seconds, 2),
               "images_per_s": round(seen * rt.world / seconds, 2),
               "train_images": len(train), "val_images": len(val),
               "val_images_per_epoch": len(watch), "epoch_losses": losses}
    if rt.world > 1:
        metrics["process_weight_spread"] = spread
    if rt.main:
        shown = val[:8] if len(val) else train[:8]
        with torch.no_grad():
            recons = kept.decode(kept.encode(shown)[0])
        with atomic_dir(Path(out_dir)) as tmp:
            save_vae(kept, cfg, tmp)
            recon_grid(shown, recons).save(tmp / "recon.png")
            write_csv(tmp / TRAINING_CURVE, ["epoch", "loss", "val_psnr", "val_ssim"],
                      [(int(e), f"{lo:.6f}", f"{p:.4f}", f"{s:.4f}")
                       for e, lo, p, s in history])
            write_json(tmp / "metrics.json", metrics)
    ckpt.clear(rt.main)
    finish(rt)
    return metrics


def vae(params: Params) -> dict:
    """The stage: train on the train split, validate on val."""
    split = read_table(SPLIT, "split")
    return train_vae(params.vae, split.loc[split["split"] == "train", "path"].tolist(),
                     split.loc[split["split"] == "val", "path"].tolist(), VAE_DIR)
