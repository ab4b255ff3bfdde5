"""Scheduled retraining: collect, stop early when nothing changed, else the DAG, push, record.

Wiring only. The stages are dvc.yaml's, run one by one through flows/pipeline.py's
run_stage (DVC decides what is stale, exactly as in `tinyldm run`; evaluate, register and
the promotion gate are stages of that DAG). This flow adds what a run nobody watches
needs: the early stop, retries with backoff per stage, failure hooks that log and notify,
the workspace lock, `dvc push`, and what happens to dvc.lock in git (params `retrain`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, task
from prefect.states import Failed, State

from components.config import Retrain, load_params, redact
from components.contracts import MANUAL_LABELS, UserError, metrics_path, read_json
from flows.env import venv_on_path
from flows.pipeline import (
    STAGE_FAILED,
    _quiet_dvc,
    record_overrides,
    run_dag,
    run_stage,
    workspace_lock,
)

FLOW_NAME = "tinyldm-retrain"
DEPLOYMENT = "retrain"  # `prefect deployment run tinyldm-retrain/retrain`
COLLECT = "scrape"  # the stage that collects from the sources (re-run every time)
CHANGES = ("new", "changed", "vanished")  # scrape's since_last.* counts that mean "changed"
PUSH = "dvc push"  # the task after the DAG, retried and reported like a stage


# ---------------------------------------------------------------- retries and failure hooks
def retry_delays(cfg: Retrain) -> list[float]:
    """Seconds before each retry: retry_delay_s, doubled each time when exponential."""
    return [cfg.retry_delay_s * (2**i if cfg.exponential else 1) for i in range(cfg.retries)]


def notify(targets: list[str], subject: str, body: str, log) -> None:
    """Tell every target of retrain.notify: `env:VAR` (the Apprise URLs in that environment
    variable, space- or comma-separated), `block:NAME` (a saved Prefect Apprise block) or a
    credential-free URL. A target that fails is one log line naming it, never its secret,
    and never a second failure."""
    from prefect.blocks.notifications import AppriseNotificationBlock

    for target in targets:
        try:
            if target.startswith("block:"):
                blocks = [AppriseNotificationBlock.load(target.removeprefix("block:"))]
            else:
                urls = (os.environ.get(target.removeprefix("env:"), "")
                        if target.startswith("env:") else target)
                blocks = [AppriseNotificationBlock(url=u, notify_type="failure")
                          for u in urls.replace(",", " ").split()]
                if not blocks:
                    raise ValueError(f"environment variable {target[4:]} is not set")
            for block in blocks:
                with block.raise_on_failure():
                    block.notify(body, subject=subject)
        except Exception as e:  # noqa: BLE001 - any failure to notify is reported, not raised
            log.warning("retrain: notifying %s failed (%s); check retrain.notify",
                        target if target.startswith(("env:", "block:"))
                        else target.split("://")[0] + "://",
                        redact(str(e)) or "refused, unreachable or unknown URL")


def _where() -> str:
    return f"{socket.gethostname()}:{Path.cwd()}"


def stage_failure_hook(urls: list[str]):
    """on_failure hook of a stage task: runs once, after the last retry failed."""

    def stage_failed(task, task_run, state) -> None:
        from prefect.logging.loggers import task_run_logger

        log = task_run_logger(task_run, task)
        what = PUSH if task_run.name == PUSH else f"stage {task_run.name}"
        error = (state.message or "").removeprefix(f"{what} failed: ")
        line = f"{what} failed after {task_run.run_count} attempt(s) in {_where()}: {error}"
        log.error("retrain: %s", line)
        notify(urls, f"tinyldm retrain: {what} failed", line, log)

    return stage_failed


def run_failed(flow, flow_run, state) -> None:
    """on_failure hook of the flow: a failure outside the stages (lock timeout, git, bad
    params); a failed stage has already been reported by its own hook."""
    from prefect.logging.loggers import flow_run_logger

    if state.name == STAGE_FAILED:
        return
    log = flow_run_logger(flow_run, flow)
    line = f"retrain failed in {_where()}: {state.message}"
    log.error("%s", line)
    try:
        urls = load_params().retrain.notify
    except UserError as e:
        log.warning("retrain: cannot notify: %s", e)
        return
    notify(urls, "tinyldm retrain failed", line, log)


def with_retries(t, cfg: Retrain):
    """A task (a stage, dvc push) with this section's retries, backoff and failure hook."""
    return t.with_options(retries=cfg.retries, retry_delay_seconds=retry_delays(cfg),
                          on_failure=[stage_failure_hook(cfg.notify)])


