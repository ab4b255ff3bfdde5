"""The Prefect flow: the DAG of dvc.yaml, one task per stage, DVC deciding what is stale.

No stage logic and no second copy of the DAG live here: the order comes from DVC's own
graph, and each task asks DVC to reproduce exactly one stage, so `tinyldm run` and
`dvc repro` write the same dvc.lock.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import networkx as nx
from prefect import flow, get_run_logger, task
from prefect.states import Failed, State

from components.contracts import (
    EVAL_GRIDS,
    EVAL_REPORT,
    REPORTS,
    UserError,
    metrics_path,
    read_json,
    write_json,
)
from flows.cli import venv_on_path

RUN_LOG = REPORTS / "pipeline_run.json"  # per-stage wall times of the last run (bench/ reads it)


def _quiet_dvc() -> None:
    """DVC prints its own lines; stop Prefect's handler printing each a second time, and
    drop the per-stage 'git add dvc.lock' hint (the summary says what ran)."""
    logging.getLogger("dvc").propagate = False
    logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)


def stage_order(root: Path = Path(".")) -> list[str]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        return [s.addressing for s in nx.topological_sort(graph.reverse())]


@task(task_run_name="{name}")
def run_stage(name: str, force: bool = False) -> dict | State:
    """DVC reproduces one stage (or skips it when nothing changed). A failed stage has
    already printed its own one-line error; the task fails with that pointer, no trace."""
    from dvc.exceptions import ReproductionError
    from dvc.repo import Repo

    log = get_run_logger()
    _quiet_dvc()
    t0 = time.monotonic()
    try:
        with Repo(".") as repo:
            ran = repo.reproduce(targets=[name], single_item=True, force=force)
    except ReproductionError:
        return Failed(message=f"stage {name} failed; its error is printed above. Fix it and "
                              "run again: finished stages are not redone")
    seconds = round(time.monotonic() - t0, 1)
    log.info("stage %s: %s in %.1f s", name, "ran" if ran else "up to date", seconds)
    return {"stage": name, "ran": bool(ran), "seconds": seconds}


def _metric(stage: str, key: str):
    path = metrics_path(stage)
    return read_json(path).get(key) if path.exists() else None


def summary(results: list[dict]) -> str:
    def fmt(v, spec=""):
        return "n/a" if v is None else format(v, spec)

    val_in, quarantined = _metric("validate", "images_in"), _metric("validate", "quarantined")
    lines = ["", "tinyldm run summary",
             "  stages:       " + ", ".join(f"{r['stage']} {'ran' if r['ran'] else 'cached'}"
                                           f" {r['seconds']}s" for r in results),
             f"  images:       {fmt(val_in)} in, {fmt(quarantined)} quarantined",
             f"  OCR CER:      {fmt(_metric('ocr', 'cer'), '.4f')} (vs generator ground truth)",
             f"  VAE PSNR:     {fmt(_metric('vae', 'val_psnr'), '.2f')} dB (val)",
             "  adherence:    " + ", ".join(
                 f"{f} {fmt(_metric('evaluate', f'prompt_adherence_{f}'), '.3f')}"
                 for f in ("background", "background_kind", "saturation", "layout", "logo"))
             + " (auto-labels of generated images = the prompt)",
             f"  fidelity:     FD {fmt(_metric('evaluate', 'fd'), '.3f')}, KID "
             f"{fmt(_metric('evaluate', 'kid'), '.4f')}, text recall "
             f"{fmt(_metric('evaluate', 'text_recall'), '.3f')} (generated vs real val)",
             f"  model:        {_metric('register', 'model_uri') or 'n/a'} -> alias "
             f"{_metric('register', 'alias') or 'n/a'}",
             f"  report:       {EVAL_REPORT} (grids in {EVAL_GRIDS}/)"]
    return "\n".join(lines)


@flow(name="tinyldm-pipeline", log_prints=True)
def pipeline(force: bool = False) -> list[dict] | State:
    venv_on_path()  # dvc.yaml calls `tinyldm stage ...` through the shell
    order = stage_order()
    results = []
    for i, name in enumerate(order, 1):
        print(f"[{i}/{len(order)}] {name}")
        state = run_stage(name, force, return_state=True)
        if state.is_failed():
            return Failed(message=state.message)
        results.append(state.result())
    write_json(RUN_LOG, results)
    print(summary(results))
    return results


def run_pipeline(force: bool = False) -> list[dict]:
    """The flow, with a failed stage turned into one UserError line for the CLI."""
    state = pipeline(force=force, return_state=True)
    if state.is_failed():
        raise UserError(state.message or "pipeline failed; see the messages above")
    return state.result()
