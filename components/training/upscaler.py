"""The upscaler stage: teach the upscaler (models/upscaler.py) to turn what the VAE draws
at the native size into the collection's own images at `factor` x that size, so a large
output gets edges and strokes instead of an interpolated blur. Inputs are the train
images through the VAE (what generation decodes, blur included); targets the same images
read at the larger size. Trains on random crops; validates against a Lanczos resize."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio

from components.config import Params
from components.config import Upscaler as UpscalerCfg
from components.contracts import (
    SPLIT,
    UPSCALER_DIR,
    VAE_DIR,
    atomic_dir,
    progress,
    read_table,
    results_only,
    write_json,
)
from components.models.images import from_pil, load_batch, to_pil
from components.models.upscaler import Upscaler, save_upscaler
from components.models.vae import load_vae
from components.training.runtime import Runtime, adamw, cosine_with_warmup, runtime, train_step

VAL_IMAGES = 32


@torch.no_grad()
def pairs(vae, paths: list[str], native: int, factor: int, rt: Runtime, batch: int = 64
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the images through the VAE at the native size, float in [-1, 1]; the images at
    factor x that size, uint8 to keep a large collection in memory)."""
    ins = [torch.zeros(0, 3, native, native)]  # no paths (an empty val split): no pairs
    outs = [torch.zeros(0, 3, native * factor, native * factor, dtype=torch.uint8)]
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        with rt.autocast():
            rec = vae.decode(vae.encode(load_batch(chunk, native).to(rt.device))[0])
        ins.append(rec.float().clamp(-1, 1).cpu())
        big = load_batch(chunk, native * factor)
        outs.append(((big + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(ins), torch.cat(outs)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """On [-1, 1] images, as PSNR on [0, 1] (torchmetrics)."""
    return float(peak_signal_noise_ratio((a.float() + 1) / 2, (b.float() + 1) / 2,
                                         data_range=1.0))


def lanczos(images: torch.Tensor, side: int) -> torch.Tensor:
    """The interpolating baseline: each image resized to side x side (Lanczos)."""
    return from_pil([im.resize((side, side), Image.Resampling.LANCZOS)
                     for im in to_pil(images)])


def fit(cfg: UpscalerCfg, rt: Runtime, x: torch.Tensor, y: torch.Tensor
        ) -> tuple[Upscaler, float]:
    """An upscaler trained to turn x (N, 3, n, n in [-1, 1]) into y (uint8, factor x n) on
    random crops of cfg.crop input pixels; returns it (eval mode) and the last loss."""
    n, f = x.shape[-1], cfg.factor
    crop = min(cfg.crop, n)
    torch.manual_seed(cfg.seed)
    model = Upscaler.from_config(cfg).to(rt.device).train()
    params = list(model.parameters())
    opt = adamw(params, cfg.lr, 0.0)
    sched = cosine_with_warmup(opt, min(100, cfg.steps // 10), cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss = torch.zeros(())
    for _ in progress(range(cfg.steps), desc="upscaler", unit="step"):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        i, j = torch.randint(0, n - crop + 1, (2,), generator=gen).tolist()
        xb = x[idx, :, i : i + crop, j : j + crop].to(rt.device)
        yb = y[idx, :, i * f : (i + crop) * f, j * f : (j + crop) * f].to(rt.device)
        yb = yb.float() / 127.5 - 1
        loss = train_step(rt, lambda xb=xb, yb=yb: F.l1_loss(model(xb).float(), yb), opt,
                          sched, params)
    return model.eval(), float(loss.detach())


def train_upscaler(cfg: UpscalerCfg, vae_dir: Path, train: list[str], val: list[str],
                   out_dir: Path) -> dict:
    t0 = time.monotonic()
    rt = runtime(cfg.device, cfg.bf16, "upscaler")
    vae = load_vae(vae_dir).to(rt.device)
    native, f = vae.cfg.image_size, cfg.factor
    x, y = pairs(vae, train, native, f, rt)
    vx, vy = pairs(vae, val[:VAL_IMAGES], native, f, rt)
    model, loss = fit(cfg, rt, x, y)
    seconds = time.monotonic() - t0
    metrics: dict = {}
    if len(vx):
        with torch.no_grad(), rt.autocast():
            up = model(vx.to(rt.device)).float().clamp(-1, 1).cpu()
        truth = vy.float() / 127.5 - 1
        metrics = {"val_psnr": round(psnr(up, truth), 3),
                   "val_psnr_lanczos": round(psnr(lanczos(vx, native * f), truth), 3)}
    metrics |= {"final_loss": round(loss, 5), "steps": cfg.steps, "factor": f,
                "native_size": native, "output_size": native * f, "train_images": len(x),
                "precision": rt.precision, "device": rt.device.type,
                "seconds": round(seconds, 1)}
    with atomic_dir(out_dir) as tmp:
        save_upscaler(model.cpu(), cfg, tmp)
        write_json(tmp / "metrics.json", results_only(metrics))
    return metrics


def upscaler(params: Params) -> dict:
    """The stage: train on the train split, compare with Lanczos on val."""
    split = read_table(SPLIT, "split")
    return train_upscaler(params.upscaler, VAE_DIR,
                          split.loc[split["split"] == "train", "path"].tolist(),
                          split.loc[split["split"] == "val", "path"].tolist(), UPSCALER_DIR)
