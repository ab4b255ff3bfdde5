import io

import numpy as np
import pandas as pd
from PIL import Image

from components.config import load_params
from components.contracts import GROUND_TRUTH, RAW_MANIFEST, read_table
from components.ingest.scrape import scrape
from components.ingest.synthetic import LAYOUTS, render
from components.labelling.labeller import label_background


def test_same_seed_same_bytes_and_index_stability(workdir):
    p = load_params()
    a, ta = render(5, 7, 256, p.brand, p.synthetic, p.labels)
    b, tb = render(5, 7, 256, p.brand, p.synthetic, p.labels)
    c, _ = render(5, 8, 256, p.brand, p.synthetic, p.labels)
    assert a == b and ta == tb and a != c


def test_ground_truth_matches_what_is_drawn(workdir):
    p = load_params()
    palette = p.brand.rgb()
    for i in range(40):
        data, t = render(i, 0, 256, p.brand, p.synthetic, p.labels)
        im = Image.open(io.BytesIO(data))
        assert im.size == (256, 256)
        assert t.background in palette and t.layout in LAYOUTS
        assert 1 <= len(t.text.split("\n")) <= 3 and t.text == t.text.upper()
        assert t.saturation in p.labels.saturation_levels
        assert (t.figure_size == "none") == (t.n_figures == 0)
        assert t.logo == bool(t.logo_corner)
        assert (t.background_kind == "gradient") == bool(t.gradient_to)
        # the labeller reads the recorded background back from the pixels
        assert label_background(im, p.brand, p.labels)["background"] == t.background


def test_logo_takes_the_first_corner_clear_of_the_text(workdir):
    """A brand's rule (one corner, another when the text is there) gives "logo yes" one
    place to draw; random corners give it four."""
    p = load_params()
    ruled = p.synthetic.model_copy(update={"logo_corners": ["bottom-right", "top-left"]})
    anywhere = p.synthetic.model_copy(update={"logo_corners": ["random"]})
    corners = {"ruled": [], "random": []}
    for name, synth in [("ruled", ruled), ("random", anywhere)]:
        for i in range(120):
            _, t = render(i, 0, 256, p.brand, synth, p.labels)
            if t.logo:
                corners[name].append((t.layout, t.logo_corner))
    assert {c for _l, c in corners["ruled"]} == {"bottom-right", "top-left"}
    # top-left only where the text reaches the bottom-right corner
    assert all(c == "bottom-right" for layout, c in corners["ruled"]
               if layout in ("top", "left", "centre"))
    assert len({c for _l, c in corners["random"]}) == 4


def test_scrape_synthetic_writes_manifest_and_ground_truth(workdir):
    p = load_params(overrides=["scrape.sources=[{kind: synthetic, n: 20, size: 128}]"])
    m = scrape(p)
    assert m["images"] == 20 and m["with_ground_truth"] == 20
    manifest = read_table(RAW_MANIFEST, "raw_manifest")
    gt = read_table(GROUND_TRUTH, "ground_truth")
    assert set(manifest["id"]) == set(gt["id"])
    assert (manifest["width"] == 128).all() and (manifest["format"] == "PNG").all()
    for row in manifest.itertuples():
        assert row.path.endswith(f"{row.id}.png") and f"/{row.id[:2]}/" in row.path
    # deterministic: a second scrape gives the same table
    scrape(p)
    pd.testing.assert_frame_equal(manifest, read_table(RAW_MANIFEST, "raw_manifest"))


def test_scrape_folder_keeps_corrupt_files_for_quarantine(workdir):
    folder = workdir / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((60, 60, 3), 10, np.uint8)).save(folder / "sub" / "b.jpg")
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("ignored")
    p = load_params(overrides=[f"scrape.sources=[{{kind: folder, path: '{folder}'}}]"])
    m = scrape(p)
    assert m["images"] == 3 and m["undecodable"] == 1
    manifest = read_table(RAW_MANIFEST, "raw_manifest")
    assert sorted(manifest["format"]) == ["", "JPEG", "PNG"]


def test_headline_posters_carry_one_large_word() -> None:
    from pathlib import Path

    from components.labelling.text_boxes import loads

    params = Path(__file__).resolve().parents[2] / "params.yaml"
    p = load_params(params)
    h = load_params(params, ["synthetic.headline_share=1"])
    for i in range(6):
        _png, truth = render(i, 0, 256, h.brand, h.synthetic, h.labels)
        (line,) = loads(truth.text_boxes)
        assert len(line["text"].split()) == 1 and line["box"][3] - line["box"][1] > 0.15
    assert max(len(loads(render(i, 0, 64, p.brand, p.synthetic, p.labels)[1].text_boxes))
               for i in range(12)) > 1
