"""Known-answer tests for the data stages' numbers: a label or OCR text compared with itself
instead of the ground truth, or a size limit off by one, changes the answer (issue 26)."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image, ImageDraw

from components.config import load_params
from components.contracts import (
    GROUND_TRUTH,
    OCR_TABLE,
    QUARANTINE,
    RAW_MANIFEST,
    VALID_MANIFEST,
    read_table,
    write_table,
)
from components.ingest.ocr import cer, normalise, ocr
from components.ingest.scrape import scrape
from components.ingest.validate import validate
from components.labelling.labels import ACCURACY_FIELDS, accuracy

TRUTH = {"background": "red", "background_kind": "gradient", "gradient_to": "blue",
         "layout": "centre", "figure_size": "small", "saturation": "vivid"}


def _ground_truth(ids: list[str]) -> pd.DataFrame:
    rows = [{"id": i, "text": "SALE", **TRUTH, "n_figures": 1, "logo": k % 2 == 0,
             "logo_corner": "", "text_boxes": "[]"} for k, i in enumerate(ids)]
    rows[1] |= {"background_kind": "solid", "gradient_to": ""}  # "" is "none" in labels
    return pd.DataFrame(rows)


@pytest.mark.parametrize("field", ACCURACY_FIELDS)
def test_label_accuracy_counts_one_wrong_field_of_n_images(workdir, field) -> None:
    ids = [f"{k:02x}" * 32 for k in range(5)]
    gt = _ground_truth(ids)
    write_table(gt, GROUND_TRUTH, "ground_truth")
    labels = gt.drop(columns=["text", "n_figures", "logo_corner", "text_boxes"]).copy()
    labels["logo"] = labels["logo"].map({True: "yes", False: "no"})
    labels["gradient_to"] = labels["gradient_to"].replace("", "none")
    extra = pd.DataFrame([{"id": "ff" * 32, **TRUTH, "logo": "no"}])  # not in the truth
    labels = pd.concat([labels, extra], ignore_index=True)
    assert accuracy(labels) == {f"accuracy_{f}": 1.0 for f in ACCURACY_FIELDS}

    wrong = {"logo": "no"} if field == "logo" else {field: "not-" + str(labels.at[2, field])}
    assert labels.at[2, field] != wrong[field]
    labels.loc[2, field] = wrong[field]
    want = {f"accuracy_{f}": 1.0 for f in ACCURACY_FIELDS} | {f"accuracy_{field}": 0.8}
    assert accuracy(labels) == want


def _poster(size: tuple[int, int], colour: str) -> Image.Image:
    im = Image.new("RGB", size, colour)  # a mark on it: a flat colour alone is blank
    ImageDraw.Draw(im).rectangle((8, 8, 24, 20), fill="white")
    return im


def test_an_image_one_pixel_over_max_side_is_quarantined_and_max_side_passes(workdir) -> None:
    src = workdir / "in"
    src.mkdir()
    for name, size, colour in [("at_limit.png", (100, 100), "red"),
                               ("wide.png", (101, 100), "blue"),
                               ("tall.png", (100, 101), "green"),
                               ("both.png", (101, 101), "orange")]:
        _poster(size, colour).save(src / name)
    params = load_params(overrides=[
        f"scrape.sources=[{{kind: folder, path: {src}, include: ['*']}}]",
        "validate.max_side=100"])
    assert params.validate_.max_side == 100
    scrape(params)
    metrics = validate(params)

    raw = read_table(RAW_MANIFEST, "raw_manifest")
    name = dict(zip(raw["id"], raw["source_url"].map(lambda u: u.rsplit("/", 1)[-1]),
                    strict=True))
    q = read_table(QUARANTINE, "quarantine")
    assert {name[i]: r for i, r in zip(q["id"], q["reasons"], strict=True)} == {
        "wide.png": "too large: 101x100 > 100", "tall.png": "too large: 100x101 > 100",
        "both.png": "too large: 101x101 > 100"}
    assert [name[i] for i in read_table(VALID_MANIFEST, "validated_manifest")["id"]] == [
        "at_limit.png"]
    assert metrics["valid"] == 1 and metrics["quarantine_reasons"] == {"size": 3}


def test_ocr_cer_is_measured_against_the_ground_truth(workdir) -> None:
    params = load_params(overrides=["scrape.sources=[{kind: synthetic, n: 4}]", "ocr.workers=2"])
    scrape(params)
    first = ocr(params)
    read = dict(zip(*read_table(OCR_TABLE, "ocr")[["id", "text"]].T.to_numpy(), strict=True))
    gt = read_table(GROUND_TRUTH, "ground_truth")
    assert len(gt) == len(read) == 4
    want = sum(cer(read[i], t) for i, t in zip(gt["id"], gt["text"], strict=True)) / 4
    assert first["cer"] == pytest.approx(round(want, 4))

    # the truth made exactly what was read: no error at all...
    gt["text"] = gt["id"].map(read)
    write_table(gt, GROUND_TRUTH, "ground_truth")
    same = ocr(params)
    assert same["cache_hits"] == 4
    assert same["cer"] == 0 and same["exact_match"] == 1
    # ...then four characters more in one image's truth: its CER is 4 / len(truth)
    truth = normalise(read[gt.at[0, "id"]]) + "ZZZZ"
    gt.loc[0, "text"] = truth
    write_table(gt, GROUND_TRUTH, "ground_truth")
    off = ocr(params)
    assert off["cer"] == pytest.approx(round(4 / len(truth) / 4, 4))
    assert off["exact_match"] == 0.75
