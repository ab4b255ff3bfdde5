"""Decide which collected images are fit to train on, and say why the others are not.

A Great Expectations suite runs over the raw manifest joined with OCR error info. Every
row an expectation flags goes to the quarantine table with a reason a person can act on
("too small: 20x20 < 32"); the rest form the validated manifest. The GX result and suite
are kept as JSON beside the data so a run can be audited later.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.config import Params, Validate
from components.contracts import (
    OCR_TABLE,
    QUARANTINE,
    RAW_MANIFEST,
    VALID_MANIFEST,
    VALIDATION_REPORT,
    UserError,
    read_table,
    write_json,
    write_table,
)
from components.models.buckets import aspect_range

GX_RESULTS = VALIDATION_REPORT / "gx_results.json"
GX_SUITE = VALIDATION_REPORT / "suite.json"
ID_PATTERN = r"^[0-9a-f]{64}$"


def build_frame(manifest: pd.DataFrame, ocr: pd.DataFrame | None) -> pd.DataFrame:
    """Manifest plus the derived columns the suite checks (aspect, file presence, OCR)."""
    df = manifest.reset_index(drop=True).copy()
    df["aspect"] = (df["width"] / df["height"].replace(0, np.nan)).astype(float)  # w / h
    df["file_exists"] = [bool(p) and Path(p).is_file() for p in df["path"]]
    if ocr is None:
        df["ocr_error"], df["ocr_conf"], df["ocr_text"] = "ocr not run", 0.0, ""
    else:
        o = ocr.drop_duplicates("id").set_index("id")
        df["ocr_error"] = df["id"].map(o["error"]).fillna("missing from ocr table")
        df["ocr_conf"] = df["id"].map(o["mean_conf"]).fillna(0.0).astype(float)
        df["ocr_text"] = df["id"].map(o["text"]).fillna("")
    return df


def build_suite(cfg: Validate, aspects: tuple[float, float]) -> Any:
    """The expectations; meta.reason names the quarantine reason kind of each. `aspects`:
    the narrowest and widest width / height the format buckets take."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    def meta(kind: str) -> dict:
        return {"reason": kind}

    suite = gx.ExpectationSuite(name="raw_manifest")
    for e in [
        gxe.ExpectColumnValuesToNotBeNull(column="id", meta=meta("null_id")),
        gxe.ExpectColumnValuesToBeUnique(column="id", meta=meta("duplicate_id")),
        gxe.ExpectColumnValuesToMatchRegex(column="id", regex=ID_PATTERN,
                                           meta=meta("bad_id")),
        gxe.ExpectColumnValuesToBeInSet(column="format", value_set=list(cfg.formats),
                                        meta=meta("format")),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=cfg.min_side,
                                          max_value=cfg.max_side, meta=meta("size")),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=cfg.min_side,
                                          max_value=cfg.max_side, meta=meta("size")),
        gxe.ExpectColumnValuesToBeBetween(column="aspect", min_value=aspects[0],
                                          max_value=aspects[1], meta=meta("aspect")),
        gxe.ExpectColumnValuesToBeBetween(column="bytes", min_value=1,
                                          meta=meta("empty_file")),
        gxe.ExpectColumnValuesToBeInSet(column="file_exists", value_set=[True],
                                        meta=meta("file_missing")),
        gxe.ExpectColumnValuesToBeInSet(column="near_duplicate_of", value_set=[""],
                                        meta=meta("near_duplicate")),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_std", min_value=cfg.min_pixel_std,
                                          meta=meta("blank")),
        # Dataset health, not a row verdict: an image whose OCR failed can still train.
        gxe.ExpectColumnValuesToBeInSet(column="ocr_error", value_set=["", "not an image"],
                                        mostly=1 - cfg.max_ocr_error_share,
                                        meta={"reason": None}),
        gxe.ExpectColumnValuesToBeBetween(column="ocr_conf", min_value=0, max_value=100,
                                          meta={"reason": None}),
        gxe.ExpectColumnValueLengthsToBeBetween(column="ocr_text",
                                                max_value=cfg.max_text_chars,
                                                mostly=1 - cfg.max_long_text_share,
                                                meta={"reason": None}),
        gxe.ExpectTableRowCountToBeBetween(min_value=1, meta={"reason": None}),
    ]:
        suite.add_expectation(e)
    return suite


