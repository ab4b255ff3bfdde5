"""Scheduled retraining: a cron deployment on a real Prefect server, the early stop, the
workspace lock, retries and the failure hook.

The flows run for real on a small workspace: the real scrape stage over a folder of three
images and, downstream of it, one stand-in for the training stages that reads the images
and labels/manual (as the labels stage does) and appends a line to train_runs.log each
time it runs. A run that retrains adds a line; an early stop adds none. Training itself is
test_e2e's job.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image
from services import free_port

from components.config import Retrain
from components.contracts import UserError, metrics_path
from components.overrides import write_overrides
from flows.cli import main
from flows.pipeline import WORKSPACE_LOCK, workspace_lock
from flows.retrain import DEPLOYMENT, FLOW_NAME, retrain, retry_delays, run_retrain

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CRON = "0 3 * * 1"

MINI_DAG = """\
stages:
  scrape:
    cmd: tinyldm stage scrape
    params: [scrape]
    outs: [{data/raw: {persist: true}}]
    metrics: [{reports/metrics/scrape.json: {cache: false}}]
  train:
    cmd: "mkdir -p models/train && ls -R data/raw labels/manual > models/train/inputs.txt
      && echo ran >> train_runs.log"
    deps: [data/raw, labels/manual]
    outs: [models/train]
"""


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def _train_runs(ws: Path) -> int:
    log = ws / "train_runs.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _wait(check, seconds: float, what: str):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if value := check():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@pytest.fixture
def ws(workdir, monkeypatch):
    """A git + DVC workspace: params.yaml collecting from images/ (3 PNGs), the mini DAG."""
    for k in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{k}_NAME", "test")
        monkeypatch.setenv(f"GIT_{k}_EMAIL", "test@example.com")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    (workdir / "images").mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (64, 64), colour).save(workdir / "images" / f"{i}.png")
    (workdir / "labels" / "manual").mkdir(parents=True)
    (workdir / "labels" / "manual" / "README.md").write_text("manual labels go here\n")
    (workdir / "dvc.yaml").write_text(MINI_DAG)
    (workdir / ".gitignore").write_text(".cache/\nreports/\ntrain_runs.log\nattempted\n")
    write_overrides("params.yaml", ["scrape.sources=[{kind: folder, path: images}]",
                                    "retrain.retries=0", "retrain.retry_delay_s=0"])
    _git("init", "-q", "-b", "main")
    from dvc.repo import Repo

    Repo.init(".").close()
    _git("add", "-A")
    _git("commit", "-qm", "workspace")
    return workdir


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 and a free port, with its own
    PREFECT_HOME (a fresh database); stopped by its PID."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-ui", "--analytics-off"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait(healthy, 120, "prefect server start")
        yield {"url": url, "env": env}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def api(prefect_server):
    """In-process flows report to the test's server."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
        yield prefect_server
        APILogHandler().flush()  # send the runs' last logs while the server is up
        EventsWorker.drain_all(timeout=30)  # and their events (else they retry at exit)


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that keeps what Apprise's json:// posts to it."""

    def __init__(self):
        posts = self.posts = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"json://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


