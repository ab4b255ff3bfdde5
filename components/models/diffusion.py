"""Noise schedule and samplers (diffusers-style: the U-Net knows nothing of sampling).

- `NoiseSchedule`: betas and alpha-bar for T training timesteps; `q_sample` noises x0.
- `training_loss`: the epsilon-prediction objective with caption dropout.
- Samplers share one contract: `set_timesteps(n)` fills `.timesteps` (descending ints),
  then for each pair (t, t_prev) of `.pairs()` call `step(x0, eps, t, t_prev, sample,
  generator) -> prev_sample` with the model's two predictions at t; t_prev = -1 means
  "to the clean sample". Adding a sampler is adding one class.
- `sample` runs a sampler with classifier-free guidance, cond and uncond in one batch.

The network is any module called as `model(x_t, t in [0, 1], context)`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.config import Diffusion as DiffusionCfg
from components.config import Sampler as SamplerCfg
from components.contracts import progress

Generators = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...] | torch.Size, generator: Generators) -> torch.Tensor:
    """Gaussian noise; with a list of generators, row i comes from generator i alone, so
    an image does not depend on what else is in the batch."""
    if isinstance(generator, list):
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generator])
    return torch.randn(tuple(shape), generator=generator)


# ---------------------------------------------------------------- schedule
class NoiseSchedule:
    def __init__(self, cfg: DiffusionCfg):
        self.cfg = cfg
        T = self.num_timesteps = cfg.timesteps
        if cfg.schedule == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
        else:  # cosine, Nichol & Dhariwal 2021
            s = 0.008
            steps = torch.arange(T + 1, dtype=torch.float64) / T
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.betas = betas.float()
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha-bar at t; t = -1 (before the first step) is 1."""
        t = torch.as_tensor(t)
        return torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones(()))

    def normalise(self, t: torch.Tensor) -> torch.Tensor:
        """Integer timesteps -> the float in [0, 1] the U-Net takes."""
        return t.float() / (self.num_timesteps - 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
                 ) -> torch.Tensor:
        """x_t = sqrt(ab) x0 + sqrt(1 - ab) noise (the course version forgot the sqrt)."""
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def _ab(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar(t).to(like.device, like.dtype)
        return ab.view(-1, *[1] * (like.dim() - 1)) if ab.dim() else ab

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weighting (Hang et al. 2023) when diffusion.min_snr_gamma > 0:
        caps the weight of nearly clean steps, which otherwise dominate the gradient;
        expressed for the chosen target. 1 everywhere when off."""
        gamma = self.cfg.min_snr_gamma
        if not gamma:
            return torch.ones(t.shape)
        ab = self.alpha_bar(t)
        snr = ab / (1 - ab)
        return snr.clamp(max=gamma) / (snr + 1 if self.cfg.prediction == "v" else snr)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output: the noise (eps) or the velocity
        v = sqrt(ab) noise - sqrt(1 - ab) x0. At high noise v is about -x0, so a v-model
        must decide the image's global content (its background colour) from the caption;
        an eps-model is barely penalised there and takes it from the leftover signal in
        the noise, which ignores the prompt at sampling time."""
        if self.cfg.prediction == "eps":
            return noise
        ab = self._ab(t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def predictions(self, output: torch.Tensor, t: int, sample: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's output at step t as (x0, eps), what every sampler steps with.
        Each is computed directly from v (no division by sqrt(ab), which is ~1e-4 at the
        last cosine step and would blow float32 rounding up into the image)."""
        ab = self._ab(t, sample)
        if self.cfg.prediction == "eps":
            return (sample - (1 - ab).sqrt() * output) / ab.sqrt(), output
        return (ab.sqrt() * sample - (1 - ab).sqrt() * output,
                ab.sqrt() * output + (1 - ab).sqrt() * sample)


def training_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
                  c: torch.Tensor, cond_drop: float, generator: torch.Generator | None,
                  part: tuple[int, int] = (0, 1), glyph: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """MSE to the schedule's target (eps or v); each caption (and its glyph map, together)
    is zeroed with probability cond_drop so the same network also learns the unconditional
    prediction used by guidance. `part` = (rank, processes): x0 is that process's slice of
    a global batch, and the random draws are made for the whole batch and sliced the same
    way."""
    b, dev = x0.shape[0], x0.device
    rank, world = part
    n = b * world
    # drawn on the (CPU) generator: the same stream on any device and process count
    t = torch.randint(0, schedule.num_timesteps, (n,), generator=generator)[rank::world]
    noise = torch.randn((n, *x0.shape[1:]), generator=generator)[rank::world].to(dev)
    keep = (torch.rand(n, generator=generator)[rank::world] >= cond_drop).to(dev, c.dtype)
    keep = keep.view(b, *[1] * (c.dim() - 1))  # a caption is a vector or token states
    extra = () if glyph is None else (glyph * keep.view(b, 1, 1, 1).to(glyph.dtype),)
    out = model(schedule.q_sample(x0, t, noise), schedule.normalise(t).to(dev), c * keep,
                *extra)
    per_sample = F.mse_loss(out.float(), schedule.target(x0, noise, t),
                            reduction="none").flatten(1).mean(1)
    return (per_sample * schedule.loss_weight(t).to(dev)).mean()


# ---------------------------------------------------------------- samplers
class Sampler:
    """Base: evenly spaced descending timesteps; subclasses define `step`."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.timesteps = torch.arange(schedule.num_timesteps - 1, -1, -1)

    def set_timesteps(self, n: int) -> None:
        T = self.schedule.num_timesteps
        n = max(1, min(n, T))
        self.timesteps = torch.from_numpy(
            np.unique(np.linspace(0, T - 1, n).round().astype(np.int64))[::-1].copy())

    def reset(self) -> None:
        """Forget any state from a previous trajectory (multistep samplers keep some)."""

    def pairs(self) -> list[tuple[int, int]]:
        ts = self.timesteps.tolist()
        return list(zip(ts, ts[1:] + [-1], strict=True))

    def step(self, x0: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
             sample: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """x_{t_prev} from x_t (`sample`) and the model's (x0, eps) at t."""
        raise NotImplementedError


class DDIMSampler(Sampler):
    """Song et al. 2020; eta=0 is deterministic, eta=1 matches DDPM's variance."""

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0):
        super().__init__(schedule)
        self.eta = eta

    def step(self, x0: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
             sample: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        ab, ab_prev = self.schedule.alpha_bar(t), self.schedule.alpha_bar(t_prev)
        sigma = self.eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        direction = (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        prev = ab_prev.sqrt() * x0 + direction
        if self.eta > 0 and t_prev >= 0:
            prev = prev + sigma * randn(sample.shape, generator)
        return prev


class DDPMSampler(Sampler):
    """Ho et al. 2020 ancestral sampling from the posterior q(x_prev | x_t, x0), on a
    possibly respaced timestep grid (beta between the two visited steps)."""

    def step(self, x0: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
             sample: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        ab, ab_prev = self.schedule.alpha_bar(t), self.schedule.alpha_bar(t_prev)
        beta = 1 - ab / ab_prev
        mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 \
            + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * sample
        if t_prev < 0:
            return mean
        var = beta * (1 - ab_prev) / (1 - ab)
        return mean + var.sqrt() * randn(sample.shape, generator)


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M), Lu et al. 2022: a second-order multistep solver on the model's
    x0 predictions in log-SNR time; ~20 steps match DDIM-50. Deterministic; remembers
    the previous step's x0, so `reset()` starts a new trajectory."""

    def __init__(self, schedule: NoiseSchedule):
        super().__init__(schedule)
        self.reset()

    def reset(self) -> None:
        self._last: tuple[float, torch.Tensor] | None = None

    def _lam(self, ab: torch.Tensor) -> float:
        return float(0.5 * (torch.log(ab) - torch.log1p(-ab)))  # log(alpha / sigma)

    def step(self, x0: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
             sample: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        if t_prev < 0:  # the last step lands on the model's clean estimate
            return x0
        ab, ab_prev = self.schedule.alpha_bar(t), self.schedule.alpha_bar(t_prev)
        lam, lam_prev = self._lam(ab), self._lam(ab_prev)
        h = lam_prev - lam
        d = x0
        if self._last is not None:  # second order: extrapolate x0 along log-SNR
            lam_last, x0_last = self._last
            r = (lam - lam_last) / h
            d = x0 + (x0 - x0_last) / (2 * r)
        self._last = (lam, x0)
        return ((1 - ab_prev) / (1 - ab)).sqrt() * sample \
            - ab_prev.sqrt() * math.expm1(-h) * d


SAMPLERS = {"ddim": DDIMSampler, "ddpm": DDPMSampler, "dpmpp2m": DPMSolverPP2M}


def make_sampler(cfg: SamplerCfg, schedule: NoiseSchedule) -> Sampler:
    sampler: Sampler = (DDIMSampler(schedule, cfg.eta) if cfg.name == "ddim"
                        else SAMPLERS[cfg.name](schedule))
    sampler.set_timesteps(cfg.steps)
    return sampler


@torch.no_grad()
def sample(model: nn.Module, schedule: NoiseSchedule, sampler: Sampler,
           context: torch.Tensor, shape: tuple[int, ...], guidance: float,
           generator: Generators = None, glyph: torch.Tensor | None = None) -> torch.Tensor:
    """Latents (B, *shape) for captions `context` (B, D) or (B, L, D) and glyph maps (B, 1,
    H, W) or None, with classifier-free guidance out = out_u + g (out_c - out_u), the
    unconditional input being no caption and an empty glyph map; g=0 is unconditional,
    g=1 purely conditional."""
    b = context.shape[0]
    x = randn((b, *shape), generator)
    uncond = torch.zeros_like(context)
    # the glyph map goes with the caption (dropped together): no glyph argument at all
    # for a U-Net without glyph input
    g_c, g_u, g_both = ((), (), ()) if glyph is None else \
        ((glyph,), (torch.zeros_like(glyph),), (torch.cat([glyph, torch.zeros_like(glyph)]),))
    sampler.reset()
    for t, t_prev in progress(sampler.pairs(), desc="sampling", unit="step", leave=False):
        tt = schedule.normalise(torch.full((b,), t))
        if guidance == 1.0 or guidance == 0.0:
            c = context if guidance == 1.0 else uncond
            out = model(x, tt, c, *(g_c if guidance == 1.0 else g_u)).float()
        else:
            out_c, out_u = model(torch.cat([x, x]), torch.cat([tt, tt]),
                                 torch.cat([context, uncond]),
                                 *g_both).float().chunk(2)
            out = out_u + guidance * (out_c - out_u)  # linear: same for eps or v
        x0, eps = schedule.predictions(out, t, x)
        x = sampler.step(x0, eps, t, t_prev, x, generator)
    return x
