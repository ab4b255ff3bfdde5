"""U-Net training throughput: tinyldm's Context U-Net vs diffusers' UNet2DConditionModel
at about the same parameter count, latent size, batch, caption tokens and precision,
timed side by side in one run. Both take the step the unet stage takes
(components.training.runtime.train_step on components.models.diffusion.training_loss:
precision, gradient clipping, LR schedule and EMA included), on the stage's device.

Goal (issue "Models that learn"): >= 3x the training steps per second of diffusers'
model. diffusers is a bench-only dependency (`pip install -e '.[bench]'`); without it this
bench says so and exits 0.
Usage: python bench/bench_diffusers.py [--steps N] [--rounds R] [--batch B] [--n-feat 64,48]
       [--set unet.cross_attention=false ...] (the plain course-style model: also
       unet.pool_queries=0 and unet.full_res_context=false)
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from components.config import Unet as UnetCfg
from components.config import load_params
from components.models.diffusion import NoiseSchedule, training_loss
from components.models.unet import ContextUnet
from components.training.runtime import Runtime, adamw, cosine_with_warmup, runtime, train_step

ROOT = Path(__file__).resolve().parents[1]
TOKENS, TEXT_DIM = 32, 384  # MiniLM token states (default captions: <= 29 tokens)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def diffusers_unet(target: int, channels: int, size: int):
    """The smallest sensible UNet2DConditionModel (two levels, cross-attention at the
    lower one, one layer a block), widened until it has about `target` parameters."""
    from diffusers import UNet2DConditionModel

    best = None
    for width in range(8, 257, 8):
        model = UNet2DConditionModel(
            sample_size=size, in_channels=channels, out_channels=channels,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(width, 2 * width), layers_per_block=1,
            cross_attention_dim=TEXT_DIM, attention_head_dim=8,
            norm_num_groups=min(8, width))
        if best is None or abs(n_params(model) - target) < abs(n_params(best) - target):
            best = model
        if n_params(model) > target:
            break
    return best


class Diffusers(torch.nn.Module):
    """diffusers' U-Net called the way training_loss calls ours: (noisy latents, timestep
    in [0, 1], caption token states) -> prediction; diffusers takes integer timesteps."""

    def __init__(self, model: torch.nn.Module, timesteps: int):
        super().__init__()
        self.model, self.last = model, timesteps - 1

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.model(x, t * self.last, encoder_hidden_states=c).sample


def time_steps(rt: Runtime, model: torch.nn.Module, ema_model: torch.nn.Module,
               schedule: NoiseSchedule, cfg: UnetCfg, batch: int, shape, steps: int) -> float:
    """Steps per second of the step the unet stage takes (components/training/unet.py):
    train_step with training_loss, the stage's AdamW, LR schedule, gradient clipping and
    EMA, the loss read back every step as the stage does."""
    net = rt.wrap(model)
    params, ema_params = list(model.parameters()), list(ema_model.parameters())
    opt = adamw(params, cfg.lr, 0.0)
    sched = cosine_with_warmup(opt, cfg.warmup, cfg.steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *shape), generator=gen).to(rt.device)
    tokens = torch.randn((batch, TOKENS, TEXT_DIM), generator=gen).to(rt.device)
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            start = time.perf_counter()
        loss = train_step(rt, lambda: training_loss(net, schedule, x, tokens, cfg.cond_drop,
                                                    gen, (rt.rank, rt.world)),
                          opt, sched, params, ema_params, cfg.ema, i)
        loss.item()
    return steps / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-feat", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="U-Net widths to compare, e.g. 64,48 (default: unet.n_feat; 48 "
                         "is about 1M parameters)")
    ap.add_argument("--batch", type=int, default=0, help="default: unet.batch_size")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params override, e.g. unet.cross_attention=false")
    args = ap.parse_args()
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("bench_diffusers: diffusers is not installed (pip install -e '.[bench]'); "
              "skipped")
        return 0
    params = load_params(ROOT / "params.yaml", overrides=args.set)
    cfg = params.unet
    down = 2 ** (len(params.vae.channel_mult) - 1)
    size = params.vae.image_size // down
    shape = (params.vae.latent_channels, size, size)
    batch = args.batch or cfg.batch_size
    rt = runtime(cfg.device, cfg.bf16, "unet")  # device and precision as the stage has them
    bf16 = rt.precision == "bf16"
    schedule = NoiseSchedule(params.diffusion)
    print(f"{'model':28s} {'params':>10s} {'steps/s':>8s} {'speed-up':>8s}")
    for n_feat in args.n_feat or [cfg.n_feat]:
        torch.manual_seed(0)
        ours = ContextUnet.from_config(cfg, shape[0], TEXT_DIM, size, n_feat).train()
        ours_ema = ContextUnet(**ours.config()).eval()  # as the unet stage keeps it
        ours_ema.load_state_dict(ours.state_dict())
        theirs = Diffusers(diffusers_unet(n_params(ours), shape[0], size),
                           schedule.num_timesteps).train()
        theirs_ema = copy.deepcopy(theirs).eval()
        for ema in (ours_ema, theirs_ema):
            ema.requires_grad_(False).to(rt.device)
        rates = {"ours": 0.0, "theirs": 0.0}
        for _ in range(args.rounds):  # interleaved; the best round of each counts
            for key, model, ema in [("ours", ours, ours_ema), ("theirs", theirs, theirs_ema)]:
                rates[key] = max(rates[key], time_steps(rt, model, ema, schedule, cfg, batch,
                                                        shape, args.steps))
        print(f"{f'tinyldm ContextUnet n_feat {n_feat}':28s} {n_params(ours):10,d} "
              f"{rates['ours']:8.2f} {rates['ours'] / rates['theirs']:7.2f}x")
        print(f"{'diffusers UNet2DCondition':28s} {n_params(theirs):10,d} "
              f"{rates['theirs']:8.2f}")
    print(f"(latent {shape}, batch {batch}, {TOKENS} caption tokens, bf16={bf16} on "
          f"{rt.device.type}, overrides: {', '.join(args.set) or 'none'}; goal >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
