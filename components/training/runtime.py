"""What the VAE and U-Net training loops share: device and precision, data-parallel
processes, LR schedule, checkpoints.

Device: `auto` trains on CUDA when a GPU is visible (bf16 autocast where the GPU has it,
fp16 with loss scaling otherwise), on the CPU otherwise (bf16 autocast where the CPU
computes it natively). Data parallel: launched by `torchrun` (or `processes: N` in the
stage's params, which launches it), every process runs the same loop on its slice of one
global batch drawn from one shared random stream, and DistributedDataParallel averages
the gradients; so N processes with batch_size B train like one process with batch N*B,
and the checkpoint (written by rank 0) resumes on any number of processes.

A checkpoint holds everything that decides the rest of a run (weights, EMA, optimizer,
LR schedule, step, RNG state, running logs), so a killed run resumed from it ends with
the same weights as one that was never stopped. It lives under .cache/checkpoints/<stage>/
named by a hash of what defines the run (settings and inputs): change either and training
starts over instead of resuming something else. Finished runs delete their checkpoint.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from components.contracts import UserError, atomic_path, settings_hash
from components.models.precision import bf16_enabled

CHECKPOINTS = Path(".cache") / "checkpoints"


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The optimizer both models train with: AdamW with the fused kernel (one pass over
    every parameter instead of a dozen element-wise ops each: 4% of a U-Net step here)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


@dataclass
class Runtime:
    """Where and how one training process runs (see the module docstring)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast dtype; None: full float32
    rank: int = 0
    world: int = 1
    scaler: Any = field(default=None, repr=False)  # fp16 loss scaling (CUDA without bf16)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def precision(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loop calls: DistributedDataParallel across processes."""
        model.to(self.device)
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This process's rows of a global batch (every process drew the same one)."""
        return tuple(t[self.rank::self.world] for t in tensors)

    def step(self, loss: torch.Tensor, opt: torch.optim.Optimizer,
             params: list[torch.nn.Parameter], clip: float = 1.0) -> None:
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, clip)
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()

    def mean(self, value: float) -> float:
        """A number averaged over the processes (the loss each logs)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def weight_spread(self, model: torch.nn.Module) -> float:
        """Largest difference between any process's weights and rank 0's: 0 when the
        processes are in step (DDP keeps them so; this checks it)."""
        if self.world == 1:
            return 0.0
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        diff = (flat - ref).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return float(diff)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def runtime(device: str, bf16: bool | str, what: str = "training") -> Runtime:
    """The Runtime for this process: device from the setting (auto/cpu/cuda), precision
    from the bf16 setting, rank and world size from torchrun's environment (starting the
    process group when there are several processes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise UserError(f"{what}.device is cuda but no CUDA GPU is visible to torch "
                        "(torch.cuda.is_available() is False); set it to auto or cpu, or "
                        "install a CUDA build of torch")
    use_cuda = cuda and device != "cpu"
    if use_cuda:
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        # exact resume needs the same convolution algorithms on every run
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        amp = None if bf16 is False else (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    else:
        dev = torch.device("cpu")
        amp = torch.bfloat16 if bf16_enabled(bf16) else None
    if world > 1 and not dist.is_initialized():
        # one group for the process's life: both stages of a run may train in it
        dist.init_process_group("nccl" if use_cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None
    return Runtime(dev, amp, rank, world, scaler)


def finish(rt: Runtime) -> None:
    """Every process waits until rank 0 has written the outputs."""
    rt.barrier()


def cosine_with_warmup(opt: torch.optim.Optimizer, warmup: int, total: int
                       ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base rate, then cosine decay to 5% of it."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Checkpoint:
    def __init__(self, stage: str, identity: Any):
        self.dir = CHECKPOINTS / stage
        self.path = self.dir / f"{settings_hash(identity)}.pt"

    def load(self) -> dict | None:
        """The saved state, or None (none yet, or unreadable: then start over)."""
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - a torn or foreign file must not stop training
            print(f"{self.path}: unreadable checkpoint ({type(e).__name__}); starting over")
            return None

    def save(self, state: dict, main: bool = True) -> None:
        """Atomically, by the main process only; checkpoints of other settings go."""
        if not main:
            return
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        for old in self.dir.glob("*.pt"):
            if old != self.path:
                old.unlink(missing_ok=True)

    def clear(self, main: bool = True) -> None:
        if main:
            shutil.rmtree(self.dir, ignore_errors=True)


def train_step(rt: Runtime, loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer,
               sched: Any, params: list[torch.nn.Parameter],
               ema_params: list[torch.nn.Parameter] | None = None, ema: float = 0.0,
               step: int = 0) -> torch.Tensor:
    """One optimisation step as the vae and unet stages take it (and bench/ times it): the
    loss under the runtime's precision, backward with gradient clipping (Runtime.step), the
    LR schedule, then the EMA weights, whose decay warms up so early weights are not
    averaged in for long."""
    with rt.autocast():
        loss = loss_fn()
    rt.step(loss, opt, params)
    sched.step()
    if ema_params is not None:
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
    return loss
