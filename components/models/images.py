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


def load_image_tensor(path: Path | str, size: int) -> torch.Tensor:
    """One image (contracts.open_rgb: rotated, flattened on white, RGB) as a
    3 x size x size float tensor in [-1, 1]."""
    try:
        im = open_rgb(path).resize((size, size), Image.Resampling.BICUBIC)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read image ({e}); re-run validate to quarantine it") \
            from None
    return from_pil([im])[0].contiguous()


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) in [-1, 1] (the inverse of to_pil)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def load_batch(paths: list[Path] | list[str], size: int) -> torch.Tensor:
    if not paths:
        return torch.zeros(0, 3, size, size)
    return torch.stack([load_image_tensor(p, size) for p in paths])


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
