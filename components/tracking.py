"""MLflow for every stage: where the store is, the run a stage logs into, and live logging.

One parent run per pipeline run (`tinyldm run` opens it; `register` opens one when a stage
ran on its own, e.g. under `dvc repro`); each stage that runs logs into a nested run of its
own name while it runs: its params, then loss curves, val PSNR and sample grids as they
come (`log_metrics`, `log_image`: no-ops when no run is active, so components stay usable
from a notebook or a test with no MLflow at all).

Embedded default, nothing to start: a SQLite store `mlflow.db` and an artifact folder
`mlartifacts/` in the working directory. MLFLOW_TRACKING_URI points elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.config import redact
from components.contracts import read_json, write_json
from components.stages import DVC_YAML, dvc_stages

PARENT_RUN_ENV = "TINYLDM_PARENT_RUN_ID"  # the pipeline's run, for the stages it runs
STAGE_RUNS = Path(".cache") / "mlflow" / "stage_runs.json"  # stage -> its latest run id


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve()}/mlflow.db"


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def setup_store(experiment: str | None = None) -> None:
    """Point MLflow at the store; create the experiment (artifacts in ./mlartifacts for a
    local store, the server's default otherwise) on first use."""
    import mlflow

    for name in ("mlflow.store.db.utils", "alembic"):  # "creating tables": noise to a user
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if experiment is None:
        return
    if mlflow.get_experiment_by_name(experiment) is None:
        location = (Path.cwd() / "mlartifacts").resolve().as_uri() if _is_local(uri) else None
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except Exception:  # created meanwhile by a concurrent run: use theirs
            if mlflow.get_experiment_by_name(experiment) is None:
                raise
    mlflow.set_experiment(experiment)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists stay leaves (logged as JSON)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def param_value(v: Any) -> str:
    """A param as MLflow stores it: text, a URL's credentials redacted, within its limit."""
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return redact(s)[:6000]  # MLflow's param value limit


def numeric(flat: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in flat.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def metric_key(key: str) -> str:
    return re.sub(r"[^\w\-./ :]", "_", key)  # MLflow allows only these characters


def stage_sections(stage: str, root: Path) -> list[str]:
    """Params keys a stage depends on: its `params:` in dvc.yaml (the source of truth), or
    the params section of the same name."""
    dvc = root / DVC_YAML
    if dvc.exists():
        keys: list[str] = []
        for item in (dvc_stages(dvc).get(stage) or {}).get("params", []):
            if isinstance(item, str):
                keys.append(item)
            elif isinstance(item, dict):  # {file: [keys]}
                for v in item.values():
                    keys.extend(v or [])
        if keys:
            return keys
    return [stage]


def select_params(all_params: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    flat = flatten(all_params)
    return {k: v for k, v in flat.items()
            if any(k == key or k.startswith(key + ".") for key in keys)}


# ------------------------------------------------------------------ the pipeline's run tree
@contextlib.contextmanager
def pipeline_run(experiment: str) -> Iterator[str]:
    """The parent run of one pipeline run (`tinyldm run`, a retraining run): open for as long
    as the DAG runs, its id in the environment so every stage it starts (DVC runs each as
    a child process) nests its run under it; `register` then logs the model there. A run
    in which no stage ran (all up to date) is deleted rather than left empty."""
    import mlflow

    setup_store(experiment)
    client = mlflow.MlflowClient()
    run = client.create_run(mlflow.get_experiment_by_name(experiment).experiment_id,
                            run_name="pipeline", tags={"tinyldm.kind": "pipeline"})
    run_id = run.info.run_id
    before = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = run_id
    try:
        yield run_id
    finally:
        if before is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = before
        children = client.search_runs([run.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{run_id}'")
        if not children and not client.get_run(run_id).data.metrics:
            client.delete_run(run_id)
        elif client.get_run(run_id).info.status == "RUNNING":
            failed = any(c.info.status == "FAILED" for c in children)
            client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


@contextlib.contextmanager
def stage_run(stage: str, all_params: dict[str, Any], experiment: str,
              root: Path = Path(".")) -> Iterator[str]:
    """The MLflow run of one stage while it runs: named as the stage, nested under the
    pipeline's run when there is one (PARENT_RUN_ENV), holding the params the stage
    depends on; `log_metrics` and `log_image` write to it live. Real start and end times;
    FAILED when the stage raises. Its id is recorded in STAGE_RUNS for `register`."""
    import mlflow

    setup_store(experiment)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    with mlflow.start_run(run_name=stage, parent_run_id=parent,
                          tags={"tinyldm.stage": stage}) as run:
        runs = read_json(STAGE_RUNS) if STAGE_RUNS.exists() else {}
        write_json(STAGE_RUNS, runs | {stage: run.info.run_id})
        sel = select_params(all_params, stage_sections(stage, root))
        if sel:
            mlflow.log_params({k: param_value(v) for k, v in sel.items()})
        yield run.info.run_id


def active() -> bool:
    """Whether a run is active in this thread (so that work done only to log can be
    skipped)."""
    if "mlflow" not in sys.modules:  # never imported: no run can be active
        return False
    import mlflow

    return mlflow.active_run() is not None


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Metrics to the active run (a stage's, live), at `step`; nothing when none is active,
    so the training code runs the same without MLflow (a notebook, a test, a bench)."""
    if active():
        import mlflow

        mlflow.log_metrics({metric_key(k): v for k, v in numeric(metrics).items()}, step=step)


def log_image(image: Any, name: str) -> None:
    """A PIL image as an artifact of the active run (a sample grid during training)."""
    if active():
        import mlflow

        mlflow.log_image(image, name)
