"""The upscaler stage: teach the upscaler (models/upscaler.py) to turn what the VAE draws
at the native size into the collection's own images at `factor` x that size, so a large
output gets edges and strokes instead of an interpolated blur. Inputs are the train
images through the VAE (what generation decodes, blur included); targets the same images
read at the larger size. Trains on random crops; validates against a Lanczos resize.

With upscaler.glyphs each target also comes with its glyph map at that size (the captions'
text boxes): half the inputs get their text areas smudged (`smudged`), as diffusion samples
draw them, so that the letters' shapes are taken from the map; a tenth of the crops get
another crop's map, so that where the sample has no ink no letters are drawn."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio

from components.config import Params
from components.config import Upscaler as UpscalerCfg
from components.contracts import (
    UPSCALER_DIR,
    VAE_DIR,
    atomic_dir,
    progress,
    results_only,
    split_sets,
    write_json,
)
from components.labelling import text_boxes
from components.models.buckets import draw, format_sizes, groups
from components.models.glyphs import glyph_batch
from components.models.images import from_pil, load_batch, to_pil
from components.models.upscaler import Upscaler, save_upscaler
from components.models.vae import load_vae
from components.training.runtime import Runtime, adamw, cosine_with_warmup, runtime, train_step

VAL_IMAGES = 32


# (the images through the VAE, their targets at factor x the size, the targets' glyph maps
# (None without text))
Pair = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
Text = tuple[list[list[dict]], str] | None  # each image's text lines, the font's path


@torch.no_grad()
def pairs(vae, paths: list[str], size: tuple[int, int], factor: int, rt: Runtime,
          text: Text = None, batch: int = 64) -> Pair:
    """(the images through the VAE at size (w, h), float in [-1, 1]; the images at
    factor x that size, uint8 to keep a large collection in memory; with `text` (each
    image's text lines, the font) their glyph maps at that size, uint8)."""
    (w, h), f = size, factor
    ins = [torch.zeros(0, 3, h, w)]  # no paths (an empty val split): no pairs
    outs = [torch.zeros(0, 3, h * f, w * f, dtype=torch.uint8)]
    maps = [torch.zeros(0, 1, h * f, w * f, dtype=torch.uint8)]
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        with rt.autocast():
            rec = vae.decode(vae.encode(load_batch(chunk, size).to(rt.device))[0])
        ins.append(rec.float().clamp(-1, 1).cpu())
        big = load_batch(chunk, (w * f, h * f))
        outs.append(((big + 1) * 127.5).round().to(torch.uint8))
        if text:
            maps.append((glyph_batch(text[0][i : i + batch], w * f, h * f, text[1]) * 255)
                        .round().to(torch.uint8))
    return torch.cat(ins), torch.cat(outs), torch.cat(maps) if text else None


def format_pairs(vae, paths: list[str], formats: list[str], sizes: dict, factor: int,
                 rt: Runtime, text: Text = None) -> list[Pair]:
    """`pairs` of each format (aspect bucket) at its size."""
    return [pairs(vae, [paths[i] for i in rows.tolist()], sizes[f], factor, rt,
                  text and ([text[0][i] for i in rows.tolist()], text[1]))
            for f, rows in groups(formats).items()]


def stored_size(path: str) -> tuple[int, int]:
    """An image file's (width, height) as displayed (EXIF rotation applied), from its
    header."""
    with Image.open(path) as im:
        w, h = im.size
        return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def large_enough(paths: list[str], formats: list[str], sizes: dict, factor: int
                 ) -> list[int]:
    """Indices of the images stored at least factor x their format's size: the others'
    targets would be upsampled, teaching blur."""
    return [i for i, (p, f) in enumerate(zip(paths, formats, strict=True))
            if all(s >= factor * n for s, n in zip(stored_size(p), sizes[f], strict=True))]


def psnr(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """On [-1, 1] images (one tensor per format), as PSNR on [0, 1] over all of their
    pixels (torchmetrics)."""
    a, b = (torch.cat([t.float().flatten() for t in ts]) for ts in (a, b))
    return float(peak_signal_noise_ratio((a + 1) / 2, (b + 1) / 2, data_range=1.0))


def lanczos(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The interpolating baseline: each image resized factor x (Lanczos)."""
    return from_pil([im.resize((im.width * factor, im.height * factor),
                               Image.Resampling.LANCZOS) for im in to_pil(images)])


def smudged(x: torch.Tensor, glyphs: torch.Tensor, factor: int, which: torch.Tensor
            ) -> torch.Tensor:
    """x with its text areas (where the glyph map, at factor x its size, has ink, grown by
    a pixel) blurred (5x5 mean) in the images `which` selects: what a diffusion sample
    gives the upscaler there (ink in the right place and colour, letters not quite), so
    that it learns to take the letters' shapes from the map."""
    area = F.max_pool2d((F.avg_pool2d(glyphs, factor) > 0).to(x.dtype), 3, 1, 1)
    area = area * which.view(-1, 1, 1, 1).to(x.device, x.dtype)
    return x + area * (F.avg_pool2d(x, 5, 1, 2, count_include_pad=False) - x)


def fit(cfg: UpscalerCfg, rt: Runtime, data: list[Pair]) -> tuple[Upscaler, float]:
    """An upscaler trained to turn each x (N, 3, h, w in [-1, 1]) into its y (uint8, factor
    x the size) on random crops of cfg.crop input pixels, each batch from one format;
    returns it (eval mode) and the last loss."""
    f = cfg.factor
    torch.manual_seed(cfg.seed)
    model = Upscaler.from_config(cfg).to(rt.device).train()
    params = list(model.parameters())
    opt = adamw(params, cfg.lr, 0.0)
    sched = cosine_with_warmup(opt, min(100, cfg.steps // 10), cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss = torch.zeros(())
    for _ in progress(range(cfg.steps), desc="upscaler", unit="step"):
        x, y, g = data[draw([len(x) for x, _, _ in data], gen)]
        (h, w), idx = x.shape[-2:], torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        ch, cw = min(cfg.crop, h), min(cfg.crop, w)
        i, j = (torch.randint(0, h - ch + 1, (2,), generator=gen).tolist() if h == w else
                [int(torch.randint(0, n - c + 1, (1,), generator=gen)) for n, c in
                 ((h, ch), (w, cw))])
        xb = x[idx, :, i : i + ch, j : j + cw].to(rt.device)
        yb = y[idx, :, i * f : (i + ch) * f, j * f : (j + cw) * f].to(rt.device)
        yb = yb.float() / 127.5 - 1
        gb = None
        if cfg.glyphs and g is not None:
            gb = g[idx, :, i * f : (i + ch) * f, j * f : (j + cw) * f].to(rt.device).float() / 255
            xb = smudged(xb, gb, f, torch.rand(len(xb), generator=gen) < 0.5)
            # a tenth get another crop's map: letters only where the sample has ink
            other = (torch.rand(len(xb), generator=gen) < 0.1).to(rt.device)
            gb = torch.where(other.view(-1, 1, 1, 1), gb.roll(1, 0), gb)
        loss = train_step(rt, lambda xb=xb, yb=yb, gb=gb: F.l1_loss(model(xb, gb).float(), yb),
                          opt, sched, params)
    return model.eval(), float(loss.detach())


def train_upscaler(cfg: UpscalerCfg, vae_dir: Path, train: list[str], val: list[str],
                   out_dir: Path, formats: tuple[list[str], list[str]] | None = None,
                   buckets: dict | None = None,
                   text: tuple[list[list[dict]], list[list[dict]]] | None = None,
                   font_path: str | None = None) -> dict:
    """Train on `train`, compare with Lanczos on the first VAL_IMAGES of `val`; `formats`:
    their aspect buckets (params formats.buckets: `buckets`), default all square; `text`:
    their text lines, drawn in `font_path` as the glyph maps of an upscaler that reads them
    (cfg.glyphs; default: none has text)."""
    t0 = time.monotonic()
    rt = runtime(cfg.device, cfg.bf16, "upscaler")
    vae = load_vae(vae_dir).to(rt.device)
    native, f = vae.cfg.image_size, cfg.factor
    if text is None and cfg.glyphs:
        text = ([[]] * len(train), [[]] * len(val))
    sizes = format_sizes(buckets or {"square": (1, 1)}, vae.cfg)
    train_f, val_f = formats or ([next(iter(sizes))] * len(train),
                                 [next(iter(sizes))] * len(val))
    keep = large_enough(train, train_f, sizes, f)
    if not keep:
        print(f"upscaler: no train image is stored at {f}x the native size; training on "
              "upsampled targets (it learns little): add larger images or lower "
              "upscaler.factor", file=sys.stderr)
        keep = list(range(len(train)))
    data = format_pairs(vae, [train[i] for i in keep], [train_f[i] for i in keep], sizes,
                        f, rt, text and ([text[0][i] for i in keep], font_path))
    held = format_pairs(vae, val[:VAL_IMAGES], val_f[:VAL_IMAGES], sizes, f, rt,
                        text and (text[1][:VAL_IMAGES], font_path))
    model, loss = fit(cfg, rt, data)
    seconds = time.monotonic() - t0
    metrics: dict = {}
    if held:
        with torch.no_grad(), rt.autocast():
            up = [model(vx.to(rt.device), None if vg is None or not cfg.glyphs else
                        vg.to(rt.device).float() / 255).float().clamp(-1, 1).cpu()
                  for vx, _, vg in held]
        truth = [vy.float() / 127.5 - 1 for _, vy, _ in held]
        metrics = {"val_psnr": round(psnr(up, truth), 3),
                   "val_psnr_lanczos": round(psnr([lanczos(vx, f) for vx, _, _ in held],
                                                  truth), 3)}
    metrics |= {"final_loss": round(loss, 5), "steps": cfg.steps, "factor": f,
                "native_size": native, "output_size": native * f, "train_images": len(keep),
                "train_images_too_small": len(train) - len(keep),
                "precision": rt.precision, "device": rt.device.type,
                "seconds": round(seconds, 1)}
    with atomic_dir(out_dir) as tmp:
        save_upscaler(model.cpu(), cfg, tmp)
        write_json(tmp / "metrics.json", results_only(metrics))
    return metrics


def upscaler(params: Params) -> dict:
    """The stage: train on the train split, compare with Lanczos on val."""
    train, val, formats = split_sets()
    return train_upscaler(params.upscaler, VAE_DIR, train, val, UPSCALER_DIR, formats,
                          params.formats.buckets, (text_boxes.of_images(train, val)
                          if params.upscaler.glyphs else None), params.brand.font)
