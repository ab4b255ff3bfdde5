"""Label Studio round trip: the labelling config, import tasks with the auto labels as
predictions, and an export read back as manual labels with one line per problem."""

from __future__ import annotations

import copy
import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from components.contracts import UserError
from components.labelling.labelstudio import (
    LOCAL_FILES_PREFIX,
    TEXT_FIELDS,
    import_export,
    labeling_config,
    read_export,
    tasks,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "labelstudio_export.json"
SYSTEM = {"background": ["red", "blue", "yellow"],
          "background_kind": ["solid", "gradient", "texture"],
          "layout": ["centre", "left", "right", "top", "bottom"],
          "figure_size": ["none", "small", "medium", "large"],
          "saturation": ["muted", "soft", "vivid"], "logo": ["yes", "no"]}


def _id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


KNOWN = {_id(f"img-{i}") for i in (1, 2, 3, 4, 6, 7, 8)}  # the fixture's own images


def _row(name: str, **fields) -> dict:
    image_id = _id(name)
    row = {"id": image_id, "path": f"data/raw/images/{image_id[:2]}/{image_id}.png",
           "text": "SUMER SALE", "background": "blue", "background_conf": 0.6,
           "background_kind": "solid", "background_kind_conf": 0.9, "layout": "centre",
           "layout_conf": 0.8, "saturation": "vivid", "saturation_conf": 0.7}
    row.update(fields)
    return row


# ------------------------------------------------------------------ labelling config
def test_labeling_config_is_xml_with_one_single_choice_group_per_field() -> None:
    view = ET.fromstring(labeling_config(SYSTEM))
    assert view.tag == "View"
    [image] = view.findall("Image")
    assert (image.get("name"), image.get("value")) == ("image", "$image")
    assert "$ocr_text" in [h.get("value") for h in view.findall("Header")]
    groups = view.findall("Choices")
    assert [g.get("name") for g in groups] == list(SYSTEM)
    for g in groups:
        assert (g.get("toName"), g.get("choice")) == ("image", "single")
        assert [c.get("value") for c in g.findall("Choice")] == SYSTEM[g.get("name")]
    areas = {a.get("name"): a for a in view.findall("TextArea")}
    assert list(areas) == list(TEXT_FIELDS)
    for a in areas.values():
        assert (a.get("toName"), a.get("editable"), a.get("maxSubmissions")) == (
            "image", "true", "1")
    names = [e.get("name") for e in view.iter() if e.get("name")]
    assert len(names) == len(set(names))  # Label Studio needs unique tag names


def test_labeling_config_escapes_odd_value_names() -> None:
    system = {"background": ['navy & gold', 'say "hi"', "<b>"], "logo": ["yes", "no"]}
    view = ET.fromstring(labeling_config(system))
    assert [c.get("value") for c in view.find("Choices").findall("Choice")] == system[
        "background"]


# ------------------------------------------------------------------ import tasks
def test_tasks_put_auto_labels_in_one_prediction_and_the_ocr_text_in_the_textarea() -> None:
    row = _row("img-1", logo="maybe", logo_conf=0.99)  # logo value is not in the system
    [task] = tasks([row], SYSTEM, model_version="auto-7")
    assert task["data"] == {
        "image": f"{LOCAL_FILES_PREFIX}data/raw/images/{row['id'][:2]}/{row['id']}.png",
        "id": row["id"], "ocr_text": "SUMER SALE"}
    [pred] = task["predictions"]
    assert pred["model_version"] == "auto-7"
    by_name = {r["from_name"]: r for r in pred["result"]}
    assert list(by_name) == ["background", "background_kind", "layout", "saturation", "text"]
    assert by_name["background"]["type"] == "choices"
    assert by_name["background"]["to_name"] == "image"
    assert by_name["background"]["value"] == {"choices": ["blue"]}
    assert by_name["background"]["score"] == 0.6
    assert by_name["text"]["type"] == "textarea"
    assert by_name["text"]["value"] == {"text": ["SUMER SALE"]}
    assert pred["score"] == pytest.approx((0.6 + 0.9 + 0.8 + 0.7) / 4, abs=1e-4)
    ids = [r["id"] for r in pred["result"]]
    assert len(ids) == len(set(ids))
    json.dumps(task)  # what Label Studio imports


def test_tasks_without_confidences_or_text_and_with_a_custom_image_url() -> None:
    row = _row("img-2", text=float("nan"), background_conf=None, layout_conf=float("nan"))
    del row["saturation_conf"], row["background_kind_conf"]
    [task] = tasks([row], SYSTEM, image_url=lambda p: f"http://files.local/{p}")
    assert task["data"]["image"] == f"http://files.local/{row['path']}"
    assert task["data"]["ocr_text"] == ""
    [pred] = task["predictions"]
    assert "score" not in pred
    assert all("score" not in r for r in pred["result"])
    assert "text" not in [r["from_name"] for r in pred["result"]]
    [task] = tasks([dict(row, path="data/raw/a b.png")], SYSTEM, image_url="http://h/")
    assert task["data"]["image"] == "http://h/data/raw/a%20b.png"


# ------------------------------------------------------------------ reading an export
def test_fixture_export_gives_the_changed_fields_and_one_line_per_problem() -> None:
    rows, problems = read_export(FIXTURE, KNOWN, SYSTEM)
    got = rows.set_index("id").to_dict("index")
    assert got == {
        # prediction accepted, background and text changed: only those come back
        _id("img-1"): {"background": "red", "layout": "", "figure_size": "",
                       "saturation": "", "text": "SUMMER SALE", "description": ""},
        # two annotations: the latest updated wins though it is listed first
        _id("img-2"): {"background": "", "layout": "left", "figure_size": "",
                       "saturation": "", "text": "", "description": ""},
        # 'purple' refused, the rest of the annotation kept
        _id("img-6"): {"background": "", "layout": "", "figure_size": "",
                       "saturation": "muted", "text": "", "description": ""},
        # unknown from_name refused; a textarea's lines are joined
        _id("img-7"): {"background": "", "layout": "", "figure_size": "", "saturation": "",
                       "text": "", "description": "a red poster\nwith a sun"},
        # no data.id: the id comes from the image file name; the logo result kept its
        # prediction origin, so it is the auto label, not a change
        _id("img-8"): {"background": "", "layout": "", "figure_size": "large",
                       "saturation": "", "text": "", "description": ""},
    }
    assert list(rows.columns) == ["id", "background", "layout", "figure_size", "saturation",
                                  "text", "description"]
    assert len(problems) == 5
    for line in problems:
        assert "\n" not in line and line.startswith(f"{FIXTURE}: task 10")
    expect = {102: ["2 annotations", "annotation 302", _id("img-2")[:16]],
              103: ["only cancelled", _id("img-3")[:16]],
              105: ["unknown image id", _id("stranger")[:16]],
              106: ["'background'", "'purple'", "red, blue, yellow", _id("img-6")[:16]],
              107: ["'mood'", "unknown field", _id("img-7")[:16]]}
    for task_id, words in expect.items():
        [line] = [p for p in problems if f"task {task_id} " in p]
        assert all(w in line for w in words), line
    assert not any("task 104 " in p for p in problems)  # unreviewed is not a problem


def test_fixture_export_with_accepted_values_and_any_id() -> None:
    rows, problems = read_export(FIXTURE, None, SYSTEM, include_unchanged=True)
    got = rows.set_index("id")
    assert got.loc[_id("img-1"), "layout"] == "centre"
    assert got.loc[_id("img-1"), "logo"] == "no"
    assert got.loc[_id("img-8"), "logo"] == "yes"
    assert got.loc[_id("stranger"), "background"] == "yellow"
    assert not any("unknown image id" in p for p in problems)


def _simulate_label_studio(import_tasks: list[dict], edits: dict[int, dict]) -> list[dict]:
    """What Label Studio exports after an annotator opens task i, gets the prediction copied
    into a new annotation, changes edits[i] and submits; tasks not in edits stay unreviewed."""
    exported = []
    for i, task in enumerate(import_tasks):
        task_id, pred_id = 1000 + i, 2000 + i
        pred = dict(copy.deepcopy(task["predictions"][0]), id=pred_id, task=task_id, project=1,
                    created_ago="1 hour", cluster=None, neighbors=None, mislabeling=0.0,
                    created_at="2024-06-01T10:00:00.000000Z",
                    updated_at="2024-06-01T10:00:00.000000Z", model=None, model_run=None)
        annotations = []
        if i in edits:
            result = []
            for r in copy.deepcopy(pred["result"]):
                r = {k: v for k, v in r.items() if k != "score"}
                r["origin"] = "prediction"
                if r["from_name"] in edits[i]:
                    key = "choices" if r["type"] == "choices" else "text"
                    r["value"] = {key: [edits[i][r["from_name"]]]}
                    r["origin"] = "prediction-changed"
                result.append(r)
            annotations.append({
                "id": 3000 + i, "completed_by": 1, "result": result, "was_cancelled": False,
                "ground_truth": False, "created_at": "2024-06-02T09:00:00.000000Z",
                "updated_at": "2024-06-02T09:00:00.000000Z", "draft_created_at": None,
                "lead_time": 9.5, "prediction": {}, "result_count": 0, "import_id": None,
                "last_action": "prediction_changed", "task": task_id, "project": 1,
                "updated_by": 1, "parent_prediction": pred_id, "parent_annotation": None,
                "last_created_by": None})
        exported.append({"id": task_id, "annotations": annotations, "drafts": [],
                         "predictions": [pred], "data": task["data"], "meta": {},
                         "created_at": "2024-06-01T10:00:00.000000Z",
                         "updated_at": "2024-06-02T09:00:00.000000Z", "inner_id": i + 1,
                         "total_annotations": len(annotations), "cancelled_annotations": 0,
                         "total_predictions": 1, "project": 1, "updated_by": None,
                         "file_upload": None, "comment_authors": []})
    return exported


def test_round_trip_returns_exactly_the_changed_fields(tmp_path) -> None:
    rows = [_row("rt-0"), _row("rt-1", background="red"), _row("rt-2")]
    edits = {0: {"background": "yellow"}, 1: {"text": "SUMMER SALE"}}
    export = tmp_path / "project-1-at-2024-06-02.json"
    export.write_text(json.dumps(_simulate_label_studio(tasks(rows, SYSTEM), edits)))

    got, problems = read_export(export, {r["id"] for r in rows}, SYSTEM)
    assert problems == []
    expected = pd.DataFrame([{"id": rows[0]["id"], "background": "yellow", "text": ""},
                             {"id": rows[1]["id"], "background": "", "text": "SUMMER SALE"}])
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected, check_dtype=False)

    every, _ = read_export(export, {r["id"] for r in rows}, SYSTEM, include_unchanged=True)
    assert set(every["id"]) == {rows[0]["id"], rows[1]["id"]}
    first = every.set_index("id").loc[rows[0]["id"]]
    assert (first["background"], first["layout"], first["text"]) == (
        "yellow", "centre", "SUMER SALE")


