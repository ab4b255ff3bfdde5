"""U-Net training from the latent cache vs encoding on the fly, side by side.

The same U-Net steps (same batches, same model) are timed three ways: reading the cache
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.config import load_params  # noqa: E402
from components.contracts import CAPTIONS, LATENTS, VAE_DIR, read_table  # noqa: E402
from components.models.diffusion import NoiseSchedule, training_loss  # noqa: E402
from components.models.text_encoders import get_encoder  # noqa: E402
from components.models.unet import ContextUnet  # noqa: E402
from components.models.images import load_batch  # noqa: E402
from components.models.vae import load_vae  # noqa: E402
from components.training.latents import LatentCache, pad_stack  # noqa: E402
from components.training.runtime import adamw, bf16_enabled  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    if not (LATENTS / "meta.json").exists() or not (VAE_DIR / "weights.safetensors").exists():
        print("bench_latent_cache: no latent cache or VAE; run `make run` first")
        return 0
    params = load_params()
    cfg = params.unet
    bf16 = bf16_enabled(cfg.bf16)
    cache = LatentCache(LATENTS)
    rows = cache.rows("train")
    caps = read_table(CAPTIONS, "captions").set_index("id").loc[cache.index.loc[rows, "id"]]
    paths, captions = caps["path"].tolist(), caps["caption"].tolist()
    encoder = get_encoder(params.text_encoder, LATENTS / "text_encoder")
    vae = load_vae(VAE_DIR)
    scale = float(cache.meta["scale_factor"])
    shape = tuple(cache.mean.shape[1:])
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(rows), (cfg.batch_size,), generator=gen).numpy()
               for _ in range(args.batches)]

    def run(images: bool, text: bool) -> float:
        """images / text: encode them each batch (else read the cache)."""
        torch.manual_seed(0)
        model = ContextUnet.from_config(cfg, shape[0], cache.text.shape[-1], shape[1]).train()
        opt = adamw(model.parameters(), cfg.lr, 0.0)
        schedule = NoiseSchedule(params.diffusion)
        t0 = time.perf_counter()
        for idx in batches:
            if not images:
                mean = torch.from_numpy(np.ascontiguousarray(cache.mean[rows[idx]]))
                logvar = torch.from_numpy(np.ascontiguousarray(cache.logvar[rows[idx]]))
            else:
                with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    mean, logvar = vae.encode(load_batch([paths[i] for i in idx],
                                                         vae.cfg.image_size))
                mean, logvar = mean.float(), logvar.float()
            x0 = (mean + (0.5 * logvar).exp() * torch.randn(mean.shape)) * scale
            if text:
                enc = encoder.encode([captions[i] for i in idx])
                states = enc.vectors if enc.tokens is None else pad_stack(
                    [t[np.abs(t).max(-1) > 0] for t in enc.tokens])
                context = torch.from_numpy(states).float()
            else:
                context = torch.from_numpy(np.ascontiguousarray(cache.text[rows[idx]])).float()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = training_loss(model, schedule, x0, context, cfg.cond_drop, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
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
