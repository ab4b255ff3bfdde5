"""Distances between sets of images that work offline: Fréchet distance (FD) and kernel
distance (KID) from torchmetrics, in a feature space chosen in params.

No Inception or CLIP weights exist offline, so the default feature space is `BrandFeatures`:
fixed, weight-free statistics of what brand graphics are made of — where the colours sit
(a 4x4 colour layout), which colours there are (a 4x4x4 colour histogram), how saturated,
and where and how strong the edges are (Sobel magnitude layout and orientation histogram,
Laplacian detail layout: text strokes, shapes, and blur show up here). Being weight-free
it is the same on every machine and in every version, so FD values of two model versions
are comparable; it is blind to semantics an Inception network would see (it cannot tell a
letter from a squiggle of the same stroke statistics).

A user with weights can pass any module mapping float images N x 3 x S x S in [0, 1] to
N x D features (e.g. an Inception-v3 pool layer; S = params evaluate.feature_image_size,
299 for Inception) as evaluate.feature_extractor: a TorchScript file (torch.jit.save) or,
as TorchScript is deprecated, a torch.export program (torch.export.save, suffix .pt2, with
a dynamic batch dimension).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from components.config import Evaluate
from components.contracts import UserError, sha256_file

DETAIL_BASE = 64  # the side detail_ratio compares against (the first default's native size)


def detail_ratio(image: Image.Image, base: int = DETAIL_BASE) -> float:
    """How much detail an image has beyond `base` px: the variance of its Laplacian over
    that of the image squeezed to `base` px on its short side and resized back (LANCZOS
    both ways). 1.0: nothing finer than `base` px (an upscaled small image); a sharp
    poster at 256 px and above: tens."""
    import cv2

    w, h = image.size
    k = base / min(w, h)
    small = image.resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.LANCZOS)
    back = small.resize((w, h), Image.Resampling.LANCZOS)

    def lap_var(im: Image.Image) -> float:
        grey = np.asarray(im.convert("L"), dtype=np.float32)
        return float(cv2.Laplacian(grey, cv2.CV_32F).var())

    return lap_var(image) / max(lap_var(back), 1e-6)


BUILTIN = "builtin"
BUILTIN_ID = "builtin:brand-features-v1"  # bump when BrandFeatures changes: FDs stop comparing


class BrandFeatures(nn.Module):
    num_features = 48 + 64 + 4 + 16 + 8 + 16

    def __init__(self) -> None:
        super().__init__()
        sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 8
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]) / 4
        self.register_buffer("kernels", torch.stack([sobel, sobel.T, lap])[:, None])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(0, 1)
        n = x.shape[0]
        layout = F.adaptive_avg_pool2d(x, 4).flatten(1)                      # 48
        q = (x * 3.999).long()                                                # 4 levels
        bins = (q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]).flatten(1)
        hist = torch.zeros(n, 64).scatter_add_(1, bins, torch.ones(bins.shape))
        hist = hist / bins.shape[1]                                           # 64
        mx, mn = x.max(1).values, x.min(1).values
        sat = ((mx - mn) / mx.clamp_min(1e-3))[:, None]
        sat = F.adaptive_avg_pool2d(sat, 2).flatten(1)                        # 4
        grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
        g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), self.kernels)
        mag = g[:, :2].square().sum(1, keepdim=True).sqrt()
        edges = F.adaptive_avg_pool2d(mag, 4).flatten(1)                      # 16
        angle = torch.atan2(g[:, 1], g[:, 0]).remainder(math.pi)             # 0..pi
        obin = (angle / math.pi * 8).long().clamp(max=7).flatten(1)
        orient = torch.zeros(n, 8).scatter_add_(1, obin, mag.flatten(1))
        orient = orient / mag.flatten(1).sum(1, keepdim=True).clamp_min(1e-6)  # 8
        detail = F.adaptive_avg_pool2d(g[:, 2:].abs(), 4).flatten(1)         # 16
        # fixed block weights: each block's total variance on brand graphics is then about
        # 1 (measured on the built-in data), so edges and detail (blur, text strokes)
        # count as much as colour in the distance
        return torch.cat([layout, hist, 2 * sat, 10 * edges, 5 * orient, 12 * detail], 1)


class Resized(nn.Module):
    """Resize to the extractor's input size first (bilinear, antialiased)."""

    def __init__(self, inner: nn.Module, size: int) -> None:
        super().__init__()
        self.inner, self.size = inner, size

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear",
                              antialias=True, align_corners=False)
        return self.inner(x).float().flatten(1)


def feature_extractor(cfg: Evaluate) -> tuple[nn.Module, str]:
    """(module taking N x 3 x H x W in [0, 1], an identity naming the feature space)."""
    if cfg.feature_extractor == BUILTIN:
        return Resized(BrandFeatures(), cfg.feature_image_size).eval(), BUILTIN_ID
    path = Path(cfg.feature_extractor)
    fix = ("save a module mapping float images N x 3 x S x S in [0, 1] to N x D features "
           "with torch.jit.save or torch.export.save (.pt2), or set "
           "evaluate.feature_extractor: builtin")
    if not path.is_file():
        raise UserError(f"evaluate.feature_extractor: {path} not found; {fix}")
    kind = "export" if path.suffix == ".pt2" else "torchscript"
    try:
        if kind == "export":
            module = torch.export.load(str(path)).module()
        else:
            module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # any load failure is the file's fault
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"evaluate.feature_extractor: {path} is not a loadable {kind} "
                        f"file ({first}); {fix}") from None
    return Resized(module, cfg.feature_image_size), f"{kind}:{sha256_file(path)[:16]}"


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Same-size PIL images -> N x 3 x H x W float in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def distances(real: list[Image.Image], fake: list[Image.Image], extractor: nn.Module,
              seed: int = 0, batch: int = 64) -> dict[str, float]:
    """FD and KID (mean, std over subsets) between two image sets (>= 2 images each, of
    any sizes: the extractor resizes)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise UserError(f"FD needs at least 2 real and 2 generated images (got {len(real)} "
                        f"and {len(fake)}); add images to the val split")
    size = real[0].size[::-1]
    fd = FrechetInceptionDistance(feature=extractor, normalize=True,
                                  input_img_size=(3, *size))
    subset = min(50, len(real), len(fake))
    with warnings.catch_warnings():  # "saves all features in a buffer": a few hundred here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=extractor, normalize=True, subsets=20,
                                      subset_size=subset)
    for images, is_real in [(real, True), (fake, False)]:
        by_size: dict[tuple[int, int], list[Image.Image]] = {}  # formats: one size a batch
        for im in images:
            by_size.setdefault(im.size, []).append(im)
        for same in by_size.values():
            for i in range(0, len(same), batch):
                x = to_tensor(same[i : i + batch])
                fd.update(x, real=is_real)
                kid.update(x, real=is_real)
    rng = torch.get_rng_state()
    torch.manual_seed(seed)  # KID draws its subsets from the global generator
    kid_mean, kid_std = kid.compute()
    torch.set_rng_state(rng)
    return {"fd": max(0.0, float(fd.compute())), "kid": float(kid_mean),
            "kid_std": float(kid_std)}
