"""The learned upscaler: a native-size sample to `factor` x its size.

Flat brand graphics upscaled by an interpolating filter stay as blurry as the native size
(the detail ratio of a Lanczos resize is 1.0); this small network adds what the collection's
own full-size images have: sharp edges, corners and strokes. It predicts the difference to
a bilinear upscale (its last layer starts at zero, so an untrained one is exactly
bilinear), from a few 3x3 convolutions at the input size, then a pixel shuffle.

With `glyphs` it also reads the glyph map at the output size (models/glyphs.py: the words
the image shows or the prompt asks for, in brand.font, where they go), folded into the input
grid (each factor x factor block of it as channels): the sample says where the ink is and
its colour, the map the letters' exact shapes, so text comes out sharp at the output size
(a cascaded model's text-conditioned super-resolution stage, not a paste: it is trained
to draw no letters where the sample has no ink; training/upscaler.py).
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
    def __init__(self, factor: int = 4, width: int = 48, depth: int = 4, glyphs: bool = True):
        super().__init__()
        self.factor, self.glyphs = factor, glyphs
        cin = 3 + factor * factor if glyphs else 3
        layers: list[nn.Module] = [nn.Conv2d(cin, width, 3, padding=1), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
        last = nn.Conv2d(width, 3 * factor * factor, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(*layers, last, nn.PixelShuffle(factor))

    @classmethod
    def from_config(cls, cfg: UpscalerCfg) -> Upscaler:
        return cls(cfg.factor, cfg.width, cfg.depth, cfg.glyphs)

    def forward(self, x: torch.Tensor, glyphs: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> (B, 3, H * factor, W * factor); `glyphs`: (B, 1,
        H * factor, W * factor) in 0..1 for an upscaler that reads them (None: no text)."""
        base = F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)
        if self.glyphs:
            if glyphs is None:
                glyphs = x.new_zeros(len(x), 1, *base.shape[-2:])
            x = torch.cat([x, F.pixel_unshuffle(glyphs.to(x.dtype), self.factor)], 1)
        return base + self.body(x)

    @torch.no_grad()
    def upscale(self, images: list[Image.Image], glyphs: torch.Tensor | None = None
                ) -> list[Image.Image]:
        """PIL images (one size) to `factor` x their size (`glyphs` at that size)."""
        from components.models.images import from_pil, to_pil

        return to_pil(self.eval()(from_pil(images), glyphs).clamp(-1, 1))


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
    # one saved before upscaler.glyphs existed reads no glyph maps
    cfg = UpscalerCfg(**{"glyphs": False} | json.loads((model_dir / CONFIG).read_text())[
        "upscaler"])
    model = Upscaler.from_config(cfg)
    model.load_state_dict(load_file(str(model_dir / WEIGHTS)))
    return model.eval()
