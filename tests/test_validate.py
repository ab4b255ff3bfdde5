"""Data tests: the validation suite quarantines bad images with reasons, keeps good ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from components.config import load_params
from components.contracts import (
    QUARANTINE,
    RAW_MANIFEST,
    VALID_MANIFEST,
    UserError,
    read_table,
)
from components.scrape import scrape
from components.validate import GX_RESULTS, GX_SUITE, validate

PARAMS = Path(__file__).parents[1] / "params.yaml"


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("CI", "1")
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    return tmp_path


def _collect(folder: Path):
    params = load_params(overrides=[f"scrape.sources=[{{kind: folder, path: {folder}, "
                                    "include: ['*']}]"])
    scrape(params)
    return params


def test_quarantines_bad_images_with_reasons(repo: Path) -> None:
    src = repo / "in"
    src.mkdir()
    Image.new("RGB", (64, 64), "red").save(src / "good.png")
    Image.new("RGB", (96, 64), "blue").save(src / "good.jpg")
    Image.new("RGB", (20, 20), "green").save(src / "tiny.png")
    Image.new("RGB", (64, 64), "white").save(src / "scan.tif")
    Image.new("RGB", (400, 40), "pink").save(src / "banner.png")
    (src / "broken.png").write_bytes(b"\x89PNG not really an image")
    metrics = validate(_collect(src))

    q = read_table(QUARANTINE, "quarantine")
    raw = read_table(RAW_MANIFEST, "raw_manifest")
    name = dict(zip(raw["id"], raw["source_url"].map(lambda u: u.rsplit("/", 1)[-1]),
                    strict=True))
    by_name = {name[i]: r for i, r in zip(q["id"], q["reasons"], strict=True)}
    reasons = set(q["reasons"])
    assert "not an image" in reasons
    assert "too small: 20x20 < 32" in reasons
    assert "format TIFF not in ['PNG', 'JPEG', 'WEBP', 'GIF', 'BMP']" in reasons
    assert "aspect ratio 10.00 > 4" in reasons
    assert by_name == {"broken.png": "not an image", "tiny.png": "too small: 20x20 < 32",
                       "scan.tif": "format TIFF not in ['PNG', 'JPEG', 'WEBP', 'GIF', 'BMP']",
                       "banner.png": "aspect ratio 10.00 > 4"}
    valid = read_table(VALID_MANIFEST, "validated_manifest")
    assert sorted(valid["format"]) == ["JPEG", "PNG"]
    assert metrics["images_in"] == 6 and metrics["valid"] == 2 and metrics["quarantined"] == 4
    assert metrics["quarantine_reasons"] == {"aspect": 1, "format": 1, "not_an_image": 1,
                                             "size": 1}
    assert metrics["gx_success"] is False and metrics["expectations_failed"] >= 3
    assert GX_RESULTS.exists() and GX_SUITE.exists()


def test_no_valid_image_is_a_user_error(repo: Path) -> None:
    src = repo / "in"
    src.mkdir()
    (src / "a.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="quarantine.parquet"):
        validate(_collect(src))


def test_near_duplicates_keep_the_largest_copy(repo: Path) -> None:
    """A resized, re-encoded copy is a near duplicate (quarantined, the larger kept); two
    flat posters that merely share a perceptual hash are not."""
    import io

    from components.synthetic import render

    p = load_params()
    src = repo / "in"
    src.mkdir()
    big = Image.open(io.BytesIO(render(0, 4, 256, p.brand, p.synthetic, p.labels)[0]))
    big.save(src / "poster.png")
    big.convert("RGB").resize((180, 180)).save(src / "poster_small.jpg", quality=70)
    Image.new("RGB", (128, 128), (230, 57, 70)).save(src / "flat_red.png")
    Image.new("RGB", (128, 128), (35, 57, 230)).save(src / "flat_blue.png")
    params = _collect(src)
    raw = read_table(RAW_MANIFEST, "raw_manifest")
    name = dict(zip(raw["id"], raw["source_url"].map(lambda u: u.rsplit("/", 1)[-1]),
                    strict=True))
    dups = {name[i]: name.get(k, "") for i, k in zip(raw["id"], raw["near_duplicate_of"],
                                                     strict=True) if k}
    assert dups == {"poster_small.jpg": "poster.png"}
    validate(params)
    q = read_table(QUARANTINE, "quarantine")
    assert [name[i] for i in q["id"]] == ["poster_small.jpg"]
    assert q["reasons"].iloc[0].startswith("near duplicate of ")
