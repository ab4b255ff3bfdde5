"""Fan per-image work out through a Prefect task runner, as params.scale says. Wiring only:
the work is the stages' chunk functions (components.ingest.ocr.ocr_chunk, labels.label_chunk),
handed over as `mapper(fn, chunks)`.

- threads (the default): no mapper; the stage keeps its own thread pool. Going through
  Prefect costs ~10 s a stage on a 2-core box (import, temporary API server, flow run)
  and buys nothing on one machine.
- processes: a Prefect flow whose task runs once per chunk on ProcessPoolTaskRunner.
- dask: the same flow on prefect-dask's DaskTaskRunner: a LocalCluster started for the
  stage (127.0.0.1 only), or the scheduler at scale.dask_address.

Task runs report to Prefect's API. With no PREFECT_API_URL set, every worker process would
start its own temporary server (~6 s each, all on one SQLite file), so one is started here
and this machine's workers are pointed at it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from components.config import Params, Scale
from components.contracts import UserError

if TYPE_CHECKING:
    from components.fanout import Mapper

FANOUT_STAGES = {"ocr", "labels"}  # stage functions that take a `mapper`
CONNECT_TIMEOUT_S = 10


def stage_kwargs(stage: str, params: Params) -> dict:
    """Extra keyword arguments of a stage function: the mapper, for per-image stages."""
    return {"mapper": mapper_for(params.scale, stage)} if stage in FANOUT_STAGES else {}


def mapper_for(scale: Scale, name: str) -> Mapper | None:
    """None for threads (the stage's own pool), else a Prefect task-runner mapper."""
    return None if scale.task_runner == "threads" else TaskRunnerMapper(scale, name)


@dataclass(frozen=True)
class _Failed:
    """A user-fixable failure on a worker, carried back as data: the CLI prints one line,
    not a traceback per task run in the log."""
    message: str


def _run_chunk(fn: Callable[[list], list], chunk: list, index: int) -> list | _Failed:
    """The task: one chunk, on a worker."""
    try:
        return fn(chunk)
    except UserError as e:
        return _Failed(str(e))


# The flow's inputs stay in this process, keyed by a small id: Prefect sends the flow run's
# parameters and the flow itself (a closure included) with every task to the workers.
_JOBS: dict[str, tuple[Callable[[list], list], list[list], str]] = {}


def _fanout(job: str) -> Iterator[list | _Failed]:
    """The flow: one task run per chunk; each chunk's result in order, as it arrives."""
    from prefect import task, unmapped
    from prefect.cache_policies import NO_CACHE

    fn, chunks, name = _JOBS[job]
    run_chunk = task(_run_chunk, name=f"{name}-chunk", cache_policy=NO_CACHE,
                     persist_result=False, task_run_name=f"{name}-chunk-{{index}}")
    for future in run_chunk.map(fn=unmapped(fn), chunk=chunks, index=range(len(chunks))):
        yield future.result()


def _is_local(address: str) -> bool:
    host = urlsplit(address if "://" in address else f"tcp://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_scheduler(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> int:
    """The number of workers at the scheduler; one line naming the fix when there is no
    scheduler or no worker (tasks would wait forever)."""
    from distributed import Client

    try:
        with Client(address, timeout=timeout_s, set_as_default=False) as client:
            workers = len(client.scheduler_info(n_workers=-1)["workers"])
    except (OSError, TimeoutError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"scale.dask_address {address}: no Dask scheduler answered ({why}); "
                        f"start one there (`dask scheduler`, then `dask worker {address}` on "
                        "each machine) or set scale.dask_address to \"\" for a local "
                        "cluster") from None
    if not workers:
        raise UserError(f"scale.dask_address {address}: the scheduler has no workers; start "
                        f"some (`dask worker {address}`) and run again")
    return workers


@contextlib.contextmanager
def _shared_api(reachable: bool) -> Iterator[None]:
    """Point worker processes at this process's Prefect API (see the module docstring)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    if not reachable:
        print("scale: PREFECT_API_URL is not set, so each remote Dask worker starts its own "
              "temporary Prefect server (slow, runs not seen here); set it to a Prefect "
              "server both can reach (infra/)")
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one this process's flow runs use too
    server.start()
    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url  # processes spawned from here
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):  # context sent to Dask
            yield
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old


class TaskRunnerMapper:
    """mapper(fn, chunks): a Prefect flow whose task runs fn once per chunk on the runner
    params.scale names; yields each chunk's result in order, as it arrives."""

    def __init__(self, scale: Scale, name: str) -> None:
        self.scale, self.name = scale, name
        remote = scale.task_runner == "dask" and scale.dask_address
        self.workers = 0 if remote else scale.workers or os.cpu_count() or 1

    def runner(self):
        s = self.scale
        if s.task_runner == "processes":
            from prefect.task_runners import ProcessPoolTaskRunner

            return ProcessPoolTaskRunner(max_workers=self.workers)
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise UserError("scale.task_runner: dask needs the dask extra; install it with "
                            "pip install -e '.[dask]' (or set scale.task_runner: threads)"
                            ) from None
        if s.dask_address:
            return DaskTaskRunner(address=s.dask_address,
                                  client_kwargs={"timeout": CONNECT_TIMEOUT_S})
        return DaskTaskRunner(cluster_kwargs={
            "n_workers": self.workers, "threads_per_worker": 1, "processes": True,
            "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0",  # the log names its port
            "silence_logs": logging.WARNING})

    def __call__(self, fn: Callable[[list], list], chunks: list[list]) -> Iterator[list]:
        from prefect import flow

        address = self.scale.dask_address if self.scale.task_runner == "dask" else ""
        if address:
            self.workers = check_scheduler(address)
        runner = self.runner()  # imports distributed, which sets its loggers to INFO
        logging.getLogger("distributed").setLevel(logging.WARNING)  # a local scheduler's
        fanout = flow(_fanout, name=f"tinyldm-{self.name}", task_runner=runner,
                      persist_result=False)
        job = uuid.uuid4().hex
        _JOBS[job] = (fn, chunks, self.name)
        try:
            with _shared_api(not address or _is_local(address)), \
                    contextlib.closing(fanout(job)) as results:
                for got in results:
                    if isinstance(got, _Failed):
                        raise UserError(got.message)
                    yield got
        except Exception as e:
            if type(e).__name__ not in ("KilledWorker", "BrokenProcessPool"):
                raise
            raise UserError(f"{self.name}: a worker process died running a chunk of "
                            f"{self.scale.chunk_size} images (often: out of memory); give "
                            "the workers more memory or lower scale.chunk_size") from None
        finally:
            del _JOBS[job]
