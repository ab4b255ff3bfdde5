"""The unet stage: train the Context U-Net on the latent cache, write models/unet/ whole."""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from components import tracking
from components.config import Diffusion as DiffusionCfg
from components.config import Params
from components.config import Unet as UnetCfg
from components.contracts import (
    LATENTS,
    TRAINING_CURVE,
    UNET_DIR,
    VAE_DIR,
    UserError,
    atomic_dir,
    progress,
    results_only,
    write_csv,
    write_json,
)
from components.models.buckets import draw
from components.models.unet import ContextUnet, save_unet


def train_unet(cfg: UnetCfg, diff: DiffusionCfg, latents_dir: Path, out_dir: Path,
               text_encoder_name: str, vae_dir: Path) -> dict:
    """Train the Context U-Net on the cached train-split latents; write out_dir whole."""
    from components.models.diffusion import NoiseSchedule, training_loss
    from components.models.vae import load_vae
    from components.training.latents import MODEL_FILES, TEXT_ENCODER, LatentCache
    from components.training.runtime import (
        Checkpoint,
        adamw,
        cosine_with_warmup,
        finish,
        runtime,
        train_step,
    )

    cache = LatentCache(latents_dir)
    rows = cache.rows("train")
    parts = cache.by_format("train")  # format -> (rows, rows in the format's arrays)
    if len(rows) == 0:
        raise UserError(f"{latents_dir}/index.parquet: no rows with split == 'train'; "
                        "check labels.split")
    cached_encoder = cache.meta.get("text_encoder")
    if cached_encoder and cached_encoder != text_encoder_name:
        raise UserError(f"{latents_dir}: text embeddings were made with {cached_encoder!r}, "
                        f"not text_encoder.name={text_encoder_name!r}; re-run the latents "
                        "stage")
    vae = load_vae(vae_dir)
    # every distinct caption's token states (M, L, D) float16, or vectors (M, D) for an
    # encoder without tokens; each train row's positions there (N, 2: with its text or
    # without, variants)
    captions = torch.from_numpy(np.array(cache.captions))
    choices = torch.from_numpy(np.ascontiguousarray(cache.caption_rows[rows])).long()
    scale = float(cache.meta["scale_factor"])
    latent_shape = tuple(cache.meta["latent_shape"])  # the native square's
    # the whole train split fits in memory at these sizes (960 x 4x16x16 floats = 4 MB);
    # per format (aspect bucket): latent mean, std, glyph maps (uint8 until a batch takes
    # them), and where its rows are in text
    where = {int(r): i for i, r in enumerate(rows)}
    data = [FormatData(cache.formats[f], frows, [where[int(r)] for r in grows])
            for f, (grows, frows) in parts.items()]
    counts = [len(d.text_rows) for d in data]
    glyph_down = data[0].glyphs.shape[-1] // data[0].mean.shape[-1]

    rt = runtime(cfg.device, cfg.bf16, "unet")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    schedule = NoiseSchedule(diff)
    model = ContextUnet.from_config(cfg, latent_shape[0], captions.shape[-1], latent_shape[1],
                                    glyph_down=glyph_down).train()
    net = rt.wrap(model)
    ema = ContextUnet(**model.config()).eval()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).to(rt.device)
    data = [d.to(rt.device) for d in data]
    captions, choices = captions.to(rt.device), choices.to(rt.device)
    opt = adamw(model.parameters(), cfg.lr, 0.0)
    sched = cosine_with_warmup(opt, cfg.warmup, cfg.steps)
    params, ema_params = list(model.parameters()), list(ema.parameters())

    log: list[tuple[int, float]] = []
    running, n_running, first = 0.0, 0, 0
    ckpt = Checkpoint("unet", {"unet": cfg.model_dump(exclude={"checkpoint_every", "device",
                                                               "processes"}),
                               "diffusion": diff.model_dump(), "text_encoder": text_encoder_name,
                               "latents": cache.identity()})
    if (state := ckpt.load()) is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["rng"])
        first, running, n_running = state["step"], state["running"], state["n_running"]
        log = [tuple(x) for x in state["log"]]
        print(f"unet: resuming at step {first} of {cfg.steps} from {ckpt.path}")
    start = time.perf_counter()
    bar = progress(range(first, cfg.steps), initial=first, total=cfg.steps, desc="unet",
                   unit="step", disable=not rt.main)
    global_batch = cfg.batch_size * rt.world  # every process draws it; each takes a slice
    for step in bar:
        d = data[draw(counts, gen)]  # one format per batch, in proportion to its images
        idx = torch.randint(0, len(d.text_rows), (global_batch,), generator=gen)
        eps = torch.randn((global_batch, *d.mean.shape[1:]), generator=gen)
        drop = (torch.rand(global_batch, generator=gen) < cfg.text_drop).long()
        # the template's phrasing (position 0) a template_share of steps, else another
        other = torch.randint(1, max(choices.shape[-1], 2), (global_batch,), generator=gen)
        template = torch.rand(global_batch, generator=gen) < cfg.template_share
        variant = torch.where(template | (choices.shape[-1] == 1), 0, other)
        idx, eps, drop, variant = rt.shard(idx, eps, drop, variant)
        # a fresh posterior sample each time
        x0 = (d.mean[idx] + d.std[idx] * eps.to(rt.device)) * scale
        # one of the row's phrasings, with its text or (a text_drop share) without
        context = captions[choices[d.text_rows[idx], drop.to(rt.device),
                                   variant.to(rt.device)]].float()
        # the glyph map stays when the caption loses its free text: the letters come from it
        glyph = glyph_batch(d.glyphs, idx) if cfg.glyph_channels else None
        loss = train_step(rt, lambda x0=x0, c=context, g=glyph: training_loss(
                              net, schedule, x0, c, cfg.cond_drop, gen, (rt.rank, rt.world), g),
                          opt, sched, params, ema_params, cfg.ema, step)
        running += loss.item()
        n_running += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.append((step + 1, rt.mean(running / n_running)))
            bar.set_postfix(loss=f"{log[-1][1]:.4f}")
            running, n_running = 0.0, 0
            if rt.main:  # live in MLflow (the stage's run), as loss.csv has it
                tracking.log_metrics({"curve.loss": log[-1][1]}, step + 1)
        if rt.main and cfg.sample_every and (step + 1) % cfg.sample_every == 0 \
                and tracking.active():
            grid = preview_grid(ema, vae, schedule, cache, scale)
            tracking.log_image(grid, f"samples/step_{step + 1:06d}.png")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 \
                and step + 1 < cfg.steps:
            ckpt.save({"model": model.state_dict(), "ema": ema.state_dict(),
                       "opt": opt.state_dict(), "sched": sched.state_dict(),
                       "rng": gen.get_state(), "step": step + 1, "running": running,
                       "n_running": n_running, "log": log}, rt.main)
    seconds = time.perf_counter() - start
    spread = rt.weight_spread(model)
    model, ema = model.cpu(), ema.cpu()

    config = {"diffusion": diff.model_dump(mode="json"), "scale_factor": scale,
              "latent_shape": list(latent_shape), "text_encoder": text_encoder_name,
              "text_encoder_config": cache.meta.get("text_encoder_config",
                                                    {"name": text_encoder_name}),
              "text_dim": int(captions.shape[-1]), "image_size": vae.cfg.image_size,
              # the formats it trained on (aspect buckets): what generation samples at
              "formats": {f: {**cache.meta["formats"][f], "train_images": n}
                          for f, n in zip(parts, counts, strict=True)},
              "max_stretch": cache.meta["max_stretch"],
              "train": cfg.model_dump(mode="json")}
    metrics = {"final_loss": log[-1][1], "steps": cfg.steps, "bf16": rt.precision == "bf16",
               "precision": rt.precision, "device": rt.device.type, "processes": rt.world,
               "resumed_at": first, "seconds": round(seconds, 2),
               "steps_per_s": round((cfg.steps - first) / seconds, 3),
               "train_latents": len(rows),
               **{f"train_latents_{f}": n for f, n in zip(parts, counts, strict=True)}}
    if rt.world > 1:
        metrics["process_weight_spread"] = spread
    if not rt.main:
        finish(rt)
        return metrics
    with atomic_dir(Path(out_dir)) as tmp:
        save_unet(model, ema, config, tmp)
        if (Path(latents_dir) / TEXT_ENCODER).is_dir():
            shutil.copytree(Path(latents_dir) / TEXT_ENCODER, tmp / TEXT_ENCODER)
        for name in MODEL_FILES:  # layout statistics, font, vocabulary
            shutil.copyfile(Path(latents_dir) / name, tmp / name)
        write_csv(tmp / TRAINING_CURVE, ["step", "loss"], [(s, f"{v:.6f}") for s, v in log])
        preview_grid(ema, vae, schedule, cache, scale).save(tmp / "samples.png")
        write_json(tmp / "metrics.json", results_only(metrics))
    ckpt.clear()
    finish(rt)
    return metrics


