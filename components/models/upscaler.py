"""The learned upscaler: a native-size sample to `factor` x its size.

Flat brand graphics upscaled by an interpolating filter stay as blurry as the native size
(the detail ratio of a Lanczos resize is 1.0); this small network adds what the collection's
own full-size images have: sharp edges, corners and strokes. It predicts the difference to
a bilinear upscale (its last layer starts at zero, so an untrained one is exactly
bilinear), from a few 3x3 convolutions at the input size, then a pixel shuffle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from components.config import Upscaler as UpscalerCfg
from components.contracts import UserError, write_json

WEIGHTS, CONFIG = "weights.safetensors", "config.json"


class Upscaler(nn.Module):
    def __init__(self, factor: int = 4, width: int = 48, depth: int = 4):
        super().__init__()
        self.factor = factor
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
        last = nn.Conv2d(width, 3 * factor * factor, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(*layers, last, nn.PixelShuffle(factor))

    @classmethod
    def from_config(cls, cfg: UpscalerCfg) -> Upscaler:
        return cls(cfg.factor, cfg.width, cfg.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> (B, 3, H * factor, W * factor)."""
        base = F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)
        return base + self.body(x)

    @torch.no_grad()
    def upscale(self, images: list[Image.Image]) -> list[Image.Image]:
        """PIL images (one size) to `factor` x their size."""
        from components.models.images import from_pil, to_pil

        return to_pil(self.eval()(from_pil(images)).clamp(-1, 1))


def save_upscaler(model: Upscaler, cfg: UpscalerCfg, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(out_dir / WEIGHTS))
    write_json(out_dir / CONFIG, {"upscaler": cfg.model_dump(mode="json")})


def load_upscaler(model_dir: Path) -> Upscaler:
    model_dir = Path(model_dir)
    if not (model_dir / WEIGHTS).exists() or not (model_dir / CONFIG).exists():
        raise UserError(f"{model_dir}: no trained upscaler there (needs {WEIGHTS} and "
                        f"{CONFIG}); run the upscaler stage first")
    cfg = UpscalerCfg(**json.loads((model_dir / CONFIG).read_text())["upscaler"])
    model = Upscaler.from_config(cfg)
    model.load_state_dict(load_file(str(model_dir / WEIGHTS)))
    return model.eval()
