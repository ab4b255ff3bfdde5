"""Measure the trained generator the same way every time, on the val split, fixed seeds.

Prompt adherence runs the data's own auto-labeller (components.labelling.labels) on generated
images: a prompt asking for a red background should give an image that the labeller
calls red. Fidelity (FD/KID, components.judge.fidelity), text recall (Tesseract on generated
images) and sampling speed compare val images with images generated from their captions.
Everything lands in reports/eval: metrics.json (DVC metrics), grids/*.png, report.html.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from components.config import Params
from components.config import Sampler as SamplerCfg
from components.contracts import (
    CAPTIONS,
    EVAL_GRIDS,
    EVAL_REPORT,
    UNET_DIR,
    UPSCALER_DIR,
    VAE_DIR,
    UserError,
    atomic_dir,
    open_rgb,
    progress,
    read_table,
    settings_hash,
)
from components.judge.fidelity import detail_ratio, distances, feature_extractor, to_tensor
from components.judge.report import training_curves, write_report
from components.judge.text import text_metrics
from components.labelling.captions import caption
from components.labelling.labeller import (
    FIGURE_SIZES,
    LAYOUTS,
    auto_labels,
    find_brand_logo,
    label_system,
    segment,
    text_block,
)
from components.models.buckets import format_sizes, nearest
from components.models.generator import Generator
from components.models.images import image_grid, load_batch, to_pil
from components.models.vae import load_vae


@torch.no_grad()
def vae_quality(vae_dir: Path, rows: pd.DataFrame, params: Params) -> dict:
    """PSNR and SSIM of the reconstructions of val images, and the labeller's agreement with
    their captions on the reconstructions: what prompt adherence can reach through this VAE
    (a colour the decoder shifts, or text it blurs past reading, caps it)."""
    vae = load_vae(vae_dir)
    sizes = format_sizes(params.formats.buckets, vae.cfg)
    rows, a, b, ssim, shown = by_format(rows), [], [], [], []
    for f, group in rows.groupby("format", sort=False):  # each at its format's size
        x = load_batch(group["path"].tolist(), sizes[f])
        rec = vae.decode(vae.encode(x)[0]).clamp(-1, 1)
        a.append((rec.flatten() + 1) / 2)
        b.append((x.flatten() + 1) / 2)
        ssim.append(structural_similarity_index_measure((rec + 1) / 2, (x + 1) / 2,
                                                        data_range=1.0, reduction="none"))
        shown += to_pil(rec)
    agreement = labeller_agreement(shown, rows, params)
    return {"vae_psnr": round(float(peak_signal_noise_ratio(torch.cat(a), torch.cat(b),
                                                            data_range=1.0)), 3),
            "vae_ssim": round(float(torch.cat(ssim).mean()), 4)} | {
                f"vae_{k}": v for k, v in agreement.items()}


ADHERENCE_FIELDS = ["background", "background_kind", "gradient_to", "saturation", "layout",
                    "figure_size", "logo"]


def adherence_cases(params: Params, width: int = 1, height: int = 1) -> list[dict]:
    """Held-out prompts in the captions' own words: every palette colour, solid and
    gradient, with saturation, layout, figure size and logo cycling through their values,
    so most combinations are not the ones of any one training image; the format the one
    nearest width:height (default square)."""
    fmt = nearest(width, height, params.formats.buckets)
    levels = list(params.labels.saturation_levels)
    colours = list(params.brand.palette)
    cases = []
    for i, colour in enumerate(colours):
        for j, kind in enumerate(["solid", "gradient"]):
            k = 2 * i + j
            to = colours[(i + 1 + k % (len(colours) - 1)) % len(colours)]
            row = {"background": colour, "background_kind": kind,
                   "gradient_to": to if kind == "gradient" else "none",
                   "saturation": levels[(i + j) % len(levels)],
                   "layout": LAYOUTS[k % len(LAYOUTS)],
                   "figure_size": FIGURE_SIZES[k % len(FIGURE_SIZES)],
                   "logo": ["no", "yes"][(k // 2) % 2] if params.brand.logos else "no",
                   "text": "SALE", "format": fmt}
            cases.append({**row, "prompt": caption(row, params.labels.caption_template)})
    return cases


def prompt_adherence(gen: Generator, params: Params, train: pd.DataFrame
                     ) -> tuple[dict, list[list[Image.Image]]]:
    """Share of generated images whose auto-label equals what the prompt asked, per
    field; also per colour, and on combinations that no training caption has."""
    cfg = params.evaluate
    seen = set(map(tuple, train[ADHERENCE_FIELDS].to_numpy().tolist()))
    hits: dict[str, list[bool]] = {}
    cases = adherence_cases(params)
    rows = generate_many(gen, [c["prompt"] for c in cases], cfg.seed, cfg.adherence_seeds)
    for case, ims in zip(cases, rows, strict=True):
        unseen = tuple(case[f] for f in ADHERENCE_FIELDS) not in seen
        for im in ims:
            got = auto_labels(im, [], params.brand, params.labels)
            for f in ADHERENCE_FIELDS:
                ok = got[f] == case[f]
                hits.setdefault(f, []).append(ok)
                if unseen:
                    hits.setdefault(f"unseen_{f}", []).append(ok)
            hits.setdefault(f"colour_{case['background']}", []).append(
                got["background"] == case["background"])

    metrics = {f"prompt_adherence_{f}": _share(hits[f]) for f in ADHERENCE_FIELDS}
    metrics |= {f"prompt_adherence_{k}": _share(v) for k, v in hits.items()
                if k.startswith("unseen_")}
    metrics |= {f"adherence_{k.removeprefix('colour_')}": _share(v) for k, v in hits.items()
                if k.startswith("colour_")}
    metrics["adherence_images"] = len(hits["background"])
    return metrics, rows


def _share(v: list[bool]) -> float:
    return round(sum(v) / len(v), 4)


def free_cases(params: Params) -> list[dict]:
    """evaluate.free_prompts, each checked: a prompt and label values of the label system."""
    system = label_system(params)
    for case in params.evaluate.free_prompts:
        bad = {k: v for k, v in case.items() if k != "prompt" and v not in system.get(k, [])}
        if "prompt" not in case or bad or len(case) < 2:
            raise UserError(f"evaluate.free_prompts: {case!r} needs a prompt and at least one "
                            f"label field with an allowed value (not {bad}); fields and "
                            f"values: {system}")
    return params.evaluate.free_prompts


def free_adherence(gen: Generator, params: Params
                   ) -> tuple[dict, list[list[Image.Image]], list[str]]:
    """Adherence to prompts in a user's own words (evaluate.free_prompts), per label field
    a prompt asks for: prompt_adherence_free_<field>, beside the template prompts'; how
    many of them the prompt normaliser rewrote (sampler.normalise); the images; and each
    prompt as the generator read it."""
    cfg, cases = params.evaluate, free_cases(params)
    hits: dict[str, list[bool]] = {}
    rows = generate_many(gen, [c["prompt"] for c in cases], cfg.seed, cfg.adherence_seeds)
    for case, ims in zip(cases, rows, strict=True):
        for im in ims:
            got = auto_labels(im, [], params.brand, params.labels)
            for f in case.keys() - {"prompt"}:
                hits.setdefault(f, []).append(got[f] == case[f])
    read = gen.read_prompts([c["prompt"] for c in cases])
    rewritten = sum(r != c["prompt"] for c, r in zip(cases, read, strict=True))
    return {**{f"prompt_adherence_free_{f}": _share(v) for f, v in sorted(hits.items())},
            "free_prompts_rewritten": rewritten}, rows, read


FORMATS = {"banner": (800, 400), "story": (450, 800)}  # output sizes measured besides square


def block_aspect(im: Image.Image, params: Params) -> float | None:
    """The text block's width over its height in pixels (labeller.text_block, the logo
    left out); None when no block is found."""
    seg = segment(im)
    _found, _conf, logo_box = find_brand_logo(im, seg, params.brand.logos,
                                             params.labels)
    b = text_block(seg, logo_box)
    return None if b is None else (b[2] - b[0]) * im.width / ((b[3] - b[1]) * im.height)


def format_adherence(gen: Generator, params: Params) -> tuple[dict, list[list[Image.Image]]]:
    """The held-out adherence prompts (one seed each) as banners and stories, delivered at
    that size: background and layout adherence (labelled at the size they were sampled
    at, as square outputs are at the native size), detail ratio, and the text block's
    shape against the same prompt's square output (median of the aspect ratios: 1.0 =
    not stretched; a stretched square would give the format's own aspect); 8 of each for
    the report."""
    cases = adherence_cases(params)
    square = [block_aspect(im, params) for im in gen.generate([c["prompt"] for c in cases],
                                                             seed=params.evaluate.seed)]
    metrics, rows = {}, []
    for name, (w, h) in FORMATS.items():
        prompts = [c["prompt"] for c in adherence_cases(params, w, h)]  # naming the format
        ims = gen.generate(prompts, seed=params.evaluate.seed, width=w, height=h)
        small = [im.resize(gen.sample_size(w, h), Image.Resampling.LANCZOS) for im in ims]
        got = [auto_labels(im, [], params.brand, params.labels) for im in small]
        for f in ("background", "layout"):
            metrics[f"format_{name}_{f}"] = round(float(np.mean(
                [g[f] == c[f] for g, c in zip(got, cases, strict=True)])), 4)
        metrics[f"format_{name}_detail_ratio"] = round(float(np.mean(
            [detail_ratio(im) for im in ims])), 3)
        ratios = [a / b for a, b in zip([block_aspect(im, params) for im in small], square,
                                        strict=True) if a and b]
        if ratios:
            metrics[f"format_{name}_text_aspect"] = round(float(np.median(ratios)), 3)
        rows.append(ims[:8])
    return metrics, rows


def labeller_agreement(real: list[Image.Image], rows: pd.DataFrame, params: Params) -> dict:
    """How far the adherence numbers can be trusted: the share of real val images, shrunk
    to the model's size, whose auto-label still equals their caption's label. A field the
    labeller cannot read at this size (a small logo at 64 px) cannot be scored reliably on
    generated images either."""
    got = [auto_labels(im, [], params.brand, params.labels) for im in real]
    return {f"labeller_agreement_{f}": round(float(np.mean(
        [g[f] == want for g, want in zip(got, rows[f], strict=True)])), 4)
        for f in ADHERENCE_FIELDS}


def diversity(rows: list[list[Image.Image]]) -> float:
    """Mean pairwise RMS pixel distance (0..1) between images of one prompt drawn with
    different seeds, averaged over prompts: 0 means every seed gives the same image."""
    dists = []
    for row in rows:
        x = to_tensor(row)
        for i, j in itertools.combinations(range(len(row)), 2):
            dists.append(float((x[i] - x[j]).square().mean().sqrt()))
    return round(float(np.mean(dists)), 4) if dists else 0.0


def _chunks(items: list, n: int) -> list[list]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def generate_many(gen: Generator, prompts: list[str], seed: int, per_prompt: int = 1,
                  **size) -> list[list[Image.Image]]:
    """`per_prompt` images of each prompt, sampled in batches of 32 (chunk k seeded
    seed + k: a batch samples faster than a call per prompt)."""
    wanted = [p for p in prompts for _ in range(per_prompt)]
    ims = [im for k, chunk in enumerate(_chunks(wanted, 32))
           for im in gen.generate(chunk, seed=seed + k, **size)]
    return _chunks(ims, per_prompt)


@dataclass
class Evaluation:
    metrics: dict
    real: list[Image.Image]
    fake: list[Image.Image]
    captions: list[str]
    prompt_rows: list[list[Image.Image]]
    colour_rows: list[list[Image.Image]]
    text_grid: Image.Image | None = None
    format_rows: list[list[Image.Image]] | None = None
    free_rows: list[list[Image.Image]] | None = None
    read_free: list[str] | None = None  # the free prompts as the generator read them


def eval_set(params: Params, val: pd.DataFrame, feature_space: str) -> str:
    """What makes two evaluations comparable: the same val images and captions, the same
    prompts, seeds and sizes, the same labeller and feature space (not the sampler: that is
    part of the model being measured)."""
    return settings_hash({"val": sorted(zip(val["id"], val["caption"], strict=True)),
                          "evaluate": params.evaluate.model_dump(mode="json"),
                          "brand": params.brand.model_dump(mode="json"),
                          "labels": params.labels.model_dump(mode="json"),
                          "ocr": params.ocr.model_dump(mode="json"),
                          "feature_space": feature_space})


def by_format(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows one format after another (in order of first appearance): the order their
    images are made and read in, one size at a time."""
    return pd.concat([group for _, group in rows.groupby("format", sort=False)])


