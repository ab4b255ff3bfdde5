"""The vae stage: train the VAE on the train split, validate on val, write models/vae/ whole."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from components import tracking
from components.config import Params
from components.config import Vae as VaeCfg
from components.contracts import (
    TRAINING_CURVE,
    VAE_DIR,
    UserError,
    atomic_dir,
    progress,
    results_only,
    split_sets,
    write_csv,
    write_json,
)
from components.models.buckets import epoch_batches, format_sizes
from components.models.images import image_grid, load_formats, to_pil
from components.models.vae import VAE, save_vae, vae_loss
from components.training.runtime import (
    Checkpoint,
    Runtime,
    adamw,
    cosine_with_warmup,
    finish,
    runtime,
    train_step,
)

CURVE = ["epoch", "loss", "val_psnr", "val_ssim"]  # loss.csv's columns


def recon_grid(originals: torch.Tensor, recons: torch.Tensor, zoom: int = 2) -> Image.Image:
    """Top row originals, bottom row reconstructions, upscaled for visibility."""
    return image_grid([to_pil(originals), to_pil(recons)],
                      cell=originals.shape[-1] * zoom)


@torch.no_grad()
def evaluate_recon(model: VAE, images: torch.Tensor | list[torch.Tensor], batch_size: int,
                   rt: Runtime) -> tuple[float, float, torch.Tensor | list[torch.Tensor]]:
    """Val PSNR and SSIM on [0, 1] (torchmetrics) from the posterior mean, over one
    tensor of images or a list of them (one per format); the reconstructions alike."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    psnr = PeakSignalNoiseRatio(data_range=1.0)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    was_training = model.training
    model.eval()
    out = []
    for group in [images] if isinstance(images, torch.Tensor) else images:
        recons = []
        for i in range(0, len(group), batch_size):
            x = group[i : i + batch_size]
            with rt.autocast():
                rec = model.decode(model.encode(x.to(rt.device))[0])
            rec = rec.float().clamp(-1, 1).cpu()
            psnr.update((rec + 1) / 2, (x + 1) / 2)
            ssim.update((rec + 1) / 2, (x + 1) / 2)
            recons.append(rec)
        out.append(torch.cat(recons) if recons else group.clone())
    model.train(was_training)
    return (float(psnr.compute()), float(ssim.compute()),
            out[0] if isinstance(images, torch.Tensor) else out)


def ink_weights(images: torch.Tensor, weight: float) -> torch.Tensor:
    """(N, 1, H, W): 1 + `weight` on ink pixels (text and marks, as the labeller segments
    them: departing from the background toward white or black), grown by a pixel. A small
    VAE blurs letters first; this spends its reconstruction loss where they are."""
    from components.labelling.labeller import segment

    h, w = images.shape[-2:]
    maps = []
    for im in to_pil(images):
        ink = torch.from_numpy(segment(im).ink.astype("float32"))[None, None]
        ink = F.adaptive_max_pool2d(ink, (h, w)) if ink.shape[-1] >= w else \
            F.interpolate(ink, size=(h, w), mode="nearest")
        maps.append(ink[0])
    return 1 + weight * F.max_pool2d(torch.stack(maps), 3, 1, 1)


