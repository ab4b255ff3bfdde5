"""Evaluation pieces on real generator images: the offline FD/KID feature space, a
user-supplied TorchScript extractor, diversity, and the self-contained report."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from components.config import Evaluate, load_params
from components.contracts import UserError
from components.ingest.synthetic import render
from components.judge.evaluate import diversity, labeller_agreement, real_and_generated
from components.judge.fidelity import (
    BUILTIN_ID,
    BrandFeatures,
    detail_ratio,
    distances,
    feature_extractor,
)
from components.judge.report import grouped, write_report

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture(scope="module")
def posters() -> list[Image.Image]:
    p = load_params(PARAMS)
    return [Image.open(io.BytesIO(render(i, 5, 64, p.brand, p.synthetic, p.labels)[0]))
            .convert("RGB") for i in range(48)]


def _cfg(**kw) -> Evaluate:
    return Evaluate(prompts=["x"], **kw)


def test_fd_is_zero_for_identical_sets_and_grows_with_corruption(posters) -> None:
    ext, ident = feature_extractor(_cfg())
    assert ident == BUILTIN_ID
    a, b = posters[:24], posters[24:]
    assert distances(a, a, ext)["fd"] == pytest.approx(0.0, abs=1e-6)
    clean = distances(a, b, ext)["fd"]
    blurred = [distances(a, [im.filter(ImageFilter.GaussianBlur(r)) for im in b], ext)["fd"]
               for r in (1, 2, 4)]
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(np.clip(np.asarray(im, np.float32)
                                     + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8))
             for im in b]
    assert clean < blurred[0] < blurred[1] < blurred[2]
    assert distances(a, noisy, ext)["fd"] > 2 * clean
    # KID: near 0 for two halves of one distribution, clearly above for a corruption
    assert distances(a, noisy, ext)["kid"] > distances(a, b, ext)["kid"] + 0.01


def test_fd_takes_images_of_several_formats(posters) -> None:
    """Banners beside posters (the extractor resizes each batch): the same mixed set
    against itself is 0; against its blurred copy it is not."""
    ext, _ = feature_extractor(_cfg())
    mixed = posters[:12] + [im.resize((128, 64)) for im in posters[12:24]]
    assert distances(mixed, mixed, ext)["fd"] == pytest.approx(0.0, abs=1e-6)
    assert distances(mixed, [im.filter(ImageFilter.GaussianBlur(2)) for im in mixed],
                     ext)["fd"] > 0.1


def test_real_and_generated_images_stay_paired_across_formats(tmp_path: Path) -> None:
    """Val rows of two formats, interleaved: made one format at a time, yet item i of the
    rows, the real images and the generated ones is the same row's (the labeller reads
    each real image's own background; the stand-in generator paints the caption's)."""
    import pandas as pd

    from components.models.buckets import nearest

    p = load_params(PARAMS)
    mixed = p.synthetic.model_copy(update={"formats": {"poster": 0.5, "banner": 0.5}})
    rows = []
    for i in range(10):
        data, truth = render(i, 3, 128, p.brand, mixed, p.labels, p.formats.buckets)
        (tmp_path / f"{i}.png").write_bytes(data)
        size = Image.open(tmp_path / f"{i}.png").size
        rows.append({"path": str(tmp_path / f"{i}.png"), "caption": truth.background,
                     "background": truth.background, **{f: "" for f in (
                         "background_kind", "gradient_to", "saturation", "layout",
                         "figure_size", "logo")},
                     "format": nearest(*size, p.formats.buckets)})
    rows = pd.DataFrame(rows)
    assert rows["format"].tolist() != sorted(rows["format"], key=rows["format"].tolist().index)

    class Painter:  # solid images of the colour the prompt names
        def generate(self, prompts, seed=0, width=None, height=None):
            return [Image.new("RGB", (width, height), p.brand.rgb()[c]) for c in prompts]

    sizes = {"poster": (64, 64), "banner": (96, 48)}
    out, real, fake = real_and_generated(Painter(), rows, sizes, 0)
    assert sorted(out["path"]) == sorted(rows["path"])
    for (_, row), a, b in zip(out.iterrows(), real, fake, strict=True):
        assert a.size == b.size == sizes[row["format"]]
        assert b.getpixel((0, 0)) == p.brand.rgb()[row["background"]]
    assert labeller_agreement(real, out, p)["labeller_agreement_background"] == 1.0


def test_builtin_features_are_fixed_and_finite(posters) -> None:
    x = torch.rand(3, 3, 64, 64)
    f = BrandFeatures()
    assert f(x).shape == (3, BrandFeatures.num_features)
    assert torch.equal(f(x), BrandFeatures()(x)) and torch.isfinite(f(x)).all()


class Pool(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_user_extractor_torchscript_and_export(tmp_path: Path, posters) -> None:
    torch.jit.script(Pool()).save(str(tmp_path / "pool.pt"))
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(Pool(), (torch.rand(2, 3, 32, 32),),
                                          dynamic_shapes={"x": {0: batch}}),
                      str(tmp_path / "pool.pt2"))
    for name, kind in [("pool.pt", "torchscript:"), ("pool.pt2", "export:")]:
        ext, ident = feature_extractor(_cfg(feature_extractor=str(tmp_path / name),
                                            feature_image_size=32))
        assert ident.startswith(kind)
        assert distances(posters[:10], posters[:10], ext)["fd"] == pytest.approx(0, abs=1e-6)
        assert distances(posters[:10], posters[10:20], ext)["fd"] > 1e-4

    with pytest.raises(UserError, match="not found"):
        feature_extractor(_cfg(feature_extractor=str(tmp_path / "missing.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a loadable torchscript"):
        feature_extractor(_cfg(feature_extractor=str(tmp_path / "junk.pt")))


def test_fd_needs_two_images_each(posters) -> None:
    ext, _ = feature_extractor(_cfg())
    with pytest.raises(UserError, match="at least 2"):
        distances(posters[:1], posters[:5], ext)


def test_diversity_is_zero_for_identical_seeds(posters) -> None:
    assert diversity([[posters[0]] * 3, [posters[1]] * 3]) == 0.0
    assert diversity([posters[:4]]) > 0.05


def test_detail_ratio_tells_generated_detail_from_an_upscale() -> None:
    """Known answers: a 64 px image resized to 800 has nothing finer than 64 px (about
    1.0); the same poster drawn at 256 px and resized has several times that; the
    squeeze follows the short side, so a banner is judged like a square."""
    p = load_params(PARAMS)
    poster = Image.open(io.BytesIO(render(3, 5, 256, p.brand, p.synthetic, p.labels)[0]))
    sharp = poster.convert("RGB").resize((800, 800), Image.Resampling.LANCZOS)
    upscaled = sharp.resize((64, 64), Image.Resampling.LANCZOS).resize(
        (800, 800), Image.Resampling.LANCZOS)
    assert detail_ratio(upscaled) == pytest.approx(1.0, abs=0.15)
    assert detail_ratio(sharp) > 4 * detail_ratio(upscaled)
    banner = sharp.resize((128, 64), Image.Resampling.LANCZOS).resize(
        (800, 400), Image.Resampling.LANCZOS)
    assert detail_ratio(banner) < 1.6  # twice 64 px across, 64 px down: little above 1


def test_report_is_self_contained(tmp_path: Path, posters) -> None:
    grid = tmp_path / "g.png"
    posters[0].save(grid)
    metrics = {"vae_psnr": 24.5, "fd": 1.25, "prompt_adherence_background": 0.9,
               "adherence_red": 1.0, "text_recall": 0.3, "sample_images_per_s": 5.0,
               "feature_space": BUILTIN_ID, "odd": 1}
    assert [t for t, _ in grouped(metrics)][-1] == "other"
    out = tmp_path / "report.html"
    write_report(out, metrics, [(grid, "a <caption>")], cases=[{"prompt": "red poster"}],
                 real_captions=["vivid red"])
    html = out.read_text()
    assert "data:image/png;base64," in html and "a &lt;caption&gt;" in html
    assert "sample_images_per_s" not in html  # a timing: the report reproduces exactly
    assert not re.search(r"(src|href)=\"https?:", html)  # nothing fetched when opened


def test_free_prompts_are_scored_on_the_fields_each_asks_for() -> None:
    """A stand-in generator paints every image solid red: the red prompt gets its
    background, the blue one does not (background 0.5); no logo is drawn, and the one
    prompt that asks for none gets it (logo 1.0); a field nobody asks for is not reported."""
    from components.judge.evaluate import free_adherence

    p = load_params(PARAMS, overrides=[
        'evaluate.free_prompts=[{prompt: "a red one", background: red}, '
        '{prompt: "blue, no logo", background: blue, logo: "no"}]',
        "evaluate.adherence_seeds=2"])

    class Red:
        def generate(self, prompts, seed=0, width=64, height=64):
            return [Image.new("RGB", (64, 64), p.brand.rgb()["red"]) for _ in prompts]

        def read_prompts(self, prompts):  # the normaliser rewrites the blue one
            return [q.replace("blue, no logo", "blue, logo no.") for q in prompts]

    metrics, rows, read = free_adherence(Red(), p)
    assert metrics == {"prompt_adherence_free_background": 0.5,
                       "prompt_adherence_free_logo": 1.0, "free_prompts_rewritten": 1}
    assert [len(r) for r in rows] == [2, 2] and read[1] == "blue, logo no."
    bad = load_params(PARAMS, overrides=[
        'evaluate.free_prompts=[{prompt: "mauve", background: mauve}]'])
    with pytest.raises(UserError, match="mauve"):
        free_adherence(Red(), bad)
