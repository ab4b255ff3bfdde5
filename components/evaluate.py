"""Measure the trained generator the same way every time, on the val split, fixed seeds.

Prompt adherence runs the data's own auto-labeller (components.labels) on generated
images: a prompt asking for a red background should give an image that the labeller
calls red.
"""

from __future__ import annotations

import time

import pandas as pd
import torch
from PIL import Image
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from components.config import Params
from components.contracts import CAPTIONS, EVAL_DIR, UNET_DIR, VAE_DIR, atomic_dir, read_table
from components.generator import Generator
from components.labels import LAYOUTS, caption, label_background
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


ADHERENCE_FIELDS = ["background", "background_kind", "saturation"]


def adherence_cases(params: Params) -> list[dict]:
    """Held-out prompts in the captions' own words: every palette colour, solid and
    gradient, saturation and layout cycling through their values, so most combinations
    are not the ones of any one training image."""
    levels = list(params.labels.saturation_levels)
    cases = []
    for i, colour in enumerate(params.brand.palette):
        for j, kind in enumerate(["solid", "gradient"]):
            row = {"background": colour, "background_kind": kind,
                   "saturation": levels[(i + j) % len(levels)],
                   "layout": LAYOUTS[(2 * i + j) % len(LAYOUTS)], "text": "SALE"}
            cases.append({**row, "prompt": caption(row, params.labels.caption_template)})
    return cases


def prompt_adherence(gen: Generator, params: Params, train: pd.DataFrame
                     ) -> tuple[dict, list[list[Image.Image]]]:
    """Share of generated images whose auto-label equals what the prompt asked, per
    field; also per colour, and on combinations that no training caption has."""
    cfg = params.evaluate
    seen = set(map(tuple, train[ADHERENCE_FIELDS + ["layout"]].to_numpy().tolist()))
    hits: dict[str, list[bool]] = {}
    rows = []
    for case in adherence_cases(params):
        ims = gen.generate([case["prompt"]] * cfg.adherence_seeds, seed=cfg.seed)
        rows.append(ims)
        unseen = tuple(case[f] for f in ADHERENCE_FIELDS + ["layout"]) not in seen
        for im in ims:
            got = label_background(im, params.brand, params.labels)
            for f in ADHERENCE_FIELDS:
                ok = got[f] == case[f]
                hits.setdefault(f, []).append(ok)
                if unseen:
                    hits.setdefault(f"unseen_{f}", []).append(ok)
            hits.setdefault(f"colour_{case['background']}", []).append(
                got["background"] == case["background"])

    def share(v: list[bool]) -> float:
        return round(sum(v) / len(v), 4)

    metrics = {f"prompt_adherence_{f}": share(hits[f]) for f in ADHERENCE_FIELDS}
    metrics |= {f"prompt_adherence_{k}": share(v) for k, v in hits.items()
                if k.startswith("unseen_")}
    metrics |= {f"adherence_{k.removeprefix('colour_')}": share(v) for k, v in hits.items()
                if k.startswith("colour_")}
    metrics["adherence_images"] = len(hits["background"])
    return metrics, rows


def evaluate(params: Params) -> dict:
    cfg = params.evaluate
    caps = read_table(CAPTIONS, "captions")
    val = caps[caps["split"] == "val"].head(64)
    if val.empty:
        val = caps.head(8)
    metrics = vae_quality(params, val["path"].tolist())

    gen = Generator.load(VAE_DIR, UNET_DIR, params.sampler)
    t0 = time.monotonic()
    adherence, colour_rows = prompt_adherence(gen, params, caps[caps["split"] == "train"])
    metrics |= adherence
    n_images = adherence["adherence_images"]

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
            "adherence.png rows:\n" + "\n".join(c["prompt"] for c in adherence_cases(params))
            + "\n\nreal_vs_generated.png: top real val images, bottom generated from their "
            "captions:\n" + "\n".join(real["caption"]) + "\n")
    return metrics