def test_json_min_export(tmp_path) -> None:
    """The JSON-MIN shape Label Studio's converter writes: task data, the task id over data.id,
    one record per annotation, a single choice or text as a bare string."""
    a, b = _id("img-1"), _id("img-2")
    meta = {"annotator": 1, "lead_time": 5.0, "created_at": "2024-05-02T08:00:00Z"}
    records = [
        {"image": f"{LOCAL_FILES_PREFIX}data/raw/images/c2/{a}.png", "ocr_text": "SUMER SALE",
         "id": 101, "background": "red", "text": "SUMMER SALE", "annotation_id": 301,
         "updated_at": "2024-05-02T08:00:00Z", **meta},
        {"image": f"{LOCAL_FILES_PREFIX}data/raw/images/44/{b}.png", "ocr_text": "", "id": 102,
         "layout": "right", "description": {"text": ["two", "lines"]}, "annotation_id": 303,
         "updated_at": "2024-05-03T09:00:00Z", **meta},
        {"image": f"{LOCAL_FILES_PREFIX}data/raw/images/44/{b}.png", "ocr_text": "", "id": 102,
         "layout": "left", "saturation": "loud", "annotation_id": 302,
         "updated_at": "2024-05-04T11:00:00Z", **meta},
        {"image": f"{LOCAL_FILES_PREFIX}data/raw/images/d7/{_id('img-4')}.png",
         "ocr_text": "", "id": 104, "annotation_id": None, "annotator": None,
         "created_at": None, "updated_at": None, "lead_time": None},
    ]
    path = tmp_path / "min.json"
    path.write_text(json.dumps(records))
    got, problems = read_export(path, KNOWN, SYSTEM)
    assert got.set_index("id").to_dict("index") == {
        a: {"background": "red", "layout": "", "text": "SUMMER SALE"},
        b: {"background": "", "layout": "left", "text": ""},
    }
    assert len(problems) == 2
    assert "task 102 " in problems[0] and "annotation 302" in problems[0]
    assert "'saturation'" in problems[1] and "'loud'" in problems[1]
    assert "description" not in got.columns  # only in the older annotation of task 102


