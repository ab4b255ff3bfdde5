"""Aspect-ratio buckets (params `formats`): every image trains at the bucket nearest its
own aspect, at about the native pixel count (vae.image_size squared) on the U-Net's grid,
so banners and stories are learned in their shape instead of squeezed square. A batch
never mixes buckets (its tensors share one shape); the bucket's name is the caption's
{format} word.

Pure functions of ratios and counts: the labels stage assigns each image its bucket
(`nearest`), the trainers group and draw by it (`epoch_batches`, `draw`), generation
samples at the bucket nearest the requested W:H (`size_at`)."""

from __future__ import annotations

import math

import torch

Ratio = tuple[int, int] | list[int]  # width : height


def log_aspect(width: float, height: float) -> float:
    return math.log(width / height)


def stretch(width: float, height: float, ratio: Ratio) -> float:
    """How far width x height is from the ratio, as a factor >= 1 (1.0: exactly it)."""
    return math.exp(abs(log_aspect(width, height) - log_aspect(*ratio)))


def nearest(width: float, height: float, buckets: dict[str, Ratio]) -> str:
    """The bucket whose ratio is nearest width:height (in log aspect; a tie goes to the
    one listed first)."""
    return min(buckets, key=lambda name: stretch(width, height, buckets[name]))


def aspect_range(buckets: dict[str, Ratio], max_stretch: float) -> tuple[float, float]:
    """The narrowest and the widest width/height an image may have: the extreme buckets
    stretched by max_stretch."""
    aspects = [r[0] / r[1] for r in buckets.values()]
    return min(aspects) / max_stretch, max(aspects) * max_stretch


def size_at(aspect: float, native: int, grid: int) -> tuple[int, int]:
    """(w, h) multiples of `grid` with w / h close to `aspect` and w * h close to
    native squared (the aspect counts twice as much as the pixel count)."""
    if abs(math.log(aspect)) < 1e-9:
        return native, native

    def width(h: int) -> int:
        return max(grid, round(h * aspect / grid) * grid)

    def miss(h: int) -> float:
        w = width(h)
        return abs(math.log(w / h / aspect)) + 0.5 * abs(math.log(w * h / native**2))

    h = min(range(grid, 4 * native + 1, grid), key=miss)
    return width(h), h


def sizes(buckets: dict[str, Ratio], native: int, down_factor: int
          ) -> dict[str, tuple[int, int]]:
    """Each bucket's (w, h) in pixels for a VAE of that down factor: on the U-Net's grid
    (latent sides multiples of 4)."""
    return {name: size_at(r[0] / r[1], native, 4 * down_factor) for name, r in buckets.items()}


def format_sizes(buckets: dict[str, Ratio], vae_cfg) -> dict[str, tuple[int, int]]:
    """`sizes` for the VAE that vae_cfg (params `vae`) describes."""
    return sizes(buckets, vae_cfg.image_size, 2 ** (len(vae_cfg.channel_mult) - 1))


def groups(formats: list[str]) -> dict[str, torch.Tensor]:
    """Row indices of each format, formats in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i, f in enumerate(formats):
        out.setdefault(f, []).append(i)
    return {f: torch.tensor(rows, dtype=torch.long) for f, rows in out.items()}


def epoch_batches(groups: dict[str, torch.Tensor], batch: int, gen: torch.Generator,
                  multiple: int = 1) -> list[tuple[str, torch.Tensor]]:
    """One epoch: each bucket's rows shuffled and cut into batches of `batch` (the last
    may be smaller; each bucket trimmed to a multiple of `multiple`, for equal slices on
    data-parallel processes), the batches in a shuffled order. With one bucket this is
    exactly one permutation cut in order (no extra random draw). Items: (format, rows)."""
    out = []
    for name, rows in groups.items():
        order = rows[torch.randperm(len(rows), generator=gen)]
        order = order[: len(order) - len(order) % multiple]
        out += [(name, order[i : i + batch]) for i in range(0, len(order), batch)]
    if len(groups) > 1:
        out = [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]
    return out


def draw(counts: list[int], gen: torch.Generator) -> int:
    """A bucket's position, drawn in proportion to its count (0 with one bucket, without
    a random draw)."""
    if len(counts) == 1:
        return 0
    return int(torch.multinomial(torch.tensor(counts, dtype=torch.float), 1,
                                 generator=gen))
