"""Label Studio round trip: a labelling config, import tasks pre-filled with the auto labels,
and an annotated export read back as manual labels.

Label Studio is not a dependency: its formats are plain XML and JSON, written and read here as
its docs define them (labelstud.io/guide: tags/choices, tags/textarea, predictions, task_format,
storage#Local-storage). Everything is a pure function of the label system so tests need no
Params and no server.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote

import pandas as pd

from components.config import Params
from components.contracts import (
    CAPTIONS,
    LS_CONFIG,
    LS_TASKS,
    MANUAL_LABELS,
    TEXT_FIELDS,
    VALID_MANIFEST,
    UserError,
    atomic_path,
    atomic_write_text,
    read_table,
    write_json,
)
from components.labelling.labeller import label_system

# Label Studio serves a file under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT at this URL when
# LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true (docs: storage.html#Local-storage).
LOCAL_FILES_PREFIX = "/data/local-files/?d="
IMAGE = "image"  # the Image object tag's name: every control's toName
# JSON_MIN keys that are not from_names: the converter's metadata and our task data keys.
_MIN_META = {"id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time",
             "agreement", "image", "ocr_text"}
_SHA = re.compile(r"[0-9a-f]{64}")
_FIX = "export the project from Label Studio with Export > JSON and pass that file"


def labeling_config(system: dict[str, list[str]]) -> str:
    """The project's labelling interface. Choices are single so an annotation can only say one
    value per field, the same shape the manual-label CSVs have; ElementTree does the escaping
    so palette names with & or quotes still give valid XML."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=IMAGE, value="$image", zoom="true", zoomControl="true")
    ET.SubElement(view, "Header", value="OCR text", size="5")
    ET.SubElement(view, "Header", value="$ocr_text", size="6")
    for field, allowed in system.items():
        ET.SubElement(view, "Header", value=field, size="5")
        choices = ET.SubElement(view, "Choices", name=field, toName=IMAGE, choice="single",
                                showInline="true")
        for value in allowed:
            ET.SubElement(choices, "Choice", value=value)
    # maxSubmissions=1 + editable: the prediction's OCR text is the one entry, corrected in place
    ET.SubElement(view, "Header", value="text: correct the transcription", size="5")
    ET.SubElement(view, "TextArea", name="text", toName=IMAGE, editable="true",
                  maxSubmissions="1", rows="3", transcription="true")
    ET.SubElement(view, "Header", value="description", size="5")
    ET.SubElement(view, "TextArea", name="description", toName=IMAGE, editable="true",
                  maxSubmissions="1", rows="2", placeholder="free description")
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def tasks(rows: list[dict], system: dict[str, list[str]],
          image_url: Callable[[str], str] | str = LOCAL_FILES_PREFIX,
          model_version: str = "tinyldm-auto") -> list[dict]:
    """One import task per image, the auto labels as a prediction, so the annotator corrects
    rather than labels from scratch and the Data Manager can sort by the prediction score.

    `image_url` is a prefix for the (URL-quoted) row path or a function of it; the default
    suits Label Studio's local-files serving with the document root at the repo root."""
    to_url = image_url if callable(image_url) else (lambda p: f"{image_url}{quote(p)}")
    out = []
    for row in rows:
        result, confs = [], []
        for field, allowed in system.items():
            value = row.get(field)
            if not _present(value) or str(value) not in allowed:
                continue  # Label Studio would show a choice the config does not have
            item = {"id": f"{row['id'][:8]}_{field}", "from_name": field, "to_name": IMAGE,
                    "type": "choices", "value": {"choices": [str(value)]}}
            conf = row.get(f"{field}_conf")
            if _present(conf):
                item["score"] = float(conf)
                confs.append(float(conf))
            result.append(item)
        text = str(row["text"]) if _present(row.get("text")) else ""
        if text.strip():
            result.append({"id": f"{row['id'][:8]}_text", "from_name": "text",
                           "to_name": IMAGE, "type": "textarea", "value": {"text": [text]}})
        prediction: dict = {"model_version": model_version, "result": result}
        if confs:
            prediction["score"] = round(sum(confs) / len(confs), 4)
        out.append({"data": {"image": to_url(str(row["path"])), "id": row["id"],
                             "ocr_text": text},
                    "predictions": [prediction]})
    return out


