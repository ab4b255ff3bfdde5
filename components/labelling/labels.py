"""The labels stage: auto labels for every validated image, manual labels over them,
captions, the split, Label Studio tasks, and (on the built-in data) each field's accuracy
against the generator's ground truth. Also `tinyldm labels stats`."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import Brand, Labels, Params
from components.contracts import (
    CAPTIONS,
    DISAGREEMENTS,
    GROUND_TRUTH,
    LABEL_FIELDS,
    OCR_TABLE,
    SCHEMAS,
    SPLIT,
    VALID_MANIFEST,
    UserError,
    open_rgb,
    read_table,
    write_csv,
    write_table,
)
from components.fanout import Mapper, check_worker, fan_out
from components.labelling.captions import caption, token_counts
from components.labelling.labeller import auto_labels, dominant_colours, label_system
from components.labelling.labelstudio import (
    write_labelstudio,
)
from components.labelling.manual import apply_manual, read_manual
from components.labelling.text_boxes import dumps, from_ocr, loads, retext
from components.models.buckets import nearest

ACCURACY_FIELDS = ["background", "background_kind", "gradient_to", "layout", "figure_size",
                   "saturation", "logo"]  # the attributes the built-in generator records


def split_of(image_id: str, cfg: Labels) -> str:
    """Deterministic split from the content hash: an image never changes split."""
    u = int(image_id[:8], 16) / 0x1_0000_0000
    if u < cfg.split.train:
        return "train"
    return "val" if u < cfg.split.train + cfg.split.val else "test"


@dataclass(frozen=True)
class LabelJob:
    """All a worker needs besides the images: plain, picklable settings."""
    brand: Brand  # logo paths absolute, so a worker in another folder finds them
    labels: Labels
    root: str  # the repository folder; image paths are relative to it


def _item(rec: dict, ocr: pd.DataFrame) -> dict:
    """One image's work item: its path and OCR reading, as plain data."""
    o = ocr.loc[rec["id"]] if rec["id"] in ocr.index else None
    return {"id": rec["id"], "path": rec["path"],
            "words": str(o["words"] or "") if o is not None else "",
            "text": str(o["text"]) if o is not None else "",
            "text_conf": round(float(o["mean_conf"]) / 100, 4) if o is not None else 0.0}


def _label_one(item: dict, job: LabelJob) -> dict:
    words = json.loads(item["words"]) if item["words"] else []
    im = open_rgb(Path(job.root) / item["path"])
    row = auto_labels(im, words, job.brand, job.labels)
    row["dominant_colours"] = dominant_colours(im)
    row = {"id": item["id"], "path": item["path"], **row, "text": item["text"],
           "text_conf": item["text_conf"], "description": "", "description_conf": 0.0,
           "split": split_of(item["id"], job.labels)}
    for f in LABEL_FIELDS:
        row[f"{f}_provenance"] = {"text": "ocr", "description": "none"}.get(f, "auto")
    boxes = from_ocr(words, im.width, im.height)
    row["text_boxes"], row["text_boxes_provenance"] = dumps(boxes), "ocr" if boxes else "none"
    return row


def label_chunk(job: LabelJob, items: list[dict]) -> list[dict]:
    """Auto-label a chunk of images wherever it runs (a thread here, a process, a Dask
    worker)."""
    check_worker(job.root)
    return [_label_one(item, job) for item in items]