# ---------------------------------------------------------------- what changed
def changes() -> dict:
    """What the collect stage found against the last run (images new, changed, vanished),
    and what DVC finds stale now (a manual label edit makes the stages reading
    labels/manual stale; so does a run that failed half way)."""
    from dvc.repo import Repo

    m = read_json(metrics_path(COLLECT)) if metrics_path(COLLECT).exists() else {}
    first = not any(f"since_last.{k}" in m for k in CHANGES)
    images = {k: int(m.get(f"since_last.{k}", 0)) for k in CHANGES}
    with Repo(".") as repo:
        status = repo.status()
    labels = any(Path(dep) == MANUAL_LABELS or MANUAL_LABELS in Path(dep).parents
                 for entries in status.values() for e in entries if isinstance(e, dict)
                 for dep in e.get("changed deps", {}))
    return {"first": first, "images": images, "labels_changed": labels,
            "stale": sorted(status)}


def describe(c: dict) -> str:
    imgs = ("first collection" if c["first"] else
            ", ".join(f"{n} {k}" for k, n in c["images"].items()) + " image(s)")
    labels = "labels/manual changed" if c["labels_changed"] else "labels/manual unchanged"
    stale = f"stale: {', '.join(c['stale'])}" if c["stale"] else "every stage up to date"
    return f"{imgs}; {labels}; {stale}"


