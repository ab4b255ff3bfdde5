"""The shared setup of infra/, for real and without Docker: a PostgreSQL server (a temp
cluster on 127.0.0.1) as the backend store of an `mlflow server` with proxied artifacts,
and the register stage against it: one registration, then two at once.

The Docker parts (MinIO, basic auth, Prefect) are not run here; infra/README.md says so."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_registry import ONE_RULE, PARAMS, _tiny_models, _write_metrics

from components import registry
from components.config import load_params

BIN = Path(sys.executable).parent
PG_USER, PG_PASSWORD = "tinyldm", "tinyldm-test-password"
METRIC = "prompt_adherence_background"  # the one gate rule of ONE_RULE (max, margin 0)


# ------------------------------------------------------------------ processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path, lines: int = 6) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return " | ".join([ln.strip() for ln in text.splitlines() if ln.strip()][-lines:])


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 30) -> None:
    """Stop a process this module started, by its PID: `sig`, a grace period, then SIGKILL
    (to its process group when it leads one, so its workers go too)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def _pg_tool(tool: str) -> str:
    """A PostgreSQL server program: on PATH, else Debian's /usr/lib/postgresql/<major>/bin."""
    found = shutil.which(tool) or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"),
                                key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
                                reverse=True)), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {tool} not found: run `sudo bash infra/install-system-deps.sh`"
                    " (installs the postgresql package) or put its bin folder on PATH",
                    pytrace=False)
    return found


# ------------------------------------------------------------------ services
@dataclass(frozen=True)
class Postgres:
    port: int

    def url(self, db: str) -> str:  # no password: libpq reads PGPASSWORD, as in compose.yaml
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{db}"

    def connect(self, db: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER,
                                password=PG_PASSWORD, dbname=db, connect_timeout=3)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway cluster: password auth, TCP on 127.0.0.1 only, no durability (a test)."""
    initdb, server = _pg_tool("initdb"), _pg_tool("postgres")
    # PostgreSQL refuses to run as root: as root, run it as the package's `postgres` user
    as_user: dict = {}
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root needs the `postgres` system user to start PostgreSQL:"
                        " run `bash infra/install-system-deps.sh` (the postgresql package "
                        "creates it)", pytrace=False)
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    base = Path(tempfile.mkdtemp(prefix="tinyldm-pg-"))  # in /tmp: postgres can reach it
    (base / "pwfile").write_text(PG_PASSWORD + "\n")
    if as_user:
        for p in (base, base / "pwfile"):
            os.chown(p, as_user["user"], as_user["group"])
    log = base / "postgres.log"
    proc = None
    try:
        init = subprocess.run([initdb, "-D", str(base / "data"), "-U", PG_USER, "--pwfile",
                               str(base / "pwfile"), "-A", "scram-sha-256", "-E", "UTF8",
                               "--locale", "C", "--no-sync"],
                              capture_output=True, text=True, timeout=120, **as_user)
        if init.returncode != 0:
            last = (init.stderr.strip().splitlines() or [f"exit code {init.returncode}"])[-1]
            pytest.fail(f"initdb failed: {last}", pytrace=False)
        port = _free_port()
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [server, "-D", str(base / "data"), "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={base}",
                 "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **as_user)
        pg = Postgres(port)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL on 127.0.0.1:{port} did not accept connections "
                            f"within 60 s; log tail: {_tail(log)}", pytrace=False)
            try:
                conn = pg.connect()
                break
            except Exception:
                time.sleep(0.3)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        conn.close()
        yield pg
    finally:
        if proc is not None:
            _stop(proc, signal.SIGINT)  # SIGINT: "fast" shutdown, clients disconnected
        shutil.rmtree(base, ignore_errors=True)


@dataclass(frozen=True)
class Server:
    url: str
    artifacts: Path


@pytest.fixture(scope="module")
def mlflow_server(postgres: Postgres, tmp_path_factory) -> Iterator[Server]:
    """`mlflow server` as in infra/compose.yaml, minus auth and S3: Postgres backend store,
    artifacts proxied by the server (--artifacts-destination), schema migrated on start."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port, log = _free_port(), home / "server.log"
    env = {**os.environ, "PGPASSWORD": PG_PASSWORD, "PATH": f"{BIN}:{os.environ['PATH']}",
           # no job-runner processes beside the web workers (genai jobs: unused here)
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", postgres.url("mlflow"),
             "--artifacts-destination", str(home / "artifacts"), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        timeout = 180
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server ({url}) did not answer GET /health within "
                            f"{timeout} s (exit code {proc.poll()}); log tail: {_tail(log)}",
                            pytrace=False)
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield Server(url, home / "artifacts")
    finally:
        _stop(proc)  # SIGTERM: mlflow forwards it to its uvicorn workers


