"""The Prefect flow: the DAG of dvc.yaml, one task per stage, DVC deciding what is stale.

No stage logic and no second copy of the DAG live here: the order comes from DVC's own
graph, and each task asks DVC to reproduce exactly one stage, so `tinyldm run` and
`dvc repro` write the same dvc.lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import networkx as nx
from prefect import flow, get_run_logger, task
from prefect.states import Failed, State

from components import tracking
from components.config import load_params
from components.contracts import (
    EVAL_GRIDS,
    EVAL_REPORT,
    REPORTS,
    UserError,
    metrics_path,
    read_json,
    write_json,
)
from components.overrides import write_overrides
from flows.env import stage_error_file, venv_on_path

RUN_LOG = REPORTS / "pipeline_run.json"  # per-stage wall times of the last run (bench/ reads it)
# One run of the DAG at a time per workspace (`tinyldm run`, `tinyldm retrain`, scheduled
# runs): an OS file lock, released by the OS when its holder dies, so it is never stale.
WORKSPACE_LOCK = Path(".cache/pipeline.lock")
LOCK_OWNER = WORKSPACE_LOCK.with_suffix(".owner.json")  # who holds it, for the waiting run
STAGE_FAILED = "StageFailed"  # state name of a run that stopped at a failed stage


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
    except ReproductionError as e:
        return Failed(message=f"stage {name} failed: {stage_error(name, e)}. Fix it and run "
                              "again: finished stages are not redone")
    seconds = round(time.monotonic() - t0, 1)
    log.info("stage %s: %s in %.1f s", name, "ran" if ran else "up to date", seconds)
    return {"stage": name, "ran": bool(ran), "seconds": seconds}


def stage_error(name: str, exc: BaseException) -> str:
    """The stage's own one-line error (`tinyldm stage` records it), else DVC's reason."""
    recorded = stage_error_file(name)
    if recorded.exists():
        return recorded.read_text().strip()
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{exc} (its output is above)"


def _owner() -> str:
    try:
        o = json.loads(LOCK_OWNER.read_text())
        return f"{o['what']}, pid {o['pid']} on {o['host']}, since {o['since']}"
    except (OSError, ValueError, KeyError):
        return "owner unknown"


@dataclass
class Lease:
    held: bool  # False: another run has the workspace and this one skips
    note: str = ""  # the one line printed when this run waited or skipped


@contextmanager
def workspace_lock(what: str, on_busy: str = "wait", timeout_s: float = 0) -> Iterator[Lease]:
    """Hold this workspace for one run. When another run has it: on_busy "skip" yields an
    unheld Lease, "wait" waits up to timeout_s (then UserError); one line says which."""
    from filelock import FileLock, Timeout

    WORKSPACE_LOCK.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(WORKSPACE_LOCK), thread_local=False)
    note = ""
    try:
        lock.acquire(timeout=0)
        busy = False
    except Timeout:
        busy = True
    if busy:  # (not inside the except: a skip yields, and the run must not chain onto it)
        owner = _owner()
        if on_busy == "skip":
            note = f"{what}: skipped: another run ({owner}) holds this workspace " \
                   "(retrain.on_busy: skip)"
            print(note)
            yield Lease(False, note)
            return
        t0 = time.monotonic()
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            raise UserError(f"{what}: another run ({owner}) still holds {WORKSPACE_LOCK} after "
                            f"{timeout_s:g} s; let it finish, or raise retrain.busy_timeout_s"
                            ) from None
        note = f"{what}: waited {time.monotonic() - t0:.1f} s for another run ({owner}) to finish"
        print(note)
    try:
        write_json(LOCK_OWNER, {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                                "since": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")})
        yield Lease(True, note)
    finally:
        LOCK_OWNER.unlink(missing_ok=True)
        lock.release()


def _metric(stage: str, key: str):
    path = metrics_path(stage)
    return read_json(path).get(key) if path.exists() else None


def summary(results: list[dict]) -> str:
    def fmt(v, spec=""):
        return "n/a" if v is None else format(v, spec)

    val_in, quarantined = _metric("validate", "images_in"), _metric("validate", "quarantined")
    problems = _metric("validate", "dataset_problems")
    lines = ["", "tinyldm run summary",
             "  stages:       " + ", ".join(f"{r['stage']} {'ran' if r['ran'] else 'cached'}"
                                           f" {r['seconds']}s" for r in results),
             f"  images:       {fmt(val_in)} in, {fmt(quarantined)} quarantined; dataset "
             "checks " + ("FAILED: " + "; ".join(problems) if problems
                          else "passed" if problems == [] else "n/a"),
             f"  OCR CER:      {fmt(_metric('ocr', 'cer'), '.4f')} (vs generator ground truth)",
             f"  VAE PSNR:     {fmt(_metric('vae', 'val_psnr'), '.2f')} dB (val)",
             "  adherence:    " + ", ".join(
                 f"{f} {fmt(_metric('evaluate', f'prompt_adherence_{f}'), '.3f')}"
                 for f in ("background", "background_kind", "gradient_to", "saturation", "layout",
                           "logo"))
             + " (auto-labels of generated images = the prompt)",
             f"  fidelity:     FD {fmt(_metric('evaluate', 'fd'), '.3f')}, KID "
             f"{fmt(_metric('evaluate', 'kid'), '.4f')}, detail at 800 px "
             f"{fmt(_metric('evaluate', 'detail_ratio_800'), '.2f')} (1.0: none beyond 64 px)",
             f"  text:         word recall {fmt(_metric('evaluate', 'text_word_recall'), '.3f')}"
             f" (real images {fmt(_metric('evaluate', 'text_word_recall_real'), '.3f')}), "
             f"typeset exact {fmt(_metric('evaluate', 'text_exact_typeset'), '.3f')}",
             f"  model:        {_metric('register', 'model_uri') or 'n/a'} -> alias "
             f"{_metric('register', 'alias') or 'n/a'}",
             f"  report:       {EVAL_REPORT} (grids in {EVAL_GRIDS}/)"]
    return "\n".join(lines)


def run_dag(stage: Callable = run_stage, force: bool = False,
            done: dict[str, dict] | None = None) -> list[dict] | State:
    """Every stage of dvc.yaml in DVC's order through `stage` (run_stage, or a copy with
    retries), skipping those in `done` (already run by the caller); stops at a failure."""
    order = stage_order()
    done = done or {}
    results = []
    with tracking.pipeline_run(load_params().register_.experiment):  # the stages nest in it
        for i, name in enumerate(order, 1):
            if name in done:
                results.append(done[name])
                continue
            print(f"[{i}/{len(order)}] {name}")
            state = stage(name, force, return_state=True)
            if state.is_failed():
                return Failed(name=STAGE_FAILED, message=state.message)
            results.append(state.result())
    write_json(RUN_LOG, results)
    print(summary(results))
    return results


def record_overrides(overrides: list[str] | None, params_file: str = "params.yaml") -> None:
    """--set values into params.yaml (so dvc.lock records what ran): only while this run
    holds the workspace, so no run ever has its params changed under it."""
    if overrides:
        write_overrides(params_file, overrides)
        print(f"{params_file}: set {', '.join(overrides)} (recorded so dvc.lock matches)")


@flow(name="tinyldm-pipeline", log_prints=True)
def pipeline(force: bool = False, on_busy: str = "wait", busy_timeout_s: float = 21600,
             overrides: list[str] | None = None) -> list[dict] | State:
    venv_on_path()  # dvc.yaml calls `tinyldm stage ...` through the shell
    try:
        with workspace_lock("tinyldm run", on_busy, busy_timeout_s) as lease:
            if not lease.held:
                return []
            record_overrides(overrides)
            return run_dag(run_stage, force)
    except UserError as e:
        return Failed(message=str(e))


def run_pipeline(force: bool = False, on_busy: str = "wait", busy_timeout_s: float = 21600,
                 overrides: list[str] | None = None) -> list[dict]:
    """The flow, with a failed stage turned into one UserError line for the CLI."""
    state = pipeline(force=force, on_busy=on_busy, busy_timeout_s=busy_timeout_s,
                     overrides=overrides, return_state=True)
    if state.is_failed():
        raise UserError(state.message or "pipeline failed; see the messages above")
    return state.result()