def random_crop(x: torch.Tensor, side: int, grid: int, gen: torch.Generator) -> torch.Tensor:
    """One random side x side window of the batch (narrower where an image is), on the
    latent grid (0: the whole images). The VAE is convolutional, so it learns the same
    from crops at a fraction of the cost: 32 px crops of 64 px images train 4x the images
    per second (+2 dB val PSNR in the same time here)."""
    h, w = x.shape[-2:]
    sh, sw = min(side, h), min(side, w)
    if not side or (sh, sw) == (h, w):
        return x
    if h == w:  # one draw for both (as square batches always drew)
        i, j = torch.randint(0, (h - sh) // grid + 1, (2,), generator=gen).tolist()
    else:
        i, j = (int(torch.randint(0, (n - c) // grid + 1, (1,), generator=gen))
                for n, c in ((h, sh), (w, sw)))
    return x[..., i * grid : i * grid + sh, j * grid : j * grid + sw].contiguous()


def train_vae(cfg: VaeCfg, train_paths: list[Path], val_paths: list[Path], out_dir: Path,
              formats: tuple[list[str], list[str]] | None = None,
              sizes: dict[str, tuple[int, int]] | None = None) -> dict:
    """The vae stage: train on train_paths, measure on val_paths, write out_dir whole.

    `formats`: each train and val image's aspect bucket, `sizes` each bucket's (w, h)
    (models/buckets.py); a batch is drawn from one bucket. Default: all square at
    cfg.image_size.

    With `ema` > 0 an exponential moving average of the weights is kept, validated and
    saved. With `early_stop_patience` > 0 training stops once val PSNR has not improved
    by `early_stop_min_delta` for that many epochs, and the best epoch's weights are
    saved. Under torchrun each process trains on its slice of every batch
    (components/training/runtime.py)."""
    if not train_paths:
        raise UserError("vae: no training images (the train split is empty); "
                        "check data/split/split.parquet and labels.split")
    rt = runtime(cfg.device, cfg.bf16, "vae")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    sizes = sizes or {"square": (cfg.image_size, cfg.image_size)}
    train_f, val_f = formats or ([next(iter(sizes))] * len(train_paths),
                                 [next(iter(sizes))] * len(val_paths))
    train = load_formats(list(train_paths), train_f, sizes)  # format -> images
    if cfg.text_weight:  # the weight map travels with the image through the crops
        train = {f: torch.cat([x, ink_weights(x, cfg.text_weight)], 1)
                 for f, x in train.items()}
    val = list(load_formats(list(val_paths), val_f, sizes).values())
    k = cfg.val_per_epoch or len(val_paths)  # the per-epoch curve and early stopping
    watch = list(load_formats(list(val_paths[:k]), val_f[:k], sizes).values())
    rows = {f: torch.arange(len(x)) for f, x in train.items()}
    n_train, n_val = len(train_paths), len(val_paths)
    model = VAE(cfg).train()
    net = rt.wrap(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None
    params = list(model.parameters())
    ema_params = list(ema.parameters()) if ema is not None else None
    opt = adamw(params, cfg.lr, 0.01)
    global_batch = cfg.batch_size * rt.world
    steps_per_epoch = sum(math.ceil(len(r) / global_batch) for r in rows.values())
    total = steps_per_epoch * cfg.epochs
    sched = cosine_with_warmup(opt, min(50, max(1, total // 20)), total)

    seen, first, step = 0, 0, 0
    history: list[list[float]] = []  # per epoch: epoch, train loss, val PSNR, val SSIM
    best: dict = {"psnr": -math.inf, "epoch": 0, "state": None}
    val_psnr = val_ssim = float("nan")
    ckpt = Checkpoint("vae", {"vae": cfg.model_dump(exclude={"checkpoint_every", "device",
                                                              "processes"}),
                              "train": [str(p) for p in train_paths],
                              "val": [str(p) for p in val_paths],
                              "formats": [train_f, val_f, sizes]})
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
        # each batch from one format, equal slices on every process
        batches = epoch_batches(rows, global_batch, gen, rt.world)
        epoch_loss, n_epoch = 0.0, 0
        for f, idx in batches:
            x = random_crop(train[f][idx], cfg.crop, model.down_factor, gen)
            (x,) = rt.shard(x)
            x, w = x[:, :3], (x[:, 3:] if cfg.text_weight else None)
            loss = train_step(rt, lambda x=x, w=w: vae_loss(
                net, x.to(rt.device), gen, (rt.rank, rt.world),
                None if w is None else w.to(rt.device)), opt, sched, params, ema_params,
                cfg.ema, step)
            step += 1
            seen += len(x)
            n_epoch += len(x)
            epoch_loss += loss.item() * len(x)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
        if n_val:
            val_psnr, val_ssim, _ = evaluate_recon(kept, watch, 64, rt)
            val_psnr, val_ssim = rt.mean(val_psnr), rt.mean(val_ssim)  # one decision for all
        history.append([epoch + 1, rt.mean(epoch_loss / max(1, n_epoch)), val_psnr,
                        val_ssim])
        bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1][1]:.4f}",
                        psnr=f"{val_psnr:.2f}", ssim=f"{val_ssim:.3f}")
        if rt.main:  # live in MLflow (the stage's run); the same columns as loss.csv
            tracking.log_metrics({f"curve.{k}": v for k, v in zip(CURVE[1:], history[-1][1:],
                                                                  strict=True)}, epoch + 1)
        if cfg.early_stop_patience and n_val:
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
    if n_val:  # the saved weights on the whole val split
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
               "train_images": n_train, "val_images": n_val,
               "val_images_per_epoch": min(k, n_val), "epoch_losses": losses}
    if rt.world > 1:
        metrics["process_weight_spread"] = spread
    if rt.main:
        shown = (val[0] if n_val else next(iter(train.values()))[:, :3])[:8]
        with torch.no_grad():
            recons = kept.decode(kept.encode(shown)[0])
        with atomic_dir(Path(out_dir)) as tmp:
            save_vae(kept, cfg, tmp)
            recon_grid(shown, recons).save(tmp / "recon.png")
            write_csv(tmp / TRAINING_CURVE, CURVE,
                      [(int(e), f"{lo:.6f}", f"{p:.4f}", f"{s:.4f}")
                       for e, lo, p, s in history])
            write_json(tmp / "metrics.json", results_only(metrics))
    ckpt.clear(rt.main)
    finish(rt)
    return metrics


def vae(params: Params) -> dict:
    """The stage: train on the train split, validate on val."""
    train, val, formats = split_sets()
    return train_vae(params.vae, train, val, VAE_DIR, formats,
                     format_sizes(params.formats.buckets, params.vae))