def labels(params: Params, mapper: Mapper | None = None) -> dict:
    """Auto labels, manual labels over them, captions, split, Label Studio tasks. `mapper`
    fans the images out (flows/fanout.py); None: this process's thread pool."""
    cfg = params.labels
    manifest = read_table(VALID_MANIFEST, "validated_manifest")
    ocr = read_table(OCR_TABLE, "ocr").set_index("id")
    if manifest.empty:
        raise UserError(f"{VALID_MANIFEST}: no valid images to label")
    items = [_item(r, ocr) for r in manifest.to_dict("records")]
    root = Path.cwd()
    brand = params.brand.model_copy(update={"logos": [str(root / p)
                                                      for p in params.brand.logos]})
    job = LabelJob(brand, cfg, str(root))
    threads = os.cpu_count() or 1  # OpenCV and numpy free the GIL
    rows = fan_out(functools.partial(label_chunk, job), items, mapper,
                   params.scale.chunk_size, threads, "labels")
    df = pd.DataFrame(rows)
    size = manifest.set_index("id").loc[df["id"], ["width", "height"]].to_numpy()
    df["format"] = [nearest(w, h, params.formats.buckets) for w, h in size]

    system = label_system(params)
    manual, problems = read_manual(manifest, system)
    df = with_truth_boxes(df)
    df, disagreements = apply_manual(df, manual)
    corrected = df["text_provenance"] == "manual"  # a corrected transcription keeps its box
    df.loc[corrected, "text_boxes"] = [dumps(retext(loads(b), t)) for b, t in
                                       zip(df.loc[corrected, "text_boxes"],
                                           df.loc[corrected, "text"], strict=True)]
    df["caption"] = [caption(r, cfg.caption_template) for r in df.to_dict("records")]
    df["caption_tokens"], limit = token_counts(params, df["caption"].tolist())
    over = df[df["caption_tokens"] > limit] if limit else df.iloc[:0]
    policy = params.text_encoder.policy
    if len(over) and policy == "error":
        raise UserError(f"labels: {len(over)} caption(s) are over the text encoder's "
                        f"{limit}-token limit (e.g. image {over['id'].iloc[0][:16]}: "
                        f"{over['caption_tokens'].iloc[0]} tokens); shorten the template or "
                        "descriptions, or set text_encoder.policy to truncate or chunk")
    write_table(df[SCHEMAS["captions"].names], CAPTIONS, "captions")
    # apart, so an edited label or caption does not retrain the VAE (it only needs the split)
    write_table(df[SCHEMAS["split"].names], SPLIT, "split")
    write_csv(DISAGREEMENTS, ["id", "field", "manual", "auto", "auto_conf"],
              [tuple(d.values()) for d in disagreements])
    write_labelstudio(df, system)

    metrics: dict = {"images": len(df), "manual_images": len(manual),
                     "manual_problems": len(problems),
                     "manual_disagreements": len(disagreements),
                     "captions_over_limit": len(over),
                     "captions_over_limit_share": round(len(over) / len(df), 4),
                     "caption_tokens_max": int(df["caption_tokens"].max()),
                     "caption_tokens_mean": round(float(df["caption_tokens"].mean()), 1),
                     **{f"split_{s}": int((df["split"] == s).sum())
                        for s in ("train", "val", "test")}}
    if len(over):
        print(f"labels: {len(over)} caption(s) ({len(over) / len(df):.1%}) over the "
              f"{limit}-token limit; policy {policy}")
    metrics |= accuracy(df)
    metrics |= {f"text_boxes_{k}": int(v)
                for k, v in df["text_boxes_provenance"].value_counts().items()}
    metrics |= {f"format_{k}": int(v) for k, v in df["format"].value_counts().items()}
    for line in problems:
        print(f"labels: {line}")
    if disagreements:
        print(f"labels: {len(disagreements)} manual label(s) overrule a confident auto label; "
              f"listed in {DISAGREEMENTS}")
    return metrics


def with_truth_boxes(df: pd.DataFrame) -> pd.DataFrame:
    """The generator's own text boxes (ground truth) over OCR's, for the images it drew."""
    if not Path(GROUND_TRUTH).exists():
        return df
    gt = read_table(GROUND_TRUTH, "ground_truth").set_index("id")["text_boxes"]
    known = df["id"].isin(gt.index)
    df = df.copy()
    df.loc[known, "text_boxes"] = gt.loc[df.loc[known, "id"]].to_numpy()
    df.loc[known, "text_boxes_provenance"] = "truth"
    return df


def accuracy(df: pd.DataFrame) -> dict[str, float]:
    """Per attribute, the share of auto labels equal to the generator's ground truth."""
    if not Path(GROUND_TRUTH).exists():
        return {}
    gt = read_table(GROUND_TRUTH, "ground_truth").set_index("id")
    gt["logo"] = gt["logo"].map({True: "yes", False: "no"})
    gt["gradient_to"] = gt["gradient_to"].replace("", "none")
    both = df[df["id"].isin(gt.index)].set_index("id")
    if both.empty:
        return {}
    return {f"accuracy_{f}": round(float((both[f] == gt.loc[both.index, f]).mean()), 4)
            for f in ACCURACY_FIELDS}


def stats(params: Params) -> str:
    """Coverage of every field by source, caption lengths in tokens, split sizes."""
    df = read_table(CAPTIONS, "captions")
    lines = [f"{len(df)} images; split: " + ", ".join(
        f"{k} {v}" for k, v in df["split"].value_counts().items())]
    lines.append(f"{'field':<16} {'manual':>7} {'auto':>7} {'ocr':>7} {'empty':>7}  "
                 "mean confidence (auto)")
    for f in LABEL_FIELDS:
        prov = df[f"{f}_provenance"].value_counts()
        empty = int((df[f].fillna("") == "").sum())
        auto = df.loc[df[f"{f}_provenance"] == "auto", f"{f}_conf"]
        conf = f"{auto.mean():.3f}" if len(auto) else "-"
        lines.append(f"{f:<16} {prov.get('manual', 0):>7} {prov.get('auto', 0):>7} "
                     f"{prov.get('ocr', 0):>7} {empty:>7}  {conf}")
    _, limit = token_counts(params, [])
    tokens = df["caption_tokens"]
    edges = np.histogram_bin_edges(tokens, bins=min(8, max(1, tokens.nunique())))
    counts, edges = np.histogram(tokens, bins=edges)
    lines.append(f"caption tokens (limit {limit or 'none'}; over: "
                 f"{int((tokens > limit).sum()) if limit else 0}):")
    width = max(counts.max(), 1)
    for c, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        lines.append(f"  {lo:5.0f}-{hi:<5.0f} {c:6d} {'#' * round(40 * c / width)}")
    return "\n".join(lines)
