"""Known-answer tests: a number that is computed wrong (a hit counted for every image, a
text compared with itself) changes the answer, so the test goes red (issue 26)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_models import tiny_cache_and_vae

from components.config import Diffusion, Unet, load_params
from components.judge.evaluate import ADHERENCE_FIELDS, adherence_cases, prompt_adherence
from components.training.unet import train_unet

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


class OneColour:
    """A stand-in generator: solid images of one palette colour whatever the prompt."""

    def __init__(self, rgb: tuple[int, int, int], size: int = 64):
        self.rgb, self.native_size, self.prompts = rgb, size, []

    def generate(self, prompts: list[str], seed: int = 0, **_kw) -> list[Image.Image]:
        self.prompts += prompts
        return [Image.new("RGB", (self.native_size,) * 2, self.rgb) for _ in prompts]


def test_prompt_adherence_scores_a_one_colour_generator_by_the_cases_asking_for_it() -> None:
    p = load_params(PARAMS)
    p = p.model_copy(update={"evaluate": p.evaluate.model_copy(update={"adherence_seeds": 2})})
    colour = next(iter(p.brand.palette))
    gen = OneColour(p.brand.rgb()[colour])
    cases = adherence_cases(p)
    # the training captions hold exactly the first case: it is seen, the others are not
    train = pd.DataFrame([{f: cases[0][f] for f in ADHERENCE_FIELDS}])
    metrics, rows = prompt_adherence(gen, p, train)

    n = len(cases)
    # each case adherence_seeds times (in batches: evaluate.generate_many)
    assert gen.prompts == [c["prompt"] for c in cases for _ in range(2)]
    assert [len(r) for r in rows] == [2] * n
    assert metrics["adherence_images"] == 2 * n
    want = sum(c["background"] == colour for c in cases) / n
    assert 0 < want < 1
    assert metrics["prompt_adherence_background"] == pytest.approx(round(want, 4))
    solid = sum(c["background_kind"] == "solid" for c in cases) / n
    assert metrics["prompt_adherence_background_kind"] == pytest.approx(round(solid, 4))
    # per colour: all hits for the one colour drawn, none for any other
    assert metrics[f"adherence_{colour}"] == 1.0
    for other in p.brand.palette:
        if other != colour:
            assert metrics[f"adherence_{other}"] == 0.0
    # the unseen cases are every case but the first
    unseen = sum(c["background"] == colour for c in cases[1:]) / (n - 1)
    assert metrics["prompt_adherence_unseen_background"] == pytest.approx(round(unseen, 4))


def _reencoded(cache: Path) -> None:
    """The cache as the latents stage rewrites it after the VAE changed: other latents,
    and every row's key (which hashes the VAE's weights) new."""
    mean = np.load(cache / "mean_poster.npy")
    np.save(cache / "mean_poster.npy", (mean * -0.5 + 1.0).astype(np.float32))
    index = pd.read_parquet(cache / "index.parquet")
    index["key"] = "new-" + index["key"]
    index.to_parquet(cache / "index.parquet")


def _rescaled(cache: Path) -> None:
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps(meta | {"scale_factor": 0.5}))


@pytest.mark.parametrize("change", [_reencoded, _rescaled])
def test_unet_does_not_resume_a_checkpoint_of_other_latents(tmp_path: Path, monkeypatch,
                                                            change) -> None:
    import components.models.diffusion as diffusion

    monkeypatch.chdir(tmp_path)
    cache = tiny_cache_and_vae(tmp_path)
    cfg = Unet(n_feat=8, steps=30, batch_size=4, warmup=5, bf16=False, checkpoint_every=10)
    args = (Diffusion(timesteps=50), cache)
    ckpts = tmp_path / ".cache" / "checkpoints" / "unet"

    def interrupted() -> None:
        with monkeypatch.context() as m:
            calls = {"n": 0}
            real = diffusion.training_loss

            def loss(*a, **kw):
                calls["n"] += 1
                if calls["n"] == 15:
                    raise KeyboardInterrupt  # a user's Ctrl-C after the step-10 checkpoint
                return real(*a, **kw)

            m.setattr(diffusion, "training_loss", loss)
            with pytest.raises(KeyboardInterrupt):
                train_unet(cfg, *args, tmp_path / "unet", "stub", tmp_path / "vae")
        assert len(list(ckpts.glob("*.pt"))) == 1

    interrupted()  # the same latents do resume: the checkpoint is usable...
    assert train_unet(cfg, *args, tmp_path / "unet", "stub", tmp_path / "vae")[
        "resumed_at"] == 10
    interrupted()
    change(cache)  # ...other latents do not
    assert train_unet(cfg, *args, tmp_path / "unet", "stub", tmp_path / "vae")[
        "resumed_at"] == 0
