"""Profiles: named sets of --set values (profiles/NAME.yaml) that `run` writes into
params.yaml like --set, and every shipped profile validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import load_params
from components.contracts import UserError
from components.overrides import profile_sets, write_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_a_profile_is_its_sets_in_order_and_set_wins(tmp_path: Path) -> None:
    (tmp_path / "big.yaml").write_text("vae.image_size: 128\nunet.full_res_context: false\n"
                                       "evaluate.text_unseen: [pizza, 'yoga mat']\n")
    sets = profile_sets(["big"], tmp_path)
    assert sets == ["vae.image_size=128", "unet.full_res_context=false",
                    'evaluate.text_unseen=["pizza", "yoga mat"]']
    params_file = tmp_path / "params.yaml"
    params_file.write_text((ROOT / "params.yaml").read_text())
    write_overrides(params_file, sets + ["vae.image_size=96"])  # --set after the profile
    p = load_params(params_file)
    assert p.vae.image_size == 96 and p.unet.full_res_context is False
    assert p.evaluate.text_unseen == ["pizza", "yoga mat"]


def test_an_unknown_profile_names_the_ones_there(tmp_path: Path) -> None:
    (tmp_path / "gpu.yaml").write_text("unet.steps: 10\n")
    with pytest.raises(UserError, match="profile 'gpus'.*profiles here: gpu"):
        profile_sets(["gpus"], tmp_path)
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(UserError, match="dotted keys"):
        profile_sets(["bad"], tmp_path)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml")))
def test_every_shipped_profile_validates(name: str) -> None:
    """Its values pass validation and the U-Net it describes can be built (the latent
    size suits unet.outer_feat)."""
    from components.models.unet import ContextUnet

    sets = profile_sets([name], ROOT / "profiles")
    assert sets
    p = load_params(ROOT / "params.yaml", sets)
    side = p.vae.image_size // 2 ** (len(p.vae.channel_mult) - 1)
    ContextUnet.from_config(p.unet, p.vae.latent_channels, 384, side,
                            glyph_down=2 ** (len(p.vae.channel_mult) - 1))