# ------------------------------------------------------------------ reading an export
def _load(path: Path) -> tuple[str, list[dict]]:
    """The export's format ("json" or "json_min") and its items, or a UserError a person can
    act on: the commonest mistakes are a CSV export and our own import-task file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); {_FIX}") from None
    except ValueError:
        raise UserError(f"{path}: not JSON; {_FIX}") from None
    if not isinstance(obj, list) or not all(isinstance(t, dict) for t in obj):
        raise UserError(f"{path}: not a Label Studio export (a JSON list of tasks); {_FIX}")
    if all(isinstance(t.get("data"), dict) for t in obj):
        if not all(isinstance(t.get("annotations"), list) for t in obj):
            raise UserError(f"{path}: tasks without an 'annotations' list, so an import file, "
                            f"not an export; {_FIX}")
        return "json", obj
    if all("data" not in t and "annotations" not in t and "id" in t for t in obj):
        return "json_min", obj
    raise UserError(f"{path}: not a Label Studio export (items need 'data' and 'annotations', "
                    f"or the flat JSON-MIN keys); {_FIX}")


def _image_id(data: dict) -> str:
    """data.id, else the sha256 in the image's file name: our images are <sha256>.<ext>, and a
    UI upload only prefixes the name (data/upload/1/3f2a9c1e-<sha256>.png)."""
    if isinstance(data.get("id"), str) and data["id"]:
        return data["id"]
    name = unquote(str(data.get("image", ""))).rstrip("/").rsplit("/", 1)[-1].rsplit("=", 1)[-1]
    found = _SHA.search(name)
    return found.group(0) if found else name.rsplit(".", 1)[0]


def _values(value: object) -> list[str] | None:
    """A result value as a list of strings: {"choices": [...]} or {"text": [...]}, and the
    JSON-MIN shorthands (a bare string, or a list of results)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        got = value.get("choices", value.get("text"))
        return [str(v) for v in got] if isinstance(got, list) else None
    if isinstance(value, list):
        parts = [_values(v) for v in value]
        return None if any(p is None for p in parts) else [v for p in parts for v in p]
    return None


def _full_annotations(task: dict) -> list[dict]:
    """Annotations of a JSON-export task as {id, updated, cancelled, results}; a result is
    (from_name, values or None, unchanged). Unchanged means the annotator left the prediction's
    value as it was: judged against the prediction in the export when there is one (origin is
    only a UI hint), else by origin == "prediction"."""
    preds = {p.get("id"): p for p in task.get("predictions") or [] if isinstance(p, dict)}
    out = []
    for ann in task["annotations"]:
        if not isinstance(ann, dict):
            continue
        pred = preds.get(ann.get("parent_prediction")) or next(reversed(preds.values()), {})
        predicted = {r.get("from_name"): _values(r.get("value"))
                     for r in pred.get("result") or [] if isinstance(r, dict)}
        results = []
        for r in ann.get("result") or []:
            if not isinstance(r, dict) or "from_name" not in r:
                continue  # relations and the like carry no field
            values = _values(r.get("value"))
            if r["from_name"] in predicted:
                unchanged = values == predicted[r["from_name"]]
            else:
                unchanged = r.get("origin") == "prediction"
            results.append((r["from_name"], values, unchanged))
        out.append({"id": ann.get("id"), "updated": ann.get("updated_at") or ann.get("created_at"),
                    "cancelled": bool(ann.get("was_cancelled") or ann.get("skipped")),
                    "results": results})
    return out


def _tasks_of(fmt: str, items: list[dict]) -> list[tuple[object, str, list[dict]]]:
    """(Label Studio task id, image id, annotations) per task, whichever the export format.
    JSON-MIN has one record per non-cancelled annotation and overwrites data.id with the task
    id, so records are grouped by task and the image id comes from the file name; it carries
    no predictions, so every value in it counts as changed."""
    if fmt == "json":
        return [(t.get("id"), _image_id(t["data"]), _full_annotations(t)) for t in items]
    grouped: dict[object, tuple[object, str, list[dict]]] = {}
    for rec in items:
        data = {"image": rec.get("image"), "id": rec["id"] if isinstance(rec["id"], str) else None}
        task = grouped.setdefault(rec["id"], (rec["id"], _image_id(data), []))
        results = [(k, _values(v), False) for k, v in rec.items() if k not in _MIN_META]
        if rec.get("annotation_id") is not None or results:
            task[2].append({"id": rec.get("annotation_id"), "updated": rec.get("updated_at"),
                            "cancelled": False, "results": results})
    return list(grouped.values())


