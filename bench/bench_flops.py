"""Achieved FLOP/s of the VAE and U-Net training steps vs a large matmul, in one run.

The step timed is the one the vae and unet stages take, components.training.runtime's
train_step (precision, gradient clipping, LR schedule and EMA included). FLOPs per step
are counted by torch's own FlopCounterMode (forward + backward); the peak reference is a
2048^3 matmul in the same precision the training uses (bf16 where the CPU has native
bf16, as `bf16: auto` decides; on CUDA an 8192^3 matmul in the stages' precision). Goal
(issue "Models that learn"): >= 50% of that peak on the CPU. Needs no data: random inputs
of the default shapes; --batch times other batch sizes too (on a GPU the default batch is
bound by per-step overhead, not arithmetic). Under each model, "convs alone": its
convolutions timed one by one at their training-step shapes, the ceiling this box's conv
kernels set.
Usage: python bench/bench_flops.py [--steps N] [--device cpu|cuda] [--batch 16,64,256]
"""

import argparse
import copy
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from components.config import Diffusion, Unet, Vae
from components.models.diffusion import NoiseSchedule, training_loss
from components.models.unet import ContextUnet
from components.models.vae import VAE, vae_loss
from components.training.runtime import Runtime, adamw, cosine_with_warmup, runtime, train_step


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


def conv_ceiling(model: torch.nn.Module, step, rt: Runtime, steps: int) -> tuple[int, float]:
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
            with rt.autocast():
                y = conv(x)
            y.float().sum().backward()
        flops += flops_of(fwd_bwd)
        seconds += timed(fwd_bwd, steps)
    return flops, seconds


class StageStep:
    """What a training stage holds for its loop (optimizer, LR schedule, EMA weights, step
    count); `step(loss_fn)` is a callable taking one step the way the stage takes it:
    components.training.runtime.train_step (loss under the runtime's precision, backward
    with gradient clipping, LR schedule, EMA update)."""

    def __init__(self, rt: Runtime, model: torch.nn.Module, ema_model: torch.nn.Module | None,
                 ema: float, lr: float, weight_decay: float, warmup: int, total: int):
        self.rt, self.ema = rt, ema
        self.params = list(model.parameters())
        self.ema_params = list(ema_model.parameters()) if ema_model is not None else None
        self.opt = adamw(self.params, lr, weight_decay)
        self.sched = cosine_with_warmup(self.opt, warmup, total)
        self.count = 0

    def step(self, loss_fn):
        def one() -> None:
            train_step(self.rt, loss_fn, self.opt, self.sched, self.params, self.ema_params,
                       self.ema, self.count)
            self.count += 1
        return one


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", default="", help="batch sizes, e.g. 16,64,256 (default: "
                    "each model's configured batch_size)")
    args = ap.parse_args()
    vae_cfg, unet_cfg = Vae(), Unet()
    # device and precision as the stages pick them (bf16 auto: native bf16 on the CPU;
    # on CUDA bf16, or fp16 with loss scaling where the GPU has no bf16)
    vae_rt = runtime(args.device, vae_cfg.bf16, "vae")
    unet_rt = runtime(args.device, unet_cfg.bf16, "unet")
    dev = vae_rt.device
    dtype = vae_rt.amp_dtype or torch.float32
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)  # the losses' draws, on the CPU as in the stages

    n_ref = 8192 if dev.type == "cuda" else 2048
    a, b = (torch.randn(n_ref, n_ref, dtype=dtype, device=dev) for _ in range(2))
    peak = 2 * n_ref**3 / timed(lambda: a @ b, args.steps)

    # the models, EMA copies, optimizers and LR schedules as the vae and unet stages build
    # them (components/training/vae.py, unet.py); the VAE's schedule length is nominal
    vae = VAE(vae_cfg).train()
    vae_net = vae_rt.wrap(vae)
    vae_ema = copy.deepcopy(vae).eval().requires_grad_(False) if vae_cfg.ema else None
    vae_stage = StageStep(vae_rt, vae, vae_ema, vae_cfg.ema, vae_cfg.lr, 0.01, 50, 1000)
    vae_side = min(vae_cfg.crop or vae_cfg.image_size, vae_cfg.image_size)  # what it trains on
    side = vae_cfg.image_size // vae.down_factor
    unet = ContextUnet.from_config(unet_cfg, vae_cfg.latent_channels, 384, side).train()
    unet_net = unet_rt.wrap(unet)
    unet_ema = ContextUnet(**unet.config()).eval()
    unet_ema.load_state_dict(unet.state_dict())
    unet_ema.requires_grad_(False).to(unet_rt.device)
    unet_stage = StageStep(unet_rt, unet, unet_ema, unet_cfg.ema, unet_cfg.lr, 0.0,
                           unet_cfg.warmup, unet_cfg.steps)
    schedule = NoiseSchedule(Diffusion())

    def steps_for(batch: int | None):
        x = torch.rand(batch or vae_cfg.batch_size, 3, vae_side, vae_side, device=dev) * 2 - 1
        z = torch.randn(batch or unet_cfg.batch_size, vae_cfg.latent_channels, side, side,
                        device=dev)
        # caption token states as the latent cache stores them (default captions: <= 29)
        c = torch.randn(len(z), 29, 384, device=dev)
        return [("vae", vae, vae_rt, vae_stage.step(
                    lambda: vae_loss(vae_net, x, gen, (vae_rt.rank, vae_rt.world))), len(x)),
                ("unet", unet, unet_rt, unet_stage.step(lambda: training_loss(
                    unet_net, schedule, z, c, unet_cfg.cond_drop, gen,
                    (unet_rt.rank, unet_rt.world))), len(z))]

    print(f"reference: {n_ref}^3 matmul in {dtype} on {dev.type}: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':6s} {'params':>8s} {'batch':>5s} {'GFLOP/step':>10s} {'s/step':>7s} "
          f"{'GFLOP/s':>8s} {'of peak':>7s}")
    for batch in [int(b) for b in args.batch.split(",") if b] or [None]:
        for name, model, rt, step, size in steps_for(batch):
            flops, seconds = flops_of(step), timed(step, args.steps)
            n = sum(p.numel() for p in model.parameters())
            print(f"{name:6s} {n / 1e6:7.2f}M {size:5d} {flops / 1e9:10.2f} {seconds:7.4f} "
                  f"{flops / seconds / 1e9:8.1f} {flops / seconds / peak:7.1%}", flush=True)
            cflops, cseconds = conv_ceiling(model, step, rt, args.steps)
            print(f"{'  convs alone':21s} {cflops / 1e9:10.2f} {cseconds:7.4f} "
                  f"{cflops / cseconds / 1e9:8.1f} {cflops / cseconds / peak:7.1%}  "
                  f"({cflops / flops:.0%} of the FLOPs, {cseconds / seconds:.0%} of the time)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
