"""What every flow and the CLI share: the process environment, the venv on PATH, where a
failed stage leaves its one-line error. Imported by the CLI and the flows alike (nothing
imports the CLI module)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Embedded defaults: no telemetry, a patient temporary Prefect server.
DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            "TOKENIZERS_PARALLELISM": "false",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
STAGE_ERRORS = Path(".cache") / "stage-errors"  # <stage>.txt: the last failed run's one line


def set_defaults() -> None:
    """The variables above, where the user has not set them."""
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)


def venv_on_path() -> None:
    """Child commands (dvc's `tinyldm stage`, mlflow's uvicorn) must find this environment's
    scripts, also when the venv is not activated."""
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def stage_error_file(name: str) -> Path:
    return STAGE_ERRORS / f"{name}.txt"
