"""`tinyldm stage NAME`: one dvc.yaml stage in this process (what DVC's `cmd` runs).

Params validated → the stage's entry (components/stages.py) inside its live MLflow run →
its metrics file (a DVC metric) → one summary line. A stage with `processes` > 1 runs
again under torchrun; a UserError leaves its one line in .cache/stage-errors/ for the
flow that ran the stage (flows/pipeline.py reads it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from components import tracking
from components.config import load_params
from components.contracts import UserError, write_metrics
from components.stages import entry
from flows.env import stage_error_file
from flows.fanout import stage_kwargs

TREE_WRITER = "register"  # writes the pipeline's run tree itself (components/ship/register.py)


def run(name: str, params_file: Path = Path("params.yaml"),
        overrides: list[str] | None = None) -> dict | None:
    """Run stage `name`; returns its metrics (None on a torchrun worker or launcher)."""
    error_file = stage_error_file(name)
    with contextlib.suppress(OSError):
        error_file.unlink(missing_ok=True)
    try:
        return _run(name, Path(params_file), overrides or [])
    except UserError as e:
        with contextlib.suppress(OSError):  # the CLI prints the line either way
            error_file.parent.mkdir(parents=True, exist_ok=True)
            error_file.write_text(f"{e}\n")
        raise


def _run(name: str, params_file: Path, overrides: list[str]) -> dict | None:
    stage = entry(name)
    params = load_params(params_file, overrides)
    section = getattr(params, name, None)
    if getattr(section, "processes", 1) > 1 and "WORLD_SIZE" not in os.environ:
        _torchrun(name, section.processes, params_file, overrides)
        return None
    main = os.environ.get("RANK", "0") == "0"  # under torchrun: rank 0 logs and reports
    live = main and name != TREE_WRITER
    run = (tracking.stage_run(name, params.model_dump(mode="json", by_alias=True),
                              params.register_.experiment) if live else contextlib.nullcontext())
    with run:
        metrics = stage(params, **stage_kwargs(name, params))
        if live:
            tracking.log_metrics(tracking.flatten(metrics))
    if not main:
        return None
    write_metrics(name, metrics)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in metrics.items() if not isinstance(v, dict | list))
    print(f"{name}: {shown}")
    return metrics


def _torchrun(name: str, processes: int, params_file: Path, overrides: list[str]) -> None:
    """The same stage in `processes` data-parallel processes on this machine (torchrun,
    standalone rendezvous); each runs this command again, with WORLD_SIZE set."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={processes}", "-m", "flows.cli", "stage", name,
           "--params", str(params_file)] + [f"--set={x}" for x in overrides]
    print(f"{name}: {processes} data-parallel processes (torchrun)")
    rc = subprocess.call(cmd)
    if rc:
        raise UserError(f"{name}: a data-parallel process failed (exit {rc}); its error is "
                        "above")