def test_an_image_in_two_tasks_takes_the_later_annotation(tmp_path) -> None:
    exported = json.loads(FIXTURE.read_text())
    again = copy.deepcopy(exported[1])  # task 102 imported twice
    again["id"] = 109
    ann = again["annotations"][0]
    ann.update(id=309, task=109, updated_at="2024-05-05T00:00:00.000000Z")
    ann["result"][0]["value"] = {"choices": ["top"]}
    again["annotations"] = [ann]
    path = tmp_path / "twice.json"
    path.write_text(json.dumps([*exported, again]))
    got, problems = read_export(path, KNOWN, SYSTEM)
    assert got.set_index("id").loc[_id("img-2"), "layout"] == "top"
    [line] = [p for p in problems if "task 109 " in p]
    assert "also annotated in task 102" in line and "using task 109" in line


def test_empty_export_has_no_rows(tmp_path) -> None:
    path = tmp_path / "empty.json"
    path.write_text("[]")
    got, problems = read_export(path, KNOWN, SYSTEM)
    assert list(got.columns) == ["id"] and got.empty and problems == []


# ------------------------------------------------------------------ import_export
def test_import_export_copies_the_file_unchanged(tmp_path) -> None:
    dest_dir = tmp_path / "labels" / "manual"
    dest, n, problems = import_export(FIXTURE, dest_dir, KNOWN, SYSTEM)
    assert dest == dest_dir / "labelstudio-labelstudio_export.json"
    assert dest.read_bytes() == FIXTURE.read_bytes()
    assert n == 5 and len(problems) == 5
    assert [p.name for p in dest_dir.iterdir()] == [dest.name]  # no temp file left
    again, _, _ = import_export(dest, dest_dir, KNOWN, SYSTEM)  # no labelstudio-labelstudio-
    assert again == dest


@pytest.mark.parametrize("content, words", [
    ("id,background\nabc,red\n", "not JSON"),
    ('{"data": {"image": "x.png"}}', "list of tasks"),
    ("[1, 2]", "list of tasks"),
    ('[{"foo": 1}]', "not a Label Studio export"),
    ('[{"data": {"image": "x.png"}, "predictions": []}]', "import file"),
])
def test_import_export_refuses_what_is_no_export(tmp_path, content, words) -> None:
    src = tmp_path / "download.json"
    src.write_text(content)
    dest_dir = tmp_path / "manual"
    with pytest.raises(UserError) as err:
        import_export(src, dest_dir, KNOWN, SYSTEM)
    message = str(err.value)
    assert "\n" not in message
    assert str(src) in message and words in message and "Export > JSON" in message
    assert not dest_dir.exists() or not any(dest_dir.iterdir())


def test_import_export_refuses_a_missing_file(tmp_path) -> None:
    with pytest.raises(UserError, match="cannot read"):
        import_export(tmp_path / "nope.json", tmp_path / "manual", KNOWN, SYSTEM)
