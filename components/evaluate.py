"""Measure the trained generator the same way every time, on the val split, fixed seeds.

Prompt adherence runs the data's own auto-labeller (components.labels) on generated
images: a prompt asking for a red background should give an image that the labeller
calls red.
"""

from __future__ import annotations

import time

import torch
from PIL import Image
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from components.config import Params
from components.contracts import CAPTIONS, EVAL_DIR, UNET_DIR, VAE_DIR, atomic_dir, read_table
from components.generator import Generator
from components.labels import caption, label_background
from components.vae import image_grid, load_batch, load_vae


@torch.no_grad()
def vae_quality(params: Params, paths: list[str]) -> dict:
    vae = load_vae(VAE_DIR)
    x = load_batch(paths, vae.cfg.image_size)
    mean, _ = vae.encode(x)
    rec = vae.decode(mean).clamp(-1, 1)
    a, b = (rec + 1) / 2, (x + 1) / 2
    return {"vae_psnr": round(float(peak_signal_noise_ratio(a, b, data_range=1.0)), 3),
            "vae_ssim": round(float(structural_similarity_index_measure(a, b, data_range=1.0)),
                              4)}


def adherence_prompts(params: Params) -> list[tuple[str, str]]:
    """(expected colour, prompt) for every palette colour, in the captions' own words."""
    return [(c, caption({"saturation": "vivid", "background": c, "background_kind": "solid",
                         "layout": "centre", "text": "SALE"}, params.labels.caption_template))
            for c in params.brand.palette]


def evaluate(params: Params) -> dict:
    cfg = params.evaluate
    caps = read_table(CAPTIONS, "captions")
    val = caps[caps["split"] == "val"].head(64)
    if val.empty:
        val = caps.head(8)
    metrics = vae_quality(params, val["path"].tolist())

    gen = Generator.load(VAE_DIR, UNET_DIR, params.sampler)
    t0 = time.monotonic()
    n_images = 0

    per_colour: dict[str, float] = {}
    colour_rows = []
    for colour, prompt in adherence_prompts(params):
        ims = gen.generate([prompt] * cfg.adherence_per_colour, seed=cfg.seed)
        n_images += len(ims)
        got = [label_background(im, params.brand, params.labels)["background"] for im in ims]
        per_colour[colour] = sum(g == colour for g in got) / len(got)
        colour_rows.append(ims)
    metrics["prompt_adherence_background"] = round(
        sum(per_colour.values()) / len(per_colour), 4)
    metrics.update({f"adherence_{c}": round(v, 4) for c, v in per_colour.items()})

    n_seeds = 4
    prompt_rows = []
    for prompt in cfg.prompts:
        prompt_rows.append([gen.generate([prompt], seed=cfg.seed + s)[0] for s in range(n_seeds)])
        n_images += n_seeds
    real = val.head(8)
    fakes = gen.generate(real["caption"].tolist(), seed=cfg.seed)
    n_images += len(fakes)
    metrics["sample_images_per_s"] = round(n_images / (time.monotonic() - t0), 3)

    with atomic_dir(EVAL_DIR) as tmp:
        image_grid(prompt_rows).save(tmp / "samples.png")
        image_grid(colour_rows).save(tmp / "adherence.png")
        reals = [Image.open(p) for p in real["path"]]
        image_grid([reals, fakes]).save(tmp / "real_vs_generated.png")
        (tmp / "prompts.txt").write_text(
            "samples.png rows (4 seeds each):\n" + "\n".join(cfg.prompts) + "\n\n"
            "adherence.png rows:\n" + "\n".join(p for _, p in adherence_prompts(params))
            + "\n\nreal_vs_generated.png: top real val images, bottom generated from their "
            "captions:\n" + "\n".join(real["caption"]) + "\n")
    return metrics