def real_and_generated(gen: Generator, rows: pd.DataFrame, sizes: dict, seed: int
                       ) -> tuple[pd.DataFrame, list[Image.Image], list[Image.Image]]:
    """The rows (by_format), their images and images generated from their captions, each
    at its format's size: item i of each is row i's."""
    rows = by_format(rows)
    real, fake = [], []
    for f, group in rows.groupby("format", sort=False):
        real += to_pil(load_batch(group["path"].tolist(), sizes[f]))
        fake += [im for ims in generate_many(gen, group["caption"].tolist(), seed,
                                             width=sizes[f][0], height=sizes[f][1])
                 for im in ims]
    return rows, real, fake


def measure(params: Params, vae_dir: Path = VAE_DIR, unet_dir: Path = UNET_DIR,
            sampler: SamplerCfg | None = None, what: str = "evaluate",
            upscaler_dir: Path = UPSCALER_DIR) -> Evaluation:
    """Every metric of one generator (its VAE, U-Net and upscaler folders) on the current
    val data; register also calls this to re-measure the champion when the data changed."""
    cfg = params.evaluate
    bar = progress(total=5, desc=what, unit="part")
    caps = read_table(CAPTIONS, "captions")
    val = caps[caps["split"] == "val"]
    if len(val) < 2:
        raise UserError(f"evaluate: the val split has {len(val)} image(s), at least 2 are "
                        "needed; add images or raise labels.split.val")
    bar.set_postfix_str("VAE reconstruction")
    metrics: dict = vae_quality(vae_dir, val.head(64), params)
    bar.update()
    gen = Generator.load(vae_dir, unet_dir, sampler or params.sampler,
                         upscaler_dir=upscaler_dir)
    extractor, feature_space = feature_extractor(cfg)

    # real val images vs images generated from their captions: fidelity, speed, text
    bar.set_postfix_str("fidelity")
    sizes = format_sizes(params.formats.buckets, gen.vae.cfg)
    t0 = time.monotonic()
    pairs, real, fake = real_and_generated(gen, val.head(cfg.fid_images), sizes, cfg.seed)
    metrics["sample_images_per_s"] = round(len(fake) / (time.monotonic() - t0), 3)
    metrics |= {k: round(v, 5) for k, v in distances(real, fake, extractor, cfg.seed).items()}
    metrics["fid_images"] = len(fake)
    square = pairs["format"].map(lambda f: sizes[f][0] == sizes[f][1])  # at 800 x 800
    metrics |= detail(gen, pairs.loc[square, "caption"].tolist(),
                      pairs.loc[square, "path"].tolist(), cfg.seed)
    bar.update()
    bar.set_postfix_str("text")
    text, text_grid = text_metrics(gen, params, caps[caps["split"] == "train"], val)
    metrics |= text

    bar.update()
    bar.set_postfix_str("prompt adherence")
    adherence, colour_rows = prompt_adherence(gen, params, caps[caps["split"] == "train"])
    formats, format_rows = format_adherence(gen, params)
    free, free_rows, read_free = free_adherence(gen, params)
    metrics |= adherence | free | formats | labeller_agreement(real, pairs, params)
    bar.update()
    bar.set_postfix_str("sample grids")
    prompt_rows = generate_many(gen, cfg.prompts, cfg.seed, cfg.prompt_seeds)
    metrics["diversity"] = diversity(prompt_rows)
    metrics["feature_space"] = feature_space
    metrics["eval_set"] = eval_set(params, val, feature_space)
    bar.update()
    bar.close()
    return Evaluation(metrics, real, fake, pairs["caption"].tolist(), prompt_rows, colour_rows,
                      text_grid, format_rows, free_rows, read_free)