# ---------------------------------------------------------------- settings
def test_retry_delays_back_off_and_bad_settings_are_one_line(workdir):
    assert retry_delays(Retrain(retries=3, retry_delay_s=10)) == [10, 20, 40]
    assert retry_delays(Retrain(retries=2, retry_delay_s=5, exponential=False)) == [5, 5]
    assert retry_delays(Retrain(retries=0)) == []
    from components.config import ConfigError, load_params

    for override, expected in [
        ("retrain.git=push", "retrain.git: Input should be 'none', 'commit' or 'branch'"),
        ("retrain.on_busy=queue", "retrain.on_busy: Input should be 'wait' or 'skip'"),
        ("retrain.branch='retrain {date}'", "is not a valid git branch name"),
        ("retrain.branch=r/{when}", "only {date} is filled in"),
        ("retrain.notify=[slack]", "notify.0: 'slack': give env:VAR"),
        ("retrain.notify=['mailto://bob:hunter2@example.com']",
         "notify.0: 'mailto://***@example.com': give env:VAR"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_params(overrides=[override])
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_schedule_refuses_bad_cron_and_missing_server_in_one_line(workdir, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def err() -> str:
        e = capsys.readouterr().err.strip()
        assert e.startswith("tinyldm: error: ") and "\n" not in e, e
        return e

    assert main(["schedule", "--cron", "61 3 * * 1"]) == 1
    assert "--cron '61 3 * * 1' --timezone 'UTC': Invalid cron string" in err()
    assert main(["schedule", "--cron", CRON, "--timezone", "Mars/Base"]) == 1
    assert "Invalid timezone" in err()
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["schedule", "--cron", CRON]) == 1
        assert "PREFECT_API_URL is not set" in err()
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        assert main(["schedule", "--cron", CRON]) == 1
        assert "no Prefect server answers" in err()


# ---------------------------------------------------------------- the flow
def test_retrain_runs_then_stops_early_until_an_image_or_label_changes(ws, api, tmp_path_factory):
    from dvc.repo import Repo

    remote = tmp_path_factory.mktemp("dvc-remote")
    with Repo(".") as repo, repo.config.edit() as conf:
        conf["remote"]["store"] = {"url": str(remote)}
        conf["core"]["remote"] = "store"
    write_overrides("params.yaml", ["retrain.git=branch"])
    head = _git("rev-parse", "HEAD")

    first = retrain()  # everything is new: the whole DAG, push, dvc.lock on a new branch
    assert first["outcome"] == "retrained" and first["first"], first
    assert _train_runs(ws) == 1
    assert [r["stage"] for r in first["stages"]] == ["scrape", "train"]
    assert any(f.is_file() for f in remote.rglob("*")), "dvc push sent nothing"
    (branch,) = _git("branch", "--list", "retrain/*", "--format=%(refname:short)").split()
    assert _git("show", f"{branch}:dvc.lock") == (ws / "dvc.lock").read_text().strip()
    assert _git("rev-parse", "HEAD") == head and _git("branch", "--show-current") == "main"

    again = retrain()  # nothing changed: one line, no training, nothing pushed or committed
    assert again["outcome"] == "unchanged", again
    assert again["message"].startswith("retrain: nothing changed since the last run")
    assert "no new model version" in again["message"] and "\n" not in again["message"]
    assert _train_runs(ws) == 1
    assert len(_git("branch", "--list", "retrain/*").split()) == 1

    (ws / "labels" / "manual" / "fixes.csv").write_text("file,background\n0.png,red\n")
    write_overrides("params.yaml", ["retrain.git=commit"])
    labelled = retrain()  # a manual label changed: no image did, the DAG runs
    assert labelled["outcome"] == "retrained" and labelled["labels_changed"], labelled
    assert labelled["images"] == {"new": 0, "changed": 0, "vanished": 0}
    assert _train_runs(ws) == 2
    assert _git("rev-parse", "HEAD^") == head  # git: commit, on the current branch
    assert _git("show", "HEAD:dvc.lock") == (ws / "dvc.lock").read_text().strip()

    Image.new("RGB", (64, 64), "yellow").save(ws / "images" / "3.png")
    added = retrain()  # a new image
    assert added["outcome"] == "retrained" and not added["labels_changed"], added
    assert added["images"] == {"new": 1, "changed": 0, "vanished": 0}
    assert _train_runs(ws) == 3


def test_a_second_run_skips_or_waits_while_the_workspace_is_held(ws, api, monkeypatch):
    import filelock

    holder = workspace_lock("test holder")
    assert holder.__enter__().held
    release = threading.Timer(1.0, holder.__exit__, (None, None, None))
    try:
        write_overrides("params.yaml", ["retrain.on_busy=skip"])
        skipped = retrain()
        assert skipped["outcome"] == "skipped", skipped
        assert skipped["message"].startswith("tinyldm retrain: skipped: another run (test "
                                             f"holder, pid {os.getpid()}")
        assert main(["retrain"]) == 0 and main(["run"]) == 0  # both verbs skip, no error
        assert not metrics_path("scrape").exists() and _train_runs(ws) == 0
        # --set is written only by the run that holds the workspace: a skipped one leaves
        # the running one's params.yaml as it was
        before = (ws / "params.yaml").read_text()
        assert main(["run", "--set", "retrain.retries=7"]) == 0
        assert main(["retrain", "--set", "retrain.retries=7"]) == 0
        assert (ws / "params.yaml").read_text() == before

        write_overrides("params.yaml", ["retrain.on_busy=wait", "retrain.busy_timeout_s=1"])
        with pytest.raises(UserError) as e:
            run_retrain()
        assert "another run (test holder" in str(e.value) and "\n" not in str(e.value)
        assert f"still holds {WORKSPACE_LOCK} after 1 s" in str(e.value)

        write_overrides("params.yaml", ["retrain.busy_timeout_s=120"])
        acquire = filelock.FileLock.acquire

        def watch(self, timeout=None, *args, **kwargs):  # the holder lets go 1 s after the
            if timeout and not release.is_alive():     # run starts waiting for it
                release.start()
            return acquire(self, timeout, *args, **kwargs)

        monkeypatch.setattr(filelock.FileLock, "acquire", watch)
        waited = retrain()  # waits for the holder to let go, then runs
    finally:
        if release.is_alive() or release.finished.is_set():
            release.join()
        else:
            holder.__exit__(None, None, None)
    assert waited["outcome"] == "retrained" and _train_runs(ws) == 1, waited
    assert waited["waited"].startswith("tinyldm retrain: waited ")
    assert float(waited["waited"].split()[3]) >= 0.9 and "(test holder" in waited["waited"]


def test_a_failing_stage_is_retried_then_its_hook_reports_stage_and_error(ws, api, capfd,
                                                                         monkeypatch):
    hook = Receiver()
    # the target's URL comes from the environment (secrets stay out of params.yaml and git)
    monkeypatch.setenv("TINYLDM_TEST_HOOK", hook.url)
    write_overrides("params.yaml", ["retrain.notify=['env:TINYLDM_TEST_HOOK']",
                                    "retrain.retries=1", "retrain.retry_delay_s=0"])
    # a stage that fails once and then works: the retry finishes the run, nobody is told
    dag = (ws / "dvc.yaml").read_text()
    (ws / "dvc.yaml").write_text(dag.replace('cmd: "mkdir', 'cmd: "test -f attempted || '
                                             '{ touch attempted; exit 3; }; mkdir'))
    done = retrain()
    assert done["outcome"] == "retrained" and (ws / "attempted").exists(), done
    assert _train_runs(ws) == 1 and hook.posts == []

    # a stage that fails every time: retried, then the hook logs and notifies once
    write_overrides("params.yaml", ["scrape.sources=[{kind: folder, path: /no/such/dir}]"])
    capfd.readouterr()
    with pytest.raises(UserError) as e:
        run_retrain()
    error = "scrape.sources[0]: folder /no/such/dir does not exist"
    assert str(e.value).startswith(f"stage scrape failed: {error}"), str(e.value)
    assert "\n" not in str(e.value)
    out = capfd.readouterr()
    assert (out.out + out.err).count(f"tinyldm: error: {error}") == 2  # first try + 1 retry
    _wait(lambda: hook.posts, 10, "the failure notification")
    time.sleep(0.5)  # a second (duplicate) notification would arrive by now
    (post,) = hook.posts
    assert post["title"] == "tinyldm retrain: stage scrape failed" and post["type"] == "failure"
    assert post["message"].startswith("stage scrape failed after 2 attempt(s) in ")
    assert error in post["message"]


# ---------------------------------------------------------------- the schedule
def _next_monday_3am(now: datetime) -> datetime:
    day = (now + timedelta(days=(7 - now.weekday()) % 7)).replace(hour=3, minute=0, second=0,
                                                                  microsecond=0)
    return day if day > now else day + timedelta(days=7)


def test_schedule_serves_a_cron_deployment_that_survives_a_restart(ws, api):
    """`tinyldm schedule` against a real server: the cron deployment is registered and
    scheduled, a triggered run executes in the workspace (nothing changed: early stop), and
    stopping the server process leaves the schedule active. prefect.yaml declares the same
    deployment for a work pool."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.deployments import run_deployment

    subprocess.run([str(BIN / "dvc"), "repro", "-q"], check=True, capture_output=True)
    name = f"{FLOW_NAME}/{DEPLOYMENT}"
    log = ws / "schedule.log"
    with open(log, "w") as out:
        serving = subprocess.Popen([str(BIN / "tinyldm"), "schedule", "--cron", CRON],
                                   cwd=ws, env=api["env"], stdout=out, stderr=subprocess.STDOUT)
    client = get_client(sync_client=True)
    with client:
        def deployment():
            assert serving.poll() is None, log.read_text()[-3000:]
            try:
                return client.read_deployment_by_name(name)
            except Exception:  # noqa: BLE001 - not registered yet
                return None

        try:
            dep = _wait(deployment, 90, "the served deployment")
            (sched,) = dep.schedules
            assert sched.schedule.cron == CRON and sched.active and not dep.paused

            def scheduled():
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[dep.id])))
                return sorted(r.expected_start_time for r in runs if r.state.is_scheduled())

            first = _wait(scheduled, 60, "the scheduler to plan runs")[0]
            assert first == _next_monday_3am(datetime.now(UTC)), first

            run = run_deployment(name, timeout=150, poll_interval=1)
            assert run.state.is_completed(), (run.state, log.read_text()[-3000:])
            def early_stop_logged():  # the run's logs arrive a little after its state
                logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(
                    any_=[run.id])))
                return any("retrain: nothing changed since the last run" in x.message
                           for x in logs)

            _wait(early_stop_logged, 30, "the run's early-stop line in its logs")
        finally:
            os.kill(serving.pid, signal.SIGTERM)
            serving.wait(timeout=60)
        assert serving.returncode == 0, log.read_text()[-3000:]
        dep = client.read_deployment_by_name(name)
        assert not dep.paused and dep.schedules[0].active  # still scheduled after shutdown
        assert _train_runs(ws) == 1  # the dvc repro above; the served run trained nothing

        for cmd in (["work-pool", "create", "tinyldm", "--type", "process"],
                    ["--no-prompt", "deploy", "--all"]):
            r = subprocess.run([str(BIN / "prefect"), *cmd], cwd=ROOT, env=api["env"],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        dep = client.read_deployment_by_name(name)
        assert dep.work_pool_name == "tinyldm" and dep.entrypoint == "flows/retrain.py:retrain"
        assert [(s.schedule.cron, s.active) for s in dep.schedules] == [(CRON, True)]
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                   {"directory": str(ROOT)}}]
