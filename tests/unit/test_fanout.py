"""Per-image fan-out: OCR and auto-labels through Prefect's DaskTaskRunner on a local Dask
cluster give the same tables as the default thread pool; params.scale is checked."""

from __future__ import annotations

import functools
import logging
import shutil
import socket
from pathlib import Path

import pytest
from distributed import LocalCluster, SchedulerPlugin

from components.config import ConfigError, load_params
from components.contracts import CAPTIONS, OCR_TABLE, UserError, read_table
from components.ingest.ocr import CACHE, OcrJob, engine_version, ocr, ocr_chunk
from components.ingest.scrape import scrape
from components.ingest.validate import validate
from components.labelling.labels import labels
from flows.fanout import check_scheduler, mapper_for, stage_kwargs

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


class _Done(SchedulerPlugin):
    """Counts the tasks the cluster finished: proof the work ran there."""

    def __init__(self) -> None:
        self.tasks = 0

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        self.tasks += finish == "memory"


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes on 127.0.0.1, started in the test's own folder
    (not the work folder): workers find images by the absolute paths they are sent."""
    from prefect.server.api.server import SubprocessASGIServer

    had_server = None in SubprocessASGIServer._instances
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", silence_logs=logging.WARNING) as c:
        c.done = _Done()
        c.scheduler.add_plugin(c.done)
        yield c
    if not had_server:  # the temporary Prefect server flows/fanout started: stop it while
        # pytest captures output (at exit: a closed stream), once the runs' logs and events
        # are sent (else the exit drain waits forever on the stopped server)
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
        EventsWorker.drain_all(timeout=30)
        SubprocessASGIServer().stop()


def _dask(address: str) -> list[str]:
    return ["scale.task_runner=dask", f"scale.dask_address={address}", "scale.chunk_size=3"]


def test_dask_runner_gives_the_same_ocr_and_labels(workdir: Path, cluster) -> None:
    (workdir / "in").mkdir()
    (workdir / "in" / "broken.png").write_bytes(b"not a png")
    base = ["scrape.sources=[{kind: synthetic, n: 8, seed: 3}, {kind: folder, path: in}]",
            "ocr.workers=2", "text_encoder.name=tfidf"]  # tfidf: no model to load
    params = load_params(overrides=base)
    dask_params = load_params(overrides=base + _dask(cluster.scheduler_address))
    assert stage_kwargs("ocr", params) == {"mapper": None}  # threads: the stage's own pool
    assert stage_kwargs("vae", dask_params) == {}
    scrape(params)

    default = ocr(params)
    want = read_table(OCR_TABLE, "ocr")
    shutil.rmtree(CACHE)  # OCR everything again, on the cluster
    before = cluster.done.tasks
    mapper = mapper_for(dask_params.scale, "ocr")
    fanned = ocr(dask_params, mapper)
    got = read_table(OCR_TABLE, "ocr")
    assert cluster.done.tasks - before >= 3  # 8 images in chunks of 3 ran on the workers
    assert fanned["cache_hits"] == 0 and fanned["task_runner"] == "dask"
    assert got.equals(want), (got.compare(want) if got.shape == want.shape else got)
    assert fanned["ocr_errors"] == default["ocr_errors"] == 1 and fanned["cer"] == default["cer"]
    assert (got["n_words"] > 0).sum() >= 7
    assert ocr(dask_params, mapper)["cache_hits"] == 8  # hits never leave this process

    validate(params)
    m_default = labels(params)
    want = read_table(CAPTIONS, "captions")
    before = cluster.done.tasks
    m_dask = labels(dask_params, mapper_for(dask_params.scale, "labels"))
    got = read_table(CAPTIONS, "captions")
    assert cluster.done.tasks - before >= 3
    assert len(got) == 8 and got.equals(want), got.compare(want)
    assert m_dask == m_default


def test_worker_problem_is_one_line(workdir: Path, cluster) -> None:
    """A worker that cannot see the repository folder says so (through Dask and Prefect)."""
    params = load_params(overrides=_dask(cluster.scheduler_address))
    job = OcrJob(params.ocr, engine_version(), str(workdir / "elsewhere"))
    run = mapper_for(params.scale, "ocr")
    with pytest.raises(UserError, match=r"^worker \S+ cannot see .*elsewhere: workers read"):
        list(run(functools.partial(ocr_chunk, job), [[{"path": "a.png"}]]))


def test_unreachable_scheduler_is_one_line() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError) as e:
        check_scheduler(f"tcp://127.0.0.1:{port}", timeout_s=1)
    msg = str(e.value)
    assert msg.startswith(f"scale.dask_address tcp://127.0.0.1:{port}: no Dask scheduler")
    assert "dask scheduler" in msg and "\n" not in msg


def test_scale_settings_are_checked() -> None:
    with pytest.raises(ConfigError) as e:
        load_params(PARAMS, ["scale.task_runner=ray"])
    assert str(e.value).endswith("params.yaml (with --set): scale.task_runner: Input should "
                                 "be 'threads', 'processes' or 'dask' (got 'ray')")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"scale\.dask_address: String should match"):
        load_params(PARAMS, ["scale.dask_address=http://x"])
    scale = load_params(PARAMS, ["scale.dask_address=tcp://10.0.0.5:8786"]).scale
    assert scale.task_runner == "threads" and scale.dask_address == "tcp://10.0.0.5:8786"
    assert mapper_for(scale, "ocr") is None
    from prefect.task_runners import ProcessPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    local = load_params(PARAMS, ["scale.task_runner=dask", "scale.workers=3"]).scale
    runner = mapper_for(local, "ocr").runner()  # the cluster it starts: 127.0.0.1 only
    assert isinstance(runner, DaskTaskRunner) and runner.address is None
    assert runner.cluster_kwargs["n_workers"] == 3
    assert runner.cluster_kwargs["host"] == "127.0.0.1"
    remote = load_params(PARAMS, ["scale.task_runner=dask",
                                  "scale.dask_address=tcp://10.0.0.5:8786"]).scale
    assert mapper_for(remote, "ocr").runner().address == "tcp://10.0.0.5:8786"
    procs = load_params(PARAMS, ["scale.task_runner=processes"]).scale
    assert isinstance(mapper_for(procs, "labels").runner(), ProcessPoolTaskRunner)
