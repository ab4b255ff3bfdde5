"""U-Net training from the latent cache vs encoding on the fly, side by side.

The same U-Net steps (same batches, same model; the step the unet stage takes,
components.training.runtime.train_step) are timed three ways: reading the cache
(posterior and caption token states: what the unet stage does); decoding the PNGs and
running the VAE encoder each batch (captions still from the cache); and encoding both
images and captions each batch (no cache at all, as the prototype trained).
Goal (issue "Models that learn"): the cache >= 5x faster than encoding on the fly.
Needs the outputs of `make run` (data/latents, models/vae).
Usage: python bench/bench_latent_cache.py [--batches N]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from components.config import load_params
from components.contracts import CAPTIONS, LATENTS, VAE_DIR, read_table
from components.models.diffusion import NoiseSchedule, training_loss
from components.models.images import load_batch
from components.models.text_encoders import get_encoder
from components.models.unet import ContextUnet
from components.models.vae import load_vae
from components.training.latents import LatentCache, pad_stack
from components.training.runtime import adamw, cosine_with_warmup, runtime, train_step

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    os.chdir(ROOT)
    if not (LATENTS / "meta.json").exists() or not (VAE_DIR / "weights.safetensors").exists():
        print("bench_latent_cache: no latent cache or VAE; run `make run` first")
        return 0
    params = load_params()
    cfg = params.unet
    rt = runtime(cfg.device, cfg.bf16, "unet")  # device and precision as the stage has them
    bf16 = rt.precision == "bf16"
    cache = LatentCache(LATENTS)
    # the most common format (aspect bucket): a batch is always of one
    fmt, (rows, format_rows) = next(iter(cache.by_format("train").items()))
    arrays, size = cache.formats[fmt], tuple(cache.meta["formats"][fmt]["size"])
    caps = read_table(CAPTIONS, "captions").set_index("id").loc[cache.index.loc[rows, "id"]]
    paths, captions = caps["path"].tolist(), caps["caption"].tolist()
    encoder = get_encoder(params.text_encoder, LATENTS / "text_encoder")
    vae = load_vae(VAE_DIR).to(rt.device)
    scale = float(cache.meta["scale_factor"])
    shape = tuple(arrays["mean"].shape[1:])
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(rows), (cfg.batch_size,), generator=gen).numpy()
               for _ in range(args.batches)]

    def run(images: bool, text: bool) -> float:
        """images / text: encode them each batch (else read the cache). The model, EMA,
        optimizer and LR schedule as the unet stage builds them, and its step:
        components.training.runtime.train_step (gradient clipping and EMA included)."""
        torch.manual_seed(0)
        model = ContextUnet.from_config(cfg, shape[0], cache.captions.shape[-1], shape[1]).train()
        net = rt.wrap(model)
        ema = ContextUnet(**model.config()).eval()
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False).to(rt.device)
        weights, ema_weights = list(model.parameters()), list(ema.parameters())
        opt = adamw(weights, cfg.lr, 0.0)
        sched = cosine_with_warmup(opt, cfg.warmup, cfg.steps)
        schedule = NoiseSchedule(params.diffusion)
        t0 = time.perf_counter()
        for step, idx in enumerate(batches):
            if not images:
                mean = torch.from_numpy(np.ascontiguousarray(arrays["mean"][format_rows[idx]]))
                logvar = torch.from_numpy(np.ascontiguousarray(
                    arrays["logvar"][format_rows[idx]]))
            else:
                with torch.no_grad(), rt.autocast():
                    mean, logvar = vae.encode(load_batch([paths[i] for i in idx],
                                                         size).to(rt.device))
                mean, logvar = mean.float(), logvar.float()
            mean, logvar = mean.to(rt.device), logvar.to(rt.device)
            x0 = (mean + (0.5 * logvar).exp() * torch.randn(mean.shape).to(rt.device)) * scale
            if text:
                enc = encoder.encode([captions[i] for i in idx])
                states = enc.vectors if enc.tokens is None else pad_stack(
                    [t[np.abs(t).max(-1) > 0] for t in enc.tokens])
                context = torch.from_numpy(states).float()
            else:
                context = torch.from_numpy(cache.captions[cache.caption_rows[rows[idx], 0, 0]]
                                           ).float()
            context = context.to(rt.device)
            loss = train_step(rt, lambda x0=x0, c=context: training_loss(
                                  net, schedule, x0, c, cfg.cond_drop, gen, (rt.rank, rt.world)),
                              opt, sched, weights, ema_weights, cfg.ema, step)
            loss.item()  # read back every step, as the stage logs it
        return (time.perf_counter() - t0) / len(batches)

    run(False, False)  # warm-up
    encoder.encode(captions[:2])
    cached, images_only, both = run(False, False), run(True, False), run(True, True)
    print(f"{'U-Net step from':34s} {'s/step':>8s} {'speed-up':>9s}")
    for name, t in [("latent cache (images + captions)", cached),
                    ("images encoded, captions cached", images_only),
                    ("images and captions encoded", both)]:
        print(f"{name:34s} {t:8.4f} {t / cached:8.1f}x")
    print(f"cache speed-up vs encoding on the fly: {both / cached:.1f}x (batch "
          f"{cfg.batch_size}, {len(batches)} steps, bf16={bf16}, text encoder "
          f"{params.text_encoder.name}; goal >= 5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