# ------------------------------------------------------------------ checks
def _params(model: str, *more: str):
    return load_params(PARAMS, [*ONE_RULE, f"register.model_name={model}",
                                f"register.experiment={model}", *more])


def _check_registry(client, name: str) -> dict[int, dict[str, str]]:
    """The promises of components/registry.py, checked on the stored state; returns the
    tags of every version."""
    versions = {int(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    tags = {n: dict(v.tags or {}) for n, v in versions.items()}
    aliases = {a: int(v) for a, v in (client.get_registered_model(name).aliases or {}).items()}
    assert set(aliases) <= {"champion", "challenger"}, aliases
    assert set(aliases.values()) <= set(versions), (aliases, sorted(versions))
    for n, t in tags.items():
        assert t.get("gate.decision") in ("promoted", "rejected"), (n, t)
        assert t.get("gate.state") == "settled", (n, t)
        # each gate compared with the numbers of the version it names as the champion
        champ = t["gate.champion_version"]
        want = (registry._num(registry.version_metrics(client, versions[int(champ)])[METRIC])
                if champ else "missing")
        assert t[f"gate.{METRIC}.champion"] == want, (n, t)
    promoted = {n for n, t in tags.items() if t["gate.decision"] == "promoted"}
    rejected = set(tags) - promoted
    # every promoted version replaced the champion its gate compared with, so walking back
    # from the champion (what `tinyldm rollback` does) meets each promoted version once
    assert "champion" in aliases or not promoted
    chain, n = [], aliases.get("champion")
    while n is not None:
        assert n in promoted and n not in chain, (n, chain, tags)
        assert tags[n]["champion.previous"] == tags[n]["gate.champion_version"], tags[n]
        chain.append(n)
        n = int(tags[n]["champion.previous"]) if tags[n]["champion.previous"] else None
    assert set(chain) == promoted, f"promoted {sorted(promoted)}, champion history {chain}"
    # `challenger` is the newest version while it has not passed; a promotion clears it
    newest = max(tags, default=None)
    assert aliases.get("challenger") == (newest if newest in rejected else None), aliases
    return tags


# ------------------------------------------------------------------ tests
def test_register_stage_against_postgres_backed_server(
        mlflow_server: Server, postgres: Postgres, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.chdir(tmp_path)
    name = "tinyldm-infra-one"
    params = _params(name)
    _tiny_models(tmp_path)
    _write_metrics(tmp_path, {METRIC: 0.5, "vae_psnr": 20.0})

    result = registry.register(params)

    assert result["alias"] == "champion" and result["version"] == 1
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(result["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    assert run.data.metrics[f"evaluate.{METRIC}"] == 0.5
    _check_registry(client, name)
    # the server stored it in Postgres, and the artifacts in its destination folder
    with postgres.connect("mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT version FROM model_versions WHERE name = %s", (name,))
        assert cur.fetchall() == [(1,)]
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                    (name,))
        assert cur.fetchall() == [("champion", 1)]
    assert list(mlflow_server.artifacts.rglob("MLmodel")), "no model in the artifacts folder"
    # and a user gets an image from the champion through the server
    png = registry.generate_png(registry.resolve_model_uri(None, params), "red poster",
                                seed=1, steps=1, width=16, height=16)
    assert png.startswith(b"\x89PNG")


DRIVER = """
import json, os, sys, time
from pathlib import Path

import mlflow

from components import registry
from components.config import load_params

gate, params_file, *overrides = sys.argv[1:]
real_register_model = mlflow.register_model


def register_then_wait(*args, **kwargs):
    # Hold each process after its version exists until the other's does too: both gates then
    # run at the same moment, the interleaving that concurrent runs produce only sometimes.
    mv = real_register_model(*args, **kwargs)
    Path(gate, str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(Path(gate).iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    return mv


mlflow.register_model = register_then_wait
print("RESULT " + json.dumps(registry.register(load_params(params_file, overrides))))
"""


def test_two_registrations_at_once_lose_nothing(mlflow_server: Server, tmp_path: Path) -> None:
    """Two pipeline runs (two processes, two checkouts) reach the register stage together,
    no champion yet: both versions are kept, and the aliases and the gate tags tell one
    story: the better model is the champion, whichever registered first."""
    from mlflow import MlflowClient

    name = "tinyldm-infra-two"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url}
    gate = tmp_path / "gate"
    gate.mkdir()
    procs: dict[float, subprocess.Popen] = {}
    try:
        for value in (0.6, 0.7):
            root = tmp_path / f"run-{value}"
            root.mkdir()
            _tiny_models(root)
            _write_metrics(root, {METRIC: value, "vae_psnr": 20.0})
            sets = [*ONE_RULE, f"register.model_name={name}", f"register.experiment={name}"]
            procs[value] = subprocess.Popen(
                [sys.executable, "-c", DRIVER, str(gate), str(PARAMS), *sets], cwd=root,
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        outs = {v: p.communicate(timeout=400)[0] for v, p in procs.items()}
    finally:
        for p in procs.values():
            _stop(p, grace=5)
    results = {}
    for value, out in outs.items():
        tail = "\n".join(out.splitlines()[-25:])
        assert procs[value].returncode == 0, f"registration {value} failed:\n{tail}"
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
        results[value] = json.loads(line.removeprefix("RESULT "))

    client = MlflowClient(mlflow_server.url)
    versions = {int(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    assert sorted(versions) == [1, 2], sorted(versions)  # both kept, distinct numbers
    assert {r["version"] for r in results.values()} == {1, 2}
    for r in results.values():
        assert versions[r["version"]].run_id == r["run_id"]
    tags = _check_registry(client, name)
    better, worse = results[0.7]["version"], results[0.6]["version"]
    assert client.get_registered_model(name).aliases["champion"] in (better, str(better))
    # the second to reach its gate compared with the first, whichever that was
    assert tags[2]["gate.champion_version"] == "1" and tags[1]["gate.champion_version"] == ""
    assert results[0.7]["alias"] == "champion"
    assert results[0.6]["alias"] == ("champion" if worse == 1 else "challenger")


def test_a_registration_that_died_holds_later_gates_only_until_the_timeout(
        mlflow_server: Server) -> None:
    from mlflow import MlflowClient

    name = "tinyldm-infra-died"
    client = MlflowClient(mlflow_server.url)
    client.create_registered_model(name)
    dead = client.create_model_version(name, "s3://nowhere/model", tags={"gate.state":
                                                                         "pending"})
    t0 = time.monotonic()
    registry._await_earlier_gates(client, name, int(dead.version) + 1, timeout=2)
    assert 2 <= time.monotonic() - t0 < 30
    assert client.get_model_version(name, dead.version).tags["gate.state"] == "abandoned"
    t0 = time.monotonic()  # marked: the next registration does not wait for it again
    registry._await_earlier_gates(client, name, int(dead.version) + 2, timeout=60)
    assert time.monotonic() - t0 < 30
