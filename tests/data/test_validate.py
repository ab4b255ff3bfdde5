"""Data tests: the validation suite quarantines bad images with reasons, keeps good ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from components.config import load_params
from components.contracts import (
    OCR_TABLE,
    QUARANTINE,
    RAW_MANIFEST,
    VALID_MANIFEST,
    UserError,
    read_table,
    write_table,
)
from components.ingest.scrape import scrape
from components.ingest.validate import GX_RESULTS, GX_SUITE, validate

PARAMS = Path(__file__).parents[2] / "params.yaml"


@pytest.fixture
def repo(workdir: Path) -> Path:
    return workdir


def _poster(size: tuple[int, int], colour: str) -> Image.Image:
    """A flat colour with a mark on it (a flat colour alone is quarantined as blank)."""
    im = Image.new("RGB", size, colour)
    ImageDraw.Draw(im).rectangle((8, 8, 24, 20), fill="white")
    return im


def _collect(folder: Path):
    params = load_params(overrides=[f"scrape.sources=[{{kind: folder, path: {folder}, "
                                    "include: ['*']}]"])
    scrape(params)
    return params


def test_quarantines_bad_images_with_reasons(repo: Path) -> None:
    src = repo / "in"
    src.mkdir()
    _poster((64, 64), "red").save(src / "good.png")
    _poster((96, 64), "blue").save(src / "good.jpg")
    _poster((20, 20), "green").save(src / "tiny.png")
    _poster((64, 64), "grey").save(src / "scan.tif")
    _poster((400, 40), "pink").save(src / "banner.png")
    (src / "broken.png").write_bytes(b"\x89PNG not really an image")
    params = _collect(src)
    metrics = validate(params)

    q = read_table(QUARANTINE, "quarantine")
    raw = read_table(RAW_MANIFEST, "raw_manifest")
    name = dict(zip(raw["id"], raw["source_url"].map(lambda u: u.rsplit("/", 1)[-1]),
                    strict=True))
    by_name = {name[i]: r for i, r in zip(q["id"], q["reasons"], strict=True)}
    reasons = set(q["reasons"])
    assert "not an image" in reasons
    assert "too small: 20x20 < 32" in reasons
    assert "format TIFF not in ['PNG', 'JPEG', 'WEBP', 'GIF', 'BMP']" in reasons
    wide = ("aspect ratio 400:40 (10.00) outside 0.45..3.75, the format buckets stretched by "
            "formats.max_stretch; add a bucket in formats.buckets to train on it")
    assert wide in reasons
    assert by_name == {"broken.png": "not an image", "tiny.png": "too small: 20x20 < 32",
                       "scan.tif": "format TIFF not in ['PNG', 'JPEG', 'WEBP', 'GIF', 'BMP']",
                       "banner.png": wide}
    valid = read_table(VALID_MANIFEST, "validated_manifest")
    assert sorted(valid["format"]) == ["JPEG", "PNG"]
    assert metrics["images_in"] == 6 and metrics["valid"] == 2 and metrics["quarantined"] == 4
    assert metrics["quarantine_reasons"] == {"aspect": 1, "format": 1, "not_an_image": 1,
                                             "size": 1}
    assert metrics["gx_success"] is False and metrics["expectations_failed"] >= 3
    assert GX_RESULTS.exists() and GX_SUITE.exists()
    first = GX_RESULTS.read_bytes(), GX_SUITE.read_bytes()
    validate(params)  # the same manifest again: the same report, byte for byte
    assert (GX_RESULTS.read_bytes(), GX_SUITE.read_bytes()) == first
    assert b'"unexpected_count": 1' in first[0]  # the results themselves are still there


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

    from components.ingest.synthetic import render

    p = load_params()
    src = repo / "in"
    src.mkdir()
    big = Image.open(io.BytesIO(render(0, 4, 256, p.brand, p.synthetic, p.labels)[0]))
    big.save(src / "poster.png")
    big.convert("RGB").resize((180, 180)).save(src / "poster_small.jpg", quality=70)
    _poster((128, 128), "#e63946").save(src / "flat_red.png")
    _poster((128, 128), "#2339e6").save(src / "flat_blue.png")
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


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but holds almost no data: a
    decompression bomb as far as a decoder that trusts the header is concerned."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_hostile_folder_is_fully_accounted_for(repo: Path) -> None:
    """Every hostile file ends validated (read as RGB by every stage) or quarantined with
    its reason; nothing crashes, nothing is decoded beyond the pixel limit."""
    import io

    from components.contracts import open_rgb

    src = repo / "in"
    src.mkdir()
    rng = np.random.default_rng(0)

    def good() -> Image.Image:  # a different picture each time (no near duplicates)
        return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))

    (src / "zero.png").write_bytes(b"")
    buf = io.BytesIO()
    good().save(buf, "PNG")
    (src / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (src / "notes.jpg").write_text("this is not a jpeg")
    (src / "bomb.png").write_bytes(_png_declaring(60_000, 60_000))  # PIL refuses it
    (src / "bomb_small.png").write_bytes(_png_declaring(9_000, 9_000))  # over our limit
    good().convert("1").save(src / "bilevel.png")
    good().convert("P").save(src / "palette.png", transparency=0)
    Image.fromarray(np.asarray(good().convert("L"), np.uint16) * 200).save(src / "deep.png")
    good().convert("LA").save(src / "grey_alpha.png")
    good().convert("CMYK").save(src / "print.jpg")
    good().convert("RGBA").save(src / "alpha.png")
    frames = [_poster((64, 48), c) for c in ("red", "green", "blue")]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    good().save(src / "rotated.jpg", exif=exif)
    _poster((1, 1), "red").save(src / "dot.png")
    _poster((800, 100), "red").save(src / "strip.png")
    Image.new("RGB", (64, 64), "white").save(src / "blank.png")

    metrics = validate(_collect(src))
    raw = read_table(RAW_MANIFEST, "raw_manifest")
    name = dict(zip(raw["id"], raw["source_url"].map(lambda u: u.rsplit("/", 1)[-1]),
                    strict=True))
    q = read_table(QUARANTINE, "quarantine")
    reasons = {name[i]: r for i, r in zip(q["id"], q["reasons"], strict=True)}
    valid = read_table(VALID_MANIFEST, "validated_manifest")
    kept = {name[i] for i in valid["id"]}
    assert len(reasons) + len(kept) == metrics["images_in"] == 16  # every file accounted
    assert reasons["zero.png"] == "empty file (0 bytes)"
    assert reasons["truncated.png"].startswith("cannot decode")
    assert reasons["notes.jpg"] == "not an image"
    assert reasons["bomb.png"].startswith("decompression bomb")
    assert reasons["bomb_small.png"].startswith("decompression bomb: declares 9000x9000")
    assert reasons["dot.png"].startswith("too small: 1x1")
    assert reasons["strip.png"].startswith("aspect ratio 800:100 (8.00) outside 0.45..3.75")
    assert reasons["blank.png"].startswith("blank: pixel spread 0.00")
    assert kept == {"bilevel.png", "palette.png", "deep.png", "grey_alpha.png", "print.jpg",
                    "alpha.png", "anim.gif", "rotated.jpg"}
    modes = metrics["converted_modes"]
    assert {"1", "P", "LA", "CMYK", "RGBA"} <= set(modes) and "RGB" not in modes
    assert any(m.startswith("I") for m in modes)  # the 16-bit one (I;16 or I, by plugin)
    assert metrics["animated_first_frame"] == 1
    rows = valid.set_index(valid["id"].map(name))
    assert (rows.loc["rotated.jpg", "width"], rows.loc["rotated.jpg", "height"]) == (48, 64)
    for path in valid["path"]:
        im = open_rgb(path)
        assert im.mode == "RGB" and np.asarray(im).std() > 1  # content survives conversion
    assert open_rgb(rows.loc["rotated.jpg", "path"]).size == (48, 64)


def test_rescrape_reports_new_changed_vanished(repo: Path) -> None:
    src = repo / "in"
    src.mkdir()
    for k, colour in enumerate(["red", "blue", "green"]):
        _poster((64, 48), colour).save(src / f"p{k}.png")
    params = _collect(src)  # the first scrape
    again = scrape(params)
    assert (again["since_last.new"], again["since_last.unchanged"]) == (0, 3)
    assert again["reused"] == 3 and again["pruned"] == 0  # unchanged files are not read
    _poster((64, 48), "orange").save(src / "p0.png")  # changed in place
    (src / "p1.png").unlink()  # vanished
    _poster((64, 48), "purple").save(src / "p3.png")  # new
    m = scrape(params)
    assert (m["since_last.new"], m["since_last.changed"], m["since_last.vanished"],
            m["since_last.unchanged"]) == (1, 1, 1, 1)
    assert m["reused"] == 1 and m["pruned"] == 2  # old p0 and p1 leave the store
    stored = {str(f) for f in (repo / "data/raw/images").rglob("*") if f.is_file()}
    assert stored == {str(repo / p) for p in read_table(RAW_MANIFEST, "raw_manifest")["path"]}


def test_manifest_of_an_older_version_means_reading_everything_again(repo: Path) -> None:
    src = repo / "in"
    src.mkdir()
    _poster((64, 48), "red").save(src / "a.png")
    params = _collect(src)
    old = read_table(RAW_MANIFEST, "raw_manifest").drop(columns=["decode_error"])
    old.to_parquet(RAW_MANIFEST)  # as an older tinyldm wrote it
    m = scrape(params)
    assert m["images"] == 1 and "reused" not in m


def _ocr_table(errors: dict[str, str]) -> None:
    """An OCR table for every collected image; `errors`: id -> error text."""
    ids = read_table(RAW_MANIFEST, "raw_manifest")["id"].tolist()
    write_table(pd.DataFrame({"id": ids, "text": "SALE", "mean_conf": 90.0, "n_words": 1,
                              "words": "[]", "engine_version": "5", "settings_hash": "x",
                              "error": [errors.get(i, "") for i in ids]}),
                OCR_TABLE, "ocr")


def test_dataset_checks_are_told_apart_from_quarantined_rows(repo: Path, capsys) -> None:
    """A quarantined file fails the GX suite, so gx_success cannot tell it from a broken
    OCR run: the failed dataset checks are listed on their own, with what to look at."""
    src = repo / "in"
    src.mkdir()
    for i, colour in enumerate(["red", "blue", "green", "purple"]):
        _poster((64, 64), colour).save(src / f"p{i}.png")
    _poster((20, 20), "green").save(src / "tiny.png")
    params = _collect(src)
    _ocr_table({})
    metrics = validate(params)
    assert metrics["quarantined"] == 1 and metrics["gx_success"] is False
    assert metrics["dataset_problems"] == []
    assert "dataset check" not in capsys.readouterr().err

    ids = read_table(RAW_MANIFEST, "raw_manifest")["id"].tolist()
    _ocr_table({ids[0]: "tesseract not found", ids[1]: "timeout"})
    metrics = validate(params)
    assert len(metrics["dataset_problems"]) == 1
    assert metrics["dataset_problems"][0].startswith("40.0% of images failed OCR")
    err = capsys.readouterr().err
    assert "validate: dataset check failed: 40.0% of images failed OCR" in err
    assert "ocr.lang" in err


def test_the_aspect_limit_follows_the_format_buckets(repo: Path) -> None:
    """Wider than the widest bucket (3:1) or narrower than the narrowest (9:16) by more
    than formats.max_stretch is quarantined; a bucket for that shape lets it in."""
    src = repo / "in"
    src.mkdir()
    sizes = {"wide4.png": (256, 64), "wide35.png": (224, 64), "tall.png": (64, 160),
             "story.png": (72, 128)}
    for name, size in sizes.items():
        _poster(size, "red").save(src / name)
    params = _collect(src)
    validate(params)
    raw = read_table(RAW_MANIFEST, "raw_manifest")
    name = dict(zip(raw["id"], raw["source_url"].map(lambda u: u.rsplit("/", 1)[-1]),
                    strict=True))
    assert sorted(name[i] for i in read_table(QUARANTINE, "quarantine")["id"]) == [
        "tall.png", "wide4.png"]  # 4.0 > 3.75 and 0.4 < 0.45; 3.5 and 0.5625 are in
    wider = load_params(overrides=[
        f"scrape.sources=[{{kind: folder, path: {src}, include: ['*']}}]",
        "formats.buckets={poster: [1, 1], story: [9, 16], banner: [2, 1], skyline: [4, 1]}"])
    validate(wider)
    assert sorted(name[i] for i in read_table(QUARANTINE, "quarantine")["id"]) == ["tall.png"]
