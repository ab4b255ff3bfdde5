import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["services"]  # the postgres and mlflow_server fixtures

for k, v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
             "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false",
             "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false", "CI": os.environ.get("CI", "1")}.items():
    os.environ.setdefault(k, v)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A temp repo root holding a copy of params.yaml and the brand files; stage paths
    resolve inside it."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "labels" / "brand", tmp_path / "labels" / "brand")
    monkeypatch.chdir(tmp_path)
    return tmp_path