class FormatData:
    """One format's train rows in memory: latent mean and std (N, C, h, w), glyph maps
    (N, H, W) uint8, and each row's position in the caption arrays."""

    def __init__(self, arrays: dict, rows: np.ndarray, text_rows: list[int]):
        self.mean = torch.from_numpy(np.ascontiguousarray(arrays["mean"][rows]))
        self.std = torch.from_numpy(np.ascontiguousarray(arrays["logvar"][rows])).mul(0.5).exp()
        self.glyphs = torch.from_numpy(np.ascontiguousarray(arrays["glyphs"][rows]))
        self.text_rows = torch.tensor(text_rows, dtype=torch.long)

    def to(self, device: torch.device) -> FormatData:
        for name in ("mean", "std", "glyphs", "text_rows"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def glyph_batch(glyphs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """uint8 glyph maps (N, H, W) -> the batch's (B, 1, H, W) floats in 0..1."""
    return glyphs[idx].unsqueeze(1).float().div_(255)


@torch.no_grad()
def preview_grid(model: ContextUnet, vae: nn.Module, schedule, cache, scale: float,
                 n: int = 8) -> Image.Image:
    """The first n val captions (train if no val) of the most common format, DDIM 25
    steps, guidance 2, one row, on the CPU (as the generator samples) with its own seeded
    noise: calling it mid-training changes nothing of the training run, on any device."""
    from components.models.diffusion import DDIMSampler, sample
    from components.models.images import image_grid, to_pil

    f, (rows, frows) = next(iter((cache.by_format("val") or cache.by_format("train")).items()))
    rows, frows = rows[:n], frows[:n]
    if next(model.parameters()).device.type != "cpu":  # mid-training on a GPU
        model = copy.deepcopy(model).cpu()
    context = torch.from_numpy(cache.captions[cache.caption_rows[rows, 0, 0]]).float()
    arrays = cache.formats[f]
    glyph = glyph_batch(torch.from_numpy(np.ascontiguousarray(arrays["glyphs"][frows])),
                        torch.arange(len(rows))) if model.glyph_channels else None
    sampler = DDIMSampler(schedule, 0.0)
    sampler.set_timesteps(25)
    gens = [torch.Generator().manual_seed(i) for i in range(len(rows))]
    z = sample(model, schedule, sampler, context, tuple(arrays["mean"].shape[1:]), 2.0, gens,
               glyph)
    return image_grid([to_pil(vae.decode(z / scale))], cell=64)


def unet(params: Params) -> dict:
    """The stage: latent cache in, models/unet/ out."""
    return train_unet(params.unet, params.diffusion, LATENTS, UNET_DIR,
                      params.text_encoder.name, VAE_DIR)
