"""Image files <-> tensors in [-1, 1] at the models' size, and grids of PIL images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.contracts import (
    UserError,
    open_rgb,
)

Size = int | tuple[int, int]  # a square's side, or (width, height)


def load_image_tensor(path: Path | str, size: Size) -> torch.Tensor:
    """One image (contracts.open_rgb: rotated, flattened on white, RGB) as a
    3 x height x width float tensor in [-1, 1]."""
    w, h = (size, size) if isinstance(size, int) else size
    try:
        im = open_rgb(path).resize((w, h), Image.Resampling.BICUBIC)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read image ({e}); re-run validate to quarantine it") \
            from None
    return from_pil([im])[0].contiguous()


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) in [-1, 1] (the inverse of to_pil)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def load_batch(paths: list[Path] | list[str], size: Size) -> torch.Tensor:
    if not paths:
        w, h = (size, size) if isinstance(size, int) else size
        return torch.zeros(0, 3, h, w)
    return torch.stack([load_image_tensor(p, size) for p in paths])


def load_formats(paths: list[Path] | list[str], formats: list[str],
                 sizes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The images grouped by format (aspect bucket, models/buckets.py), each group one
    tensor at its bucket's (width, height), in order of first appearance."""
    from components.models.buckets import groups

    return {f: load_batch([paths[i] for i in rows.tolist()], sizes[f])
            for f, rows in groups(formats).items()}


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


def image_grid(rows: list[list[Image.Image]], cell: int = 128) -> Image.Image:
    """Rows of images as one picture, each image `cell` pixels on its long side, in its
    own aspect (nearest: the pixels a small model made stay visible as pixels)."""
    def fit(im: Image.Image) -> tuple[int, int]:
        k = cell / max(im.size)
        return max(1, round(im.width * k)), max(1, round(im.height * k))

    widths = [max(fit(r[i])[0] for r in rows if i < len(r))
              for i in range(max(len(r) for r in rows))]
    heights = [max(fit(im)[1] for im in r) if r else cell for r in rows]
    grid = Image.new("RGB", (sum(widths), sum(heights)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.convert("RGB").resize(fit(im), Image.Resampling.NEAREST),
                       (sum(widths[:x]), sum(heights[:y])))
    return grid
