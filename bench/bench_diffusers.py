"""U-Net training throughput: tinyldm's Context U-Net vs diffusers' UNet2DConditionModel
at about the same parameter count, latent size, batch, caption tokens and precision,
timed side by side in one run.

Goal (issue "Models that learn"): >= 3x the training steps per second of diffusers'
model. diffusers is a bench-only dependency (`pip install -e '.[bench]'`); without it this
bench says so and exits 0.
Usage: python bench/bench_diffusers.py [--steps N] [--rounds R] [--batch B] [--n-feat 64,48]
       [--set unet.cross_attention=false ...] (the plain course-style model: also
       unet.pool_queries=0 and unet.full_res_context=false)
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from components.config import load_params  # noqa: E402
from components.training import adamw, bf16_enabled  # noqa: E402
from components.unet import ContextUnet  # noqa: E402

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


def time_steps(model, batch: int, shape, steps: int, bf16: bool, call) -> float:
    opt = adamw(model.parameters(), 1e-3, 0.0)  # what the unet stage uses, for both
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *shape), generator=gen)
    tokens = torch.randn((batch, TOKENS, TEXT_DIM), generator=gen)
    t = torch.rand(batch, generator=gen)
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(call(model, x, t, tokens).float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
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
    bf16 = bf16_enabled(cfg.bf16)
    print(f"{'model':28s} {'params':>10s} {'steps/s':>8s} {'speed-up':>8s}")
    for n_feat in args.n_feat or [cfg.n_feat]:
        torch.manual_seed(0)
        ours = ContextUnet.from_config(cfg, shape[0], TEXT_DIM, size, n_feat).train()
        theirs = diffusers_unet(n_params(ours), shape[0], size).train()
        rates = {"ours": 0.0, "theirs": 0.0}
        for _ in range(args.rounds):  # interleaved; the best round of each counts
            for key, model, call in [
                    ("ours", ours, lambda m, x, t, c: m(x, t, c)),
                    ("theirs", theirs,
                     lambda m, x, t, c: m(x, t * 999, encoder_hidden_states=c).sample)]:
                rates[key] = max(rates[key], time_steps(model, batch, shape, args.steps, bf16,
                                                        call))
        print(f"{f'tinyldm ContextUnet n_feat {n_feat}':28s} {n_params(ours):10,d} "
              f"{rates['ours']:8.2f} {rates['ours'] / rates['theirs']:7.2f}x")
        print(f"{'diffusers UNet2DCondition':28s} {n_params(theirs):10,d} "
              f"{rates['theirs']:8.2f}")
    print(f"(latent {shape}, batch {batch}, {TOKENS} caption tokens, bf16={bf16}, "
          f"overrides: {', '.join(args.set) or 'none'}; goal >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
