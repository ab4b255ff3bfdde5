"""Which function runs each dvc.yaml stage: `tinyldm stage NAME` calls ENTRIES[NAME].

dvc.yaml is the one DAG: the stage names, their order and what each reads and writes are
written there only (`stage_names` reads them). This table adds what dvc.yaml cannot say,
the Python entry of each stage: a function named as the stage, in the phase package that
does its work, taking the validated Params and returning a small metrics dict.
tests/unit/test_stages.py proves the two agree.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import yaml

from components.contracts import UserError

ENTRIES = {
    "scrape": "components.ingest.scrape:scrape",
    "ocr": "components.ingest.ocr:ocr",
    "validate": "components.ingest.validate:validate",
    "labels": "components.labelling.labels:labels",
    "vae": "components.training.vae:vae",
    "upscaler": "components.training.upscaler:upscaler",
    "latents": "components.training.latents:latents",
    "unet": "components.training.unet:unet",
    "evaluate": "components.judge.evaluate:evaluate",
    "register": "components.ship.register:register",
}
DVC_YAML = Path("dvc.yaml")


def dvc_stages(dvc_yaml: Path = DVC_YAML) -> dict[str, dict]:
    """dvc.yaml's stages: name -> its spec (cmd, deps, params, outs, metrics)."""
    if not Path(dvc_yaml).exists():
        raise UserError(f"{dvc_yaml}: missing; run tinyldm from the project folder (the one "
                        "holding dvc.yaml and params.yaml)")
    return (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {}) or {}


def stage_names(dvc_yaml: Path = DVC_YAML) -> list[str]:
    """The stages of dvc.yaml, in the order written there (an order DVC can run them in)."""
    return list(dvc_stages(dvc_yaml))


def entry(name: str) -> Callable[..., dict]:
    """The stage function of `name`."""
    if name not in ENTRIES:
        raise UserError(f"unknown stage {name!r}; stages: {', '.join(ENTRIES)}")
    module, func = ENTRIES[name].split(":")
    return getattr(importlib.import_module(module), func)
