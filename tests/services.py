"""Real services for the tests that need them, started by the test session and stopped
by their PIDs: a PostgreSQL cluster on 127.0.0.1 and an `mlflow server` using it as its
backend store (as in infra/compose.yaml, minus auth and S3). Loaded by conftest.py."""

from __future__ import annotations

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

BIN = Path(sys.executable).parent
PG_USER, PG_PASSWORD = "tinyldm", "tinyldm-test-password"


# ------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path, lines: int = 6) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return " | ".join([ln.strip() for ln in text.splitlines() if ln.strip()][-lines:])


def wait_http(url: str, proc: subprocess.Popen, log: Path, what: str,
              timeout: float = 180) -> None:
    """Poll GET url until it answers 200; fail the test (with the log's tail) when the
    process exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} ({url}) did not answer within {timeout} s (exit code "
                        f"{proc.poll()}); log tail: {_tail(log)}", pytrace=False)
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)


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


@pytest.fixture(scope="session")
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
        port = free_port()
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


@pytest.fixture(scope="session")
def mlflow_server(postgres: Postgres, tmp_path_factory) -> Iterator[Server]:
    """`mlflow server` as in infra/compose.yaml, minus auth and S3: Postgres backend store,
    artifacts proxied by the server (--artifacts-destination), schema migrated on start."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port, log = free_port(), home / "server.log"
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
        wait_http(f"{url}/health", proc, log, "mlflow server")
        yield Server(url, home / "artifacts")
    finally:
        _stop(proc)  # SIGTERM: mlflow forwards it to its uvicorn workers