GX_RUN_KEYS = {"id", "validation_id", "run_id", "validation_time", "ge_load_time"}


def without_run_ids(doc: Any) -> Any:
    """A Great Expectations document without what only names the run (random ids, times):
    a re-run over the same manifest writes the same bytes, so the report's DVC hash
    changes only with the results. Expectations stay matched by type and kwargs."""
    if isinstance(doc, dict):
        return {k: without_run_ids(v) for k, v in doc.items() if k not in GX_RUN_KEYS}
    if isinstance(doc, list):
        return [without_run_ids(v) for v in doc]
    return doc


def run_suite(df: pd.DataFrame, cfg: Validate, aspects: tuple[float, float]) -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # ms of work
    asset = context.data_sources.add_pandas("tinyldm").add_dataframe_asset("raw_manifest")
    batch = asset.add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(build_suite(cfg, aspects))
    vd = context.validation_definitions.add(
        gx.ValidationDefinition(name="validate", data=batch, suite=suite))
    return vd.run(batch_parameters={"dataframe": df},
                  result_format={"result_format": "COMPLETE"}), suite


def row_reason(kind: str, row: pd.Series, cfg: Validate, aspects: tuple[float, float]
               ) -> str:
    """One human-readable sentence for one failed check on one row."""
    w, h = int(row["width"]), int(row["height"])
    if kind == "format":
        return f"format {row['format']} not in {list(cfg.formats)}"
    if kind == "size":
        if min(w, h) < cfg.min_side:
            return f"too small: {w}x{h} < {cfg.min_side}"
        return f"too large: {w}x{h} > {cfg.max_side}"
    if kind == "aspect":
        return (f"aspect ratio {w}:{h} ({row['aspect']:.2f}) outside {aspects[0]:.2f}.."
                f"{aspects[1]:.2f}, the format buckets stretched by formats.max_stretch; add "
                "a bucket in formats.buckets to train on it")
    return {"null_id": "missing id", "duplicate_id": "duplicate id",
            "bad_id": f"id {row['id']!r} is not a sha256 hex digest",
            "empty_file": "empty file (0 bytes)",
            "file_missing": f"file {row['path']} is missing",
            "near_duplicate": f"near duplicate of {row['near_duplicate_of'][:16]} (a larger "
                              "copy is kept)",
            "blank": f"blank: pixel spread {row['pixel_std']:.2f} < {cfg.min_pixel_std:g}"
            }.get(kind, kind)


def quarantine_reasons(df: pd.DataFrame, result: Any, cfg: Validate,
                       aspects: tuple[float, float]) -> dict[int, list[tuple[str, str]]]:
    """Row index -> [(reason kind, reason text)], from each unexpected_index_list."""
    out: dict[int, list[tuple[str, str]]] = {}
    undecodable = set(df.index[df["format"] == ""])
    first_of_id = ~df["id"].duplicated(keep="first")
    for i in undecodable:  # one reason says it all; sizes of nothing are noise
        why = df.at[i, "decode_error"] or "not an image"
        kind = ("decompression_bomb" if why.startswith("decompression bomb") else
                "empty_file" if why.startswith("empty file") else "not_an_image")
        out[i] = [(kind, why)]
    for r in result.results:
        kind = (r.expectation_config.meta or {}).get("reason")
        if r.success or not kind:
            continue
        for idx in r.result.get("unexpected_index_list") or []:
            i = int(idx["index"] if isinstance(idx, dict) else idx)
            if i in undecodable or (kind == "duplicate_id" and first_of_id[i]):
                continue  # keep the first copy of a duplicated id
            item = (kind, row_reason(kind, df.loc[i], cfg, aspects))
            if item not in out.setdefault(i, []):
                out[i].append(item)
    return out