def read_export(path: Path, known_ids: set[str] | None, system: dict[str, list[str]],
                include_unchanged: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Manual labels from a Label Studio export (JSON, or JSON-MIN): one row per image whose
    latest non-cancelled annotation changed something, with `id` and the fields it changed.

    Only changes come back by default because a value the annotator left as predicted is the
    auto label, not new evidence; include_unchanged=True also returns the accepted values.
    Problems are one line each (file, task, image, field) and never stop the rest of the file;
    a file that is no export at all raises UserError. known_ids None accepts any image id."""
    fmt, items = _load(path)
    allowed_names = ", ".join([*system, *TEXT_FIELDS])
    problems: list[str] = []
    chosen: dict[str, tuple[str, object, dict]] = {}  # image id -> (updated, task id, row)
    for task_id, image_id, anns in _tasks_of(fmt, items):
        where = f"{path}: task {task_id} (image {image_id[:16]})"
        live = [a for a in anns if not a["cancelled"]]
        if not anns:
            continue  # not reviewed yet
        if not live:
            problems.append(f"{where}: only cancelled (skipped) annotations; task skipped")
            continue
        if known_ids is not None and image_id not in known_ids:
            problems.append(f"{where}: unknown image id; task skipped")
            continue
        ann = max(live, key=lambda a: str(a["updated"] or ""))
        if len(live) > 1:
            problems.append(f"{where}: {len(live)} annotations; using the latest, annotation "
                            f"{ann['id']} (updated {ann['updated']})")
        row = {}
        for name, values, unchanged in ann["results"]:
            at = f"{where}: field '{name}'"
            if name not in system and name not in TEXT_FIELDS:
                problems.append(f"{at}: unknown field ignored; known: {allowed_names}")
            elif values is None:
                problems.append(f"{at}: no choices or text in the result; ignored")
            elif name in TEXT_FIELDS:
                if include_unchanged or not unchanged:
                    row[name] = "\n".join(values)
            elif len(values) > 1:
                problems.append(f"{at}: several choices {values}; ignored (one is allowed)")
            elif values and values[0] not in system[name]:
                problems.append(f"{at}: '{values[0]}' is not one of "
                                f"{', '.join(system[name])}; ignored")
            elif values and (include_unchanged or not unchanged):
                row[name] = values[0]
        if not row:
            continue
        if image_id in chosen:
            other = chosen[image_id]
            keep = max(other, (str(ann["updated"] or ""), task_id, row), key=lambda c: c[0])
            problems.append(f"{where}: image also annotated in task {other[1]}; using task "
                            f"{keep[1]}, the later")
            chosen[image_id] = keep
        else:
            chosen[image_id] = (str(ann["updated"] or ""), task_id, row)
    fields = [f for f in [*system, *TEXT_FIELDS] if any(f in c[2] for c in chosen.values())]
    table = pd.DataFrame([{"id": i, **{f: c[2].get(f, "") for f in fields}}
                          for i, c in chosen.items()], columns=["id", *fields], dtype=str)
    return table, problems


def import_export(src: Path, dest_dir: Path, known_ids: set[str] | None,
                  system: dict[str, list[str]]) -> tuple[Path, int, list[str]]:
    """Check a downloaded export and file it under dest_dir (labels/manual/) unchanged, so the
    labels stage reads the annotator's own file and DVC versions it; a bad file is refused
    before anything is written. Returns the destination, the annotated rows, the problems."""
    rows, problems = read_export(Path(src), known_ids, system)
    stem = Path(src).stem.removeprefix("labelstudio-")
    dest = Path(dest_dir) / f"labelstudio-{stem}.json"
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest, len(rows), problems


# ------------------------------------------------------------------ CLI: labels export | import
def write_labelstudio(df: pd.DataFrame, system: dict[str, list[str]],
                      folder: Path = LS_TASKS.parent, image_url: str = LOCAL_FILES_PREFIX
                      ) -> tuple[Path, Path]:
    """The Label Studio project files: the labelling config and one task per image with the
    current labels as a prediction (to review rather than label from scratch)."""
    config, tasks_json = Path(folder) / LS_CONFIG.name, Path(folder) / LS_TASKS.name
    atomic_write_text(config, labeling_config(system))
    write_json(tasks_json, tasks(df.to_dict("records"), system, image_url))
    return config, tasks_json


def export(params: Params, folder: Path, image_url: str) -> tuple[Path, Path, int]:
    """The Label Studio project files for the current labels, into `folder`."""
    df = read_table(CAPTIONS, "captions")
    config, tasks_json = write_labelstudio(df, label_system(params), Path(folder), image_url)
    return config, tasks_json, len(df)


def import_labels(params: Params, src: Path) -> tuple[Path, int, list[str]]:
    """A Label Studio export -> labels/manual/ (checked first; the labels stage merges it)."""
    known = (set(read_table(VALID_MANIFEST, "validated_manifest")["id"])
             if Path(VALID_MANIFEST).exists() else None)
    return import_export(Path(src), Path(MANUAL_LABELS), known, label_system(params))
