"""The shared setup of infra/, for real and without Docker: a PostgreSQL server (a temp
cluster on 127.0.0.1) as the backend store of an `mlflow server` with proxied artifacts
(tests/services.py starts both), and the register stage against it: one registration,
then two at once. tests/e2e/test_e2e.py runs the whole pipeline against the same server.

The Docker parts (MinIO, basic auth, Prefect) are not run here; infra/README.md says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import Postgres, Server, _stop
from test_registry import ONE_RULE, PARAMS, _tiny_models, _write_metrics

from components.config import load_params
from components.ship import gate, register, registry, serving

BIN = Path(sys.executable).parent
METRIC = "prompt_adherence_background"  # the one gate rule of ONE_RULE (max, margin 0)


# ------------------------------------------------------------------ checks
def _params(model: str, *more: str):
    return load_params(PARAMS, [*ONE_RULE, f"register.model_name={model}",
                                f"register.experiment={model}", *more])


def _check_registry(client, name: str) -> dict[int, dict[str, str]]:
    """The promises of components/ship/registry.py, checked on the stored state; returns the
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
        want = (gate.fmt_num(registry.version_metrics(client, versions[int(champ)])[METRIC])
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

    result = register.register(params)

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
    png = serving.generate_png(serving.resolve_model_uri(None, params), "red poster",
                                seed=1, steps=1, width=16, height=16)
    assert png.startswith(b"\x89PNG")


DRIVER = """
import json, os, sys, time
from pathlib import Path

import mlflow

from components import tracking
from components.ship import gate, register, registry, serving
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
print("RESULT " + json.dumps(register.register(load_params(params_file, overrides))))
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
    registry.await_earlier_gates(client, name, int(dead.version) + 1, timeout=2)
    assert 2 <= time.monotonic() - t0 < 30
    assert client.get_model_version(name, dead.version).tags["gate.state"] == "abandoned"
    t0 = time.monotonic()  # marked: the next registration does not wait for it again
    registry.await_earlier_gates(client, name, int(dead.version) + 2, timeout=60)
    assert time.monotonic() - t0 < 30
