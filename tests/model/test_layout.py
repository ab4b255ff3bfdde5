"""The layout planner: the quoted text placed as the training data places its text."""

from pathlib import Path

import numpy as np
import pytest

from components.config import load_params
from components.contracts import UserError
from components.ingest.synthetic import render
from components.labelling.text_boxes import loads
from components.models.glyphs import glyph_map
from components.models.layout import break_lines, fit_layouts, plan
from components.models.prompts import quoted_text

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture(scope="module")
def stats_and_truths():
    p = load_params(PARAMS)
    truths = [render(i, 0, 256, p.brand, p.synthetic, p.labels)[1] for i in range(120)]
    return fit_layouts([(t.layout, loads(t.text_boxes)) for t in truths]), truths, p


def test_quoted_text_and_line_breaks() -> None:
    assert quoted_text('vivid red poster, reading "SUMMER  SALE".') == "SUMMER SALE"
    assert quoted_text("an orange flyer that says “OPEN HOUSE” up top") == "OPEN HOUSE"
    assert quoted_text("a blue poster") == ""
    assert break_lines("BIG SUMMER SALE NOW", 2) == ["BIG SUMMER", "SALE NOW"]
    assert break_lines("GRAND OPENING TODAY", 2) == ["GRAND OPENING", "TODAY"]
    assert break_lines("SALE", 3) == ["SALE"]


def test_plans_follow_the_training_layouts(stats_and_truths) -> None:
    stats, truths, p = stats_and_truths
    assert set(stats["blocks"]) == {"centre", "left", "right", "top", "bottom"}
    for layout, inside in [("left", lambda b: b[2] <= 0.6), ("right", lambda b: b[0] >= 0.4),
                           ("top", lambda b: b[3] <= 0.5), ("bottom", lambda b: b[1] >= 0.5)]:
        for seed in range(5):
            lines = plan("BIG SALE", layout, stats, p.brand.font, seed, 64, 64)
            block = [min(ln["box"][0] for ln in lines), min(ln["box"][1] for ln in lines),
                     max(ln["box"][2] for ln in lines), max(ln["box"][3] for ln in lines)]
            assert all(0 <= v <= 1 for v in block) and inside(block), (layout, block)
    # two-word texts in the data mostly take one line, so the plan does too
    assert [ln["text"] for ln in plan("BIG SALE", "centre", stats, p.brand.font)] == ["BIG SALE"]


def test_same_seed_same_plan_and_a_users_box_wins(stats_and_truths) -> None:
    stats, _, p = stats_and_truths
    a = plan("FRESH STYLE", "centre", stats, p.brand.font, 3)
    assert a == plan("FRESH STYLE", "centre", stats, p.brand.font, 3)
    assert len({str(plan("FRESH STYLE", "centre", stats, p.brand.font, s)) for s in range(10)}) > 1
    mine = plan("FRESH", "centre", stats, p.brand.font, box=(0.1, 0.7, 0.8, 0.2))
    assert mine[0]["box"] == [0.1, 0.7, 0.9, 0.9]
    glyphs = np.asarray(glyph_map(mine, 64, 64, p.brand.font)) > 127
    rows = np.flatnonzero(glyphs.any(1))
    assert rows.min() >= 0.7 * 64 - 1 and rows.max() <= 0.9 * 64 + 1
    with pytest.raises(UserError, match="inside the image"):
        plan("FRESH", "centre", stats, p.brand.font, box=(0.5, 0.5, 0.8, 0.2))


def test_text_too_long_to_read_is_one_line_naming_it(stats_and_truths) -> None:
    stats, _, p = stats_and_truths
    long = " ".join(["SUPERCALIFRAGILISTIC"] * 3)
    with pytest.raises(UserError, match=f'"{long}": too long to be legible at 64x64'):
        plan(long, "left", stats, p.brand.font)
    assert plan(long, "centre", stats, p.brand.font, box=(0.0, 0.0, 1.0, 0.5))  # room given
    with pytest.raises(UserError, match="layout 'diagonal': no training image"):
        plan("SALE", "diagonal", stats, p.brand.font)
