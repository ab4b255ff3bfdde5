"""Achieved FLOP/s of the VAE and U-Net training steps vs a large matmul, in one run.

FLOPs per step are counted by torch's own FlopCounterMode (forward + backward); the peak
reference is a 2048^3 matmul in the same precision the training uses (bf16 where the CPU
has native bf16, as `bf16: auto` decides). Goal (issue "Models that learn"): >= 50% of
that peak. Needs no data: random inputs of the default shapes.
Usage: python bench/bench_flops.py [--steps N]
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from components.config import Diffusion, Unet, Vae  # noqa: E402
from components.diffusion import NoiseSchedule, training_loss  # noqa: E402
from components.training import adamw, bf16_enabled  # noqa: E402
from components.unet import ContextUnet  # noqa: E402
from components.vae import VAE, vae_loss  # noqa: E402


def timed(fn, steps: int, rounds: int = 3) -> float:
    """Seconds per call: the best of `rounds` rounds of `steps` calls (after one warm-up),
    so a noisy neighbour on a shared box shows up as less, not more, spread."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    vae_cfg, unet_cfg = Vae(), Unet()
    bf16 = bf16_enabled(vae_cfg.bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)

    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    peak = 2 * 2048**3 / timed(lambda: a @ b, args.steps)

    vae = VAE(vae_cfg).train()
    vae_opt = adamw(vae.parameters(), vae_cfg.lr, 0.01)
    side = min(vae_cfg.crop or vae_cfg.image_size, vae_cfg.image_size)  # what training sees
    x = torch.rand(vae_cfg.batch_size, 3, side, side) * 2 - 1

    def vae_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = vae_loss(vae, x)
        vae_opt.zero_grad()
        loss.backward()
        vae_opt.step()

    side = vae_cfg.image_size // vae.down_factor
    unet = ContextUnet.from_config(unet_cfg, vae_cfg.latent_channels, 384, side).train()
    unet_opt = adamw(unet.parameters(), unet_cfg.lr, 0.0)
    schedule = NoiseSchedule(Diffusion())
    z = torch.randn(unet_cfg.batch_size, vae_cfg.latent_channels, side, side)
    # caption token states as the latent cache stores them (default captions: <= 29 tokens)
    c = torch.randn(unet_cfg.batch_size, 29, 384)

    def unet_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = training_loss(unet, schedule, z, c, unet_cfg.cond_drop, None)
        unet_opt.zero_grad()
        loss.backward()
        unet_opt.step()

    print(f"reference: 2048^3 matmul in {dtype}: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':6s} {'params':>8s} {'GFLOP/step':>10s} {'s/step':>7s} {'GFLOP/s':>8s} "
          f"{'of peak':>7s}")
    for name, model, step in [("vae", vae, vae_step), ("unet", unet, unet_step)]:
        flops, seconds = flops_of(step), timed(step, args.steps)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:6s} {n / 1e6:7.2f}M {flops / 1e9:10.2f} {seconds:7.3f} "
              f"{flops / seconds / 1e9:8.1f} {flops / seconds / peak:7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
