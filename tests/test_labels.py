"""Labels stage: auto labels against the generator's ground truth, the split, captions,
manual labels taking precedence with one line per problem."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from components.config import Params, load_params
from components.contracts import CAPTIONS, GROUND_TRUTH, LS_TASKS, read_json, read_table
from components.labels import caption, labels, split_of
from components.ocr import ocr
from components.scrape import scrape
from components.validate import validate


def test_split_is_deterministic_and_follows_the_shares(workdir) -> None:
    cfg = load_params().labels
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    splits = [split_of(i, cfg) for i in ids]
    assert splits == [split_of(i, cfg) for i in ids]
    shares = pd.Series(splits).value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.8, abs=0.02)
    assert shares["val"] == pytest.approx(0.1, abs=0.02)


def test_caption_fills_the_template_and_flattens_text() -> None:
    row = {"saturation": "vivid", "background": "red", "background_kind": "solid",
           "layout": "top", "text": "SUMMER\nSALE"}
    got = caption(row, '{saturation} {background} {background_kind} poster, text at the '
                       '{layout}, reading "{text}"')
    assert got == 'vivid red solid poster, text at the top, reading "SUMMER SALE"'


@pytest.fixture
def pipeline_to_validate(workdir) -> Params:
    params = load_params(overrides=["scrape.sources=[{kind: synthetic, n: 16, seed: 5}]",
                                    "ocr.workers=2"])
    scrape(params)
    ocr(params)
    validate(params)
    return params


def test_auto_labels_match_ground_truth_and_manual_wins(pipeline_to_validate, workdir,
                                                         capsys) -> None:
    params = pipeline_to_validate
    m = labels(params)
    assert m["images"] == 16
    for field in ("background", "background_kind", "saturation"):
        assert m[f"accuracy_{field}"] >= 0.9, (field, m)
    caps = read_table(CAPTIONS, "captions")
    assert (caps["background_provenance"] == "auto").all()
    assert (caps["text_provenance"] == "ocr").all()
    assert len(read_json(LS_TASKS)) == 16

    gt = read_table(GROUND_TRUTH, "ground_truth")
    target = caps["id"].iloc[0]
    other = next(c for c in params.brand.palette if c != caps["background"].iloc[0])
    manual = workdir / "labels" / "manual"
    manual.mkdir(parents=True)
    pd.DataFrame({"id": [target, "f" * 64], "background": [other, "red"],
                  "mood": ["happy", "sad"]}).to_csv(manual / "review.csv", index=False)
    m = labels(params)
    out = capsys.readouterr().out
    assert "unknown field 'mood'" in out and "row 3: unknown id ffffffffffffffff" in out
    assert m["manual_rows"] == 1 and m["manual_problems"] == 2
    assert m["manual_disagreements"] == 1  # a confident auto label was overruled
    row = read_table(CAPTIONS, "captions").set_index("id").loc[target]
    assert row["background"] == other and row["background_provenance"] == "manual"
    assert f" {other} " in f" {row['caption']} "
    assert len(gt) == 16