def detail(gen: Generator, captions: list[str], real_paths: list[str], seed: int,
           n: int = 16, side: int = 800) -> dict:
    """Detail ratio (fidelity.detail_ratio) of images `generate` delivers at side x side
    from the first `n` square val captions (the same samples as the fidelity part's), and
    of those val images from their stored files resized the same way (what the collection
    has): means over `n` of each."""
    real = [open_rgb(p).resize((side, side), Image.Resampling.LANCZOS) for p in real_paths[:n]]
    fake = gen.generate(captions[:n], seed=seed, width=side, height=side)
    return {f"detail_ratio_{side}": round(float(np.mean(
                [detail_ratio(im) for im in fake])), 3),
            f"detail_ratio_{side}_real": round(float(np.mean(
                [detail_ratio(im) for im in real])), 3)}


def evaluate(params: Params) -> dict:
    cfg = params.evaluate
    ev = measure(params)
    n_show = min(8, len(ev.real))
    grids = {"samples.png": (image_grid(ev.prompt_rows), "every fixed prompt (rows) with "
                             f"{cfg.prompt_seeds} seeds (columns)"),
             "adherence.png": (image_grid(ev.colour_rows), "held-out adherence prompts"),
             "real_vs_generated.png": (image_grid([ev.real[:n_show], ev.fake[:n_show]]),
                                       "top: real val images; bottom: generated from their "
                                       "captions")}
    if ev.format_rows:
        grids["formats.png"] = (image_grid(ev.format_rows, cell=192), "the first 8 held-out "
                                "adherence prompts as banners (800 x 400, top) and stories "
                                "(450 x 800), sampled in that aspect")
    if ev.free_rows:
        grids["free_prompts.png"] = (image_grid(ev.free_rows), "prompts in a user's own words "
                                     "(evaluate.free_prompts, rows in order)")
    if ev.text_grid is not None:
        grids["text.png"] = (ev.text_grid, "held-out text prompts: the requested text under "
                             "each image (training words and unseen words alternate)")
    for i, (prompt, row) in enumerate(zip(cfg.prompts, ev.prompt_rows, strict=True), 1):
        grids[f"prompt_{i:02d}.png"] = (image_grid([row], cell=192), prompt)
    curves = training_curves()
    if curves is not None:
        grids["training_curves.png"] = (curves, "training curves (models/*/loss.csv)")
    with atomic_dir(EVAL_GRIDS) as tmp:
        for name, (im, _caption) in grids.items():
            im.save(tmp / name)
    free = [c if r == c["prompt"] else {**c, "read as": r}  # as the normaliser read it
            for c, r in zip(cfg.free_prompts, ev.read_free or [], strict=True)]
    write_report(EVAL_REPORT, ev.metrics,
                 [(EVAL_GRIDS / n, c) for n, (_im, c) in grids.items()],
                 cases=adherence_cases(params), real_captions=ev.captions[:n_show],
                 free=free)
    return ev.metrics
