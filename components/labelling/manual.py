"""Manual labels: CSV files and Label Studio exports under labels/manual/, merged over the
auto labels (they win; where one overrules a confident auto label it is listed)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd

from components.contracts import (
    MANUAL_LABELS,
    TEXT_FIELDS,
    UserError,
)
from components.labelling.labelstudio import (
    read_export,
)


def _file_names(manifest: pd.DataFrame) -> dict[str, str | None]:
    """File name -> image id, for labels keyed by file name: the stored name (<sha>.png) and
    the original name of a folder image (None where two images share it)."""
    names: dict[str, str | None] = {}
    for image_id, path, url in manifest[["id", "path", "source_url"]].itertuples(index=False):
        for name in {Path(path).name, Path(unquote(urlparse(url).path)).name}:
            if name:
                names[name] = image_id if names.get(name, image_id) == image_id else None
    return names


def _read_csv(path: Path, ids: set[str], names: dict[str, str | None],
              system: dict[str, list[str]]) -> tuple[list[dict], list[str]]:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    key = next((c for c in ("id", "file", "file_name", "filename") if c in df.columns), None)
    if key is None:
        return [], [f"{path}: no 'id' or 'file' column; file skipped (one row per image: id "
                    "or file name, then any label fields)"]
    known = set(system) | set(TEXT_FIELDS)
    problems = [f"{path}: unknown field '{c}' ignored; known: {', '.join(sorted(known))}"
                for c in df.columns if c != key and c not in known]
    rows = []
    for i, rec in enumerate(df.to_dict("records"), start=2):  # row 1 is the header
        ref = rec[key].strip()
        image_id = ref if ref in ids else names.get(Path(ref).name) if key != "id" else None
        if image_id is None:
            why = ("names two images; use the id" if names.get(Path(ref).name, "") is None
                   else "is not a known image")
            problems.append(f"{path}: row {i}: {key} {ref[:40]!r} {why}")
            continue
        row = {"id": image_id}
        for field, value in rec.items():
            value = value.strip() if field in system else value
            if field not in known or value == "":
                continue
            if field in system and value not in system[field]:
                problems.append(f"{path}: row {i}: {field}={value!r} is not one of "
                                f"{', '.join(system[field])}; cell ignored")
                continue
            row[field] = value
        rows.append(row)
    return rows, problems


def read_manual(manifest: pd.DataFrame, system: dict[str, list[str]]
                ) -> tuple[pd.DataFrame, list[str]]:
    """Every CSV and Label Studio JSON export under labels/manual/, in name order: one row
    per image with the fields it sets. Problems come back one line each (file, row, field);
    the rest of the file is still used; an image labelled twice keeps the later label."""
    ids, names = set(manifest["id"]), _file_names(manifest)
    merged: dict[str, dict] = {}
    where: dict[str, str] = {}
    problems: list[str] = []
    for path in sorted(Path(MANUAL_LABELS).glob("*")):
        if path.suffix == ".csv":
            rows, found = _read_csv(path, ids, names, system)
        elif path.suffix == ".json":  # a Label Studio export (tinyldm labels import)
            try:  # values the annotator accepted count too: a person checked them
                df, found = read_export(path, ids, system, include_unchanged=True)
            except UserError as e:
                problems.append(f"{e}; file skipped")
                continue
            rows = [{k: v for k, v in r.items() if v != ""} for r in df.to_dict("records")]
        else:
            continue
        problems += found
        for row in rows:
            if row["id"] in where:
                problems.append(f"{path}: image {row['id'][:16]} labelled again (before in "
                                f"{where[row['id']]}); where both set a field, this one wins")
            where[row["id"]] = path.name
            merged.setdefault(row["id"], {}).update(row)
    return pd.DataFrame(list(merged.values()), columns=["id", *system, *TEXT_FIELDS]), problems


def apply_manual(df: pd.DataFrame, manual: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """Manual values over auto ones (provenance manual, confidence 1); also returns where a
    manual label overrules a confident (>= 0.9) auto label: often a labelling mistake."""
    disagreements = []
    df = df.set_index("id")
    for rec in manual.to_dict("records"):
        for field, value in rec.items():
            if field == "id" or pd.isna(value) or value == "":
                continue
            auto, conf = df.at[rec["id"], field], df.at[rec["id"], f"{field}_conf"]
            if field not in TEXT_FIELDS and auto != value and conf >= 0.9:
                disagreements.append({"id": rec["id"], "field": field, "manual": value,
                                      "auto": auto, "auto_conf": conf})
            df.at[rec["id"], field] = value
            df.at[rec["id"], f"{field}_provenance"] = "manual"
            df.at[rec["id"], f"{field}_conf"] = 1.0
    return df.reset_index(), disagreements