# ---------------------------------------------------------------- push and git
@task(task_run_name=PUSH)
def dvc_push() -> str | State:
    """Every cached output to the default DVC remote; without one, says so and skips."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    _quiet_dvc()
    with Repo(".") as repo:
        remote = repo.config["core"].get("remote")
        if not remote:
            names = list(repo.config["remote"])
            how = (f"make one of {', '.join(names)} the default with `dvc remote default NAME`"
                   if names else "add one with `dvc remote add -d NAME URL`")
            return f"dvc push: skipped: no default DVC remote; {how}"
        try:
            n = repo.push()
        except DvcException as e:
            return Failed(message=f"dvc push to remote {remote} failed: "
                                  f"{' '.join(str(e).split())}")
    return f"dvc push: {n} file(s) sent to remote {remote}"


def _git(*args: str, env: dict | None = None) -> str:
    try:
        r = subprocess.run(["git", *args], capture_output=True, text=True,
                           env={**os.environ, **(env or {})})
    except FileNotFoundError:
        raise UserError("git: not installed; install it, or set retrain.git: none") from None
    if r.returncode:
        why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        raise UserError(f"git {args[0]}: {why}")
    return r.stdout.strip()


def check_git(cfg: Retrain, when: datetime) -> str | None:
    """Before any work: can this run record dvc.lock the way retrain.git asks? Returns the
    branch to create (git: branch)."""
    if cfg.git == "none":
        return None
    branch = cfg.branch.format(date=when.strftime("%Y%m%d-%H%M%S"))
    checks = [(["rev-parse", "--is-inside-work-tree"], "this folder is not in a git repository"),
              (["rev-parse", "--verify", "-q", "HEAD"], "no commit yet to build on"),
              (["var", "GIT_COMMITTER_IDENT"],
               "no identity to commit as; set git config user.name and user.email")]
    checks += ([(["symbolic-ref", "-q", "HEAD"], "HEAD is detached; check out a branch")]
               if cfg.git == "commit" else
               [(["check-ref-format", "--branch", branch],
                 f"{branch!r} is not a valid branch name; fix retrain.branch")])
    for args, why in checks:
        try:
            _git(*args)
        except UserError:
            raise UserError(f"git: {why} (retrain.git is {cfg.git}; none leaves dvc.lock "
                            "uncommitted)") from None
    if cfg.git == "commit":
        return None
    if subprocess.run(["git", "show-ref", "--verify", "-q", f"refs/heads/{branch}"]
                      ).returncode == 0:
        raise UserError(f"git: branch {branch} already exists; put {{date}} in "
                        "retrain.branch so that each run makes its own")
    return branch


def record(cfg: Retrain, branch: str | None, message: str) -> str:
    """dvc.lock and params.yaml (the values its hashes refer to) into git, as asked."""
    if cfg.git == "none":
        return "git: dvc.lock left in the working tree (retrain.git: none)"
    paths = [p for p in ("dvc.lock", "params.yaml") if Path(p).exists()]
    if not _git("status", "--porcelain", "--", *paths):
        return "git: dvc.lock unchanged; nothing to commit"
    if cfg.git == "commit":
        _git("add", "--", *paths)
        _git("commit", "-q", "-m", message, "--", *paths)
        return (f"git: committed {', '.join(paths)} on {_git('branch', '--show-current')} "
                f"({_git('rev-parse', '--short', 'HEAD')})")
    with tempfile.TemporaryDirectory() as tmp:  # a private index: the real one is untouched
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git("read-tree", "HEAD", env=env)
        _git("update-index", "--add", "--", *paths, env=env)
        tree = _git("write-tree", env=env)
    commit = _git("commit-tree", tree, "-p", "HEAD", "-m", message)
    _git("branch", branch, commit)
    return (f"git: {', '.join(paths)} committed on new branch {branch} ({commit[:7]}); the "
            "working tree and its branch are untouched")


# ---------------------------------------------------------------- the flow
def _model_line(results: list[dict]) -> str:
    reg = next((r for r in results if r["stage"] == "register"), None)
    if not reg or not reg["ran"] or not metrics_path("register").exists():
        return "no new model version"
    m = read_json(metrics_path("register"))
    return f"model v{m.get('version')} registered (alias {m.get('alias')})"


def _retrain(cfg: Retrain) -> dict | State:
    when = datetime.now(UTC)
    branch = check_git(cfg, when)
    stage = with_retries(run_stage, cfg)
    print(f"retrain: collecting from the sources ({COLLECT})")
    collected = stage(COLLECT, True, return_state=True)
    if collected.is_failed():
        return Failed(name=STAGE_FAILED, message=collected.message)
    c = changes()
    if not c["first"] and not any(c["images"].values()) and not c["stale"]:
        line = ("retrain: nothing changed since the last run (no new, changed or vanished "
                "image; labels/manual unchanged; every stage up to date): no retraining, no "
                "new model version")
        print(line)
        return {"outcome": "unchanged", "message": line, **c}
    print(f"retrain: {describe(c)}: running the DAG")
    results = run_dag(stage, done={COLLECT: collected.result()})
    if isinstance(results, State):
        return results
    model = _model_line(results)
    push_state = with_retries(dvc_push, cfg)(return_state=True)
    if push_state.is_failed():
        return Failed(name=STAGE_FAILED, message=push_state.message)
    print(push_state.result())
    git = record(cfg, branch, f"retrain {when:%Y-%m-%d %H:%M} UTC: {describe(c)}; {model}")
    print(git)
    line = f"retrain: done: {model}"
    print(line)
    return {"outcome": "retrained", "message": line, "model": model, "git": git,
            "push": push_state.result(), "stages": results, **c}


@flow(name=FLOW_NAME, log_prints=True, on_failure=[run_failed])
def retrain(overrides: list[str] | None = None) -> dict | State:
    """One retraining run in this workspace (params.yaml `retrain` says how); --set values
    are written to params.yaml once the run holds the workspace."""
    venv_on_path()  # dvc.yaml calls `tinyldm stage ...` through the shell
    try:
        cfg = load_params(overrides=overrides).retrain
        with workspace_lock("tinyldm retrain", cfg.on_busy, cfg.busy_timeout_s) as lease:
            if not lease.held:
                return {"outcome": "skipped", "message": lease.note}
            record_overrides(overrides)
            result = _retrain(cfg)
            if isinstance(result, dict):
                result["waited"] = lease.note
            return result
    except UserError as e:
        return Failed(message=str(e))


def run_retrain(overrides: list[str] | None = None) -> dict:
    """The flow, with a failure turned into one UserError line for the CLI."""
    state = retrain(overrides=overrides, return_state=True)
    if state.is_failed():
        raise UserError(state.message or "retrain failed; see the messages above")
    return state.result()


# ---------------------------------------------------------------- the schedule
def serve_schedule(cron: str, timezone: str = "UTC", name: str = DEPLOYMENT) -> None:
    """Register the deployment with a cron schedule on the Prefect server and run its
    flow runs from this process (and directory) until stopped. The schedule is not paused
    on shutdown: it survives a restart (runs due meanwhile wait, then run)."""
    import httpx
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.settings import get_current_settings
    from pydantic import ValidationError

    try:
        schedule = CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as e:
        why = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise UserError(f"--cron {cron!r} --timezone {timezone!r}: {why}; e.g. --cron "
                        "\"0 3 * * 1\" (minute hour day-of-month month weekday)") from None
    api = get_current_settings().api.url
    if not api:
        raise UserError("tinyldm schedule: PREFECT_API_URL is not set; schedules live on a "
                        "Prefect server: start one (`prefect server start`) and export "
                        "PREFECT_API_URL=http://127.0.0.1:4200/api")
    try:
        httpx.get(f"{api.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        raise UserError(f"PREFECT_API_URL {api}: no Prefect server answers ({e}); start it "
                        "with `prefect server start` or fix the URL") from None
    print(f"tinyldm schedule: serving {FLOW_NAME}/{name} from {Path.cwd()} on cron "
          f"'{cron}' ({timezone}) via {api}; Ctrl-C stops serving, the schedule stays active",
          flush=True)
    retrain.serve(name=name, schedules=[schedule], pause_on_shutdown=False, limit=1,
                  print_starting_message=False)
    print(f"tinyldm schedule: stopped serving; {FLOW_NAME}/{name} stays scheduled (runs due "
          "meanwhile wait for the next `tinyldm schedule` here)")
