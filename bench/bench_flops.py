"""Achieved FLOP/s of the VAE and U-Net training steps vs a large matmul, in one run.

FLOPs per step are counted by torch's own FlopCounterMode (forward + backward); the peak
reference is a 2048^3 matmul in the same precision the training uses (bf16 where the CPU
has native bf16, as `bf16: auto` decides; on CUDA an 8192^3 bf16 matmul). Goal (issue
"Models that learn"): >= 50% of that peak on the CPU. Needs no data: random inputs of the
default shapes; --batch times other batch sizes too (on a GPU the default batch is bound
by per-step overhead, not arithmetic). Under each model, "convs alone": its convolutions
timed one by one at their training-step shapes, the ceiling this box's conv kernels set.
Usage: python bench/bench_flops.py [--steps N] [--device cpu|cuda] [--batch 16,64,256]
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
    so a noisy neighbour on a shared box shows up as less, not more, spread; the GPU's
    queue is drained before each clock read."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    fn()
    best = float("inf")
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def conv_ceiling(model: torch.nn.Module, step, bf16: bool, steps: int) -> tuple[int, float]:
    """The model's own convolutions, each timed alone (forward + backward, at the input
    shape it gets in a training step): (FLOPs, seconds) summed over them. Their FLOP/s is
    what the step could reach with everything else (norms, activations, attention, the
    optimizer) free: the ceiling the conv kernels of this box set for these shapes."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    shapes: dict[torch.nn.Module, tuple[torch.Size, bool]] = {}

    def record(module: torch.nn.Module, args: tuple) -> None:
        shapes.setdefault(module, (args[0].shape, args[0].requires_grad))
    hooks = [m.register_forward_pre_hook(record) for m in convs]
    step()
    for h in hooks:
        h.remove()
    flops = seconds = 0
    for conv in convs:
        shape, grad = shapes[conv]  # the first conv's input (the data) needs no gradient
        x = torch.randn(shape, device=next(conv.parameters()).device, requires_grad=grad)

        def fwd_bwd(conv=conv, x=x) -> None:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                y = conv(x)
            y.float().sum().backward()
        flops += flops_of(fwd_bwd)
        seconds += timed(fwd_bwd, steps)
    return flops, seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", default="", help="batch sizes, e.g. 16,64,256 (default: "
                    "each model's configured batch_size)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    vae_cfg, unet_cfg = Vae(), Unet()
    bf16 = dev.type == "cuda" or bf16_enabled(vae_cfg.bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)

    n_ref = 8192 if dev.type == "cuda" else 2048
    a, b = (torch.randn(n_ref, n_ref, dtype=dtype, device=dev) for _ in range(2))
    peak = 2 * n_ref**3 / timed(lambda: a @ b, args.steps)

    vae = VAE(vae_cfg).train().to(dev)
    vae_opt = adamw(vae.parameters(), vae_cfg.lr, 0.01)
    vae_side = min(vae_cfg.crop or vae_cfg.image_size, vae_cfg.image_size)  # what it trains on
    side = vae_cfg.image_size // vae.down_factor
    unet = ContextUnet.from_config(unet_cfg, vae_cfg.latent_channels, 384, side).train().to(dev)
    unet_opt = adamw(unet.parameters(), unet_cfg.lr, 0.0)
    schedule = NoiseSchedule(Diffusion())

    def steps_for(batch: int | None):
        x = torch.rand(batch or vae_cfg.batch_size, 3, vae_side, vae_side, device=dev) * 2 - 1
        z = torch.randn(batch or unet_cfg.batch_size, vae_cfg.latent_channels, side, side,
                        device=dev)
        # caption token states as the latent cache stores them (default captions: <= 29)
        c = torch.randn(len(z), 29, 384, device=dev)

        def train_step(loss_fn, opt):
            def step() -> None:
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_fn()
                opt.zero_grad()
                loss.backward()
                opt.step()
            return step

        return [("vae", vae, train_step(lambda: vae_loss(vae, x), vae_opt), len(x)),
                ("unet", unet, train_step(lambda: training_loss(
                    unet, schedule, z, c, unet_cfg.cond_drop, None), unet_opt), len(z))]

    print(f"reference: {n_ref}^3 matmul in {dtype} on {dev.type}: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':6s} {'params':>8s} {'batch':>5s} {'GFLOP/step':>10s} {'s/step':>7s} "
          f"{'GFLOP/s':>8s} {'of peak':>7s}")
    for batch in [int(b) for b in args.batch.split(",") if b] or [None]:
        for name, model, step, size in steps_for(batch):
            flops, seconds = flops_of(step), timed(step, args.steps)
            n = sum(p.numel() for p in model.parameters())
            print(f"{name:6s} {n / 1e6:7.2f}M {size:5d} {flops / 1e9:10.2f} {seconds:7.4f} "
                  f"{flops / seconds / 1e9:8.1f} {flops / seconds / peak:7.1%}", flush=True)
            cflops, cseconds = conv_ceiling(model, step, bf16, args.steps)
            print(f"{'  convs alone':21s} {cflops / 1e9:10.2f} {cseconds:7.4f} "
                  f"{cflops / cseconds / 1e9:8.1f} {cflops / cseconds / peak:7.1%}  "
                  f"({cflops / flops:.0%} of the FLOPs, {cseconds / seconds:.0%} of the time)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