def dataset_problems(result: Any, cfg: Validate) -> list[str]:
    """The dataset-health checks that failed (expectations without a quarantine reason:
    their rows are kept), one line each naming what to look at. A quarantined row also
    fails the GX suite, so gx_success alone cannot tell a run with a few bad files from
    one whose OCR broke."""
    out = []
    for r in result.results:
        if r.success or (r.expectation_config.meta or {}).get("reason"):
            continue
        column = r.expectation_config.kwargs.get("column")
        share = (r.result.get("unexpected_percent") or 0.0) / 100
        if column == "ocr_error":
            out.append(f"{share:.1%} of images failed OCR (validate.max_ocr_error_share "
                       f"{cfg.max_ocr_error_share:g}): see the error column of {OCR_TABLE}; "
                       "check Tesseract and ocr.lang")
        elif column == "ocr_text":
            out.append(f"{share:.1%} of images read over {cfg.max_text_chars} characters of "
                       f"text (validate.max_long_text_share {cfg.max_long_text_share:g}): "
                       "documents or photos among the sources? check scrape.sources, or "
                       "raise validate.max_text_chars")
        elif column == "ocr_conf":
            out.append(f"OCR confidences outside 0-100 in {OCR_TABLE}: re-run the ocr stage "
                       "with --force")
        else:
            out.append(f"{r.expectation_config.type} failed; see {GX_RESULTS}")
    return out


def validate(params: Params) -> dict:
    cfg = params.validate_
    manifest = read_table(RAW_MANIFEST, "raw_manifest")
    ocr = read_table(OCR_TABLE, "ocr") if OCR_TABLE.exists() else None
    df = build_frame(manifest, ocr)
    aspects = aspect_range(params.formats.buckets, params.formats.max_stretch)
    result, suite = run_suite(df, cfg, aspects)
    reasons = quarantine_reasons(df, result, cfg, aspects)

    bad = sorted(reasons)
    quarantine = pd.DataFrame({"id": df.loc[bad, "id"].astype(str),
                               "path": df.loc[bad, "path"].astype(str),
                               "reasons": ["; ".join(t for _k, t in reasons[i]) for i in bad]})
    valid = manifest.reset_index(drop=True).drop(index=bad)
    write_table(quarantine, QUARANTINE, "quarantine")
    write_json(GX_RESULTS, without_run_ids(result.to_json_dict()))
    write_json(GX_SUITE, without_run_ids(json.loads(json.dumps(suite.to_json_dict(),
                                                               default=str))))
    if valid.empty:
        raise UserError(f"validate: no image passed validation; see the reasons in "
                        f"{QUARANTINE} (and {GX_RESULTS})")
    write_table(valid, VALID_MANIFEST, "validated_manifest")

    failed = [r for r in result.results if not r.success]
    problems = dataset_problems(result, cfg)
    for line in problems:
        print(f"validate: dataset check failed: {line}", file=sys.stderr)
    counts = Counter(k for i in bad for k, _t in reasons[i])
    return {"images_in": len(df), "valid": len(valid), "quarantined": len(bad),
            "quarantine_reasons": dict(sorted(counts.items())),
            "gx_success": bool(result.success), "expectations": len(result.results),
            "expectations_failed": len(failed),
            # rows are quarantined above; these are the checks on the data as a whole
            "dataset_problems": problems,
            "ocr_errors": int((~df["ocr_error"].isin(["", "not an image"])).sum()),
            # kept, read as RGB by every stage (contracts.to_rgb): worth knowing, not a fault
            "converted_modes": {str(k): int(v) for k, v in valid.loc[
                ~valid["mode"].isin(cfg.modes), "mode"].value_counts().items()},
            "animated_first_frame": int((valid["frames"] > 1).sum())}
