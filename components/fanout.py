"""Per-image work (OCR, auto-labels) over many workers: this process's threads by default,
or a task runner's (flows/fanout.py builds Prefect's process pool or Dask as a Mapper).

A mapper calls fn on each chunk (a list of work items) and yields the chunks' results in
order. fn is a top-level function bound to plain settings (functools.partial), so it
pickles to a process or a Dask worker; it returns plain data, one entry per item.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from components.contracts import UserError, progress

Mapper = Callable[[Callable[[list], list], list[list]], Iterable[list]]


def thread_map(workers: int) -> Mapper:
    """The default mapper: this process's thread pool (no orchestration cost)."""
    def run(fn: Callable[[list], list], chunks: list[list]) -> Iterator[list]:
        with ThreadPoolExecutor(max(1, min(workers, len(chunks)))) as pool:
            yield from pool.map(fn, chunks)
    return run


def fan_out(fn: Callable[[list], list], items: list, mapper: Mapper | None, chunk_size: int,
            workers: int, desc: str) -> list:
    """fn over items through the mapper; flat results in item order, with a progress bar.
    Without a mapper the thread pool takes one item at a time (as ever); a task runner
    takes chunk_size, since each of its tasks has a fixed cost."""
    if not items:  # all cached: start no task runner
        return []
    mapper, size = (thread_map(workers), 1) if mapper is None else (mapper, chunk_size)
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    out: list = []
    with progress(total=len(items), desc=desc, unit="img") as bar:
        for chunk, got in zip(chunks, mapper(fn, chunks), strict=True):
            if len(got) != len(chunk):
                raise RuntimeError(f"{desc}: a worker returned {len(got)} results for "
                                   f"{len(chunk)} images")
            out.extend(got)
            bar.update(len(got))
    return out


def check_worker(root: str) -> None:
    """A worker reads images by path under the repository folder; say so where it cannot."""
    if not Path(root).is_dir():
        raise UserError(f"worker {socket.gethostname()} cannot see {root}: workers read the "
                        "images by path; run them on this machine, or mount the repository "
                        "folder on them at the same path")
