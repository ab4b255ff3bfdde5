"""The registered model's versions and aliases: promote (through the gate or forced),
rollback, list; the champion's numbers to gate against. Aliases, never stages: each new
version is `challenger`; `champion` moves only through here, remembering what it replaced."""

from __future__ import annotations

import getpass
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from components.config import Params
from components.contracts import UserError
from components.ship.gate import decide
from components.tracking import numeric, setup_store

CHAMPION = "champion"
CHALLENGER = "challenger"
GATE_STATE = "gate.state"  # version tag: pending -> settled (see await_earlier_gates)
GATE_WAIT_S = 1800.0  # longest wait for an earlier version's gate (a champion re-measure)


def mlflow_client() -> Any:
    from mlflow import MlflowClient

    setup_store()
    return MlflowClient()


def alias_version(client: Any, name: str, alias: str) -> Any | None:
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
    from components.judge.evaluate import measure

    with tempfile.TemporaryDirectory() as d:
        path = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{mv.version}", dst_path=d))
        flavor = yaml.safe_load((path / "MLmodel").read_text())["flavors"]["python_function"]
        sampler = (flavor.get("config") or {}).get("sampler")  # the logged model_config
        ev = measure(params, path / "artifacts" / "vae", path / "artifacts" / "unet",
                     Sampler(**sampler) if sampler else None,
                     what=f"re-measuring champion v{mv.version}",
                     upscaler_dir=path / "artifacts" / "upscaler")  # none: Lanczos
    return numeric(ev.metrics)


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


def tag_version(client: Any, name: str, mv: Any, tags: dict[str, str]) -> None:
    """Tags on the version and on the run that logged it (where people look for them)."""
    for k, v in tags.items():
        client.set_model_version_tag(name, str(mv.version), k, v)
        client.set_tag(mv.run_id, k, v)


def move_champion(client: Any, name: str, mv: Any, previous: Any | None, how: str,
                   reason: str) -> None:
    """`champion` -> mv, remembering the champion it replaces so `rollback` can go back."""
    client.set_registered_model_alias(name, CHAMPION, str(mv.version))
    challenger = alias_version(client, name, CHALLENGER)
    if challenger is not None and challenger.version == mv.version:
        client.delete_registered_model_alias(name, CHALLENGER)  # no longer pending
    tag_version(client, name, mv, {
        "champion.previous": str(previous.version) if previous is not None else "",
        "champion.how": how, "champion.by": _who(), "champion.reason": reason[:5000],
        "champion.at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")})


def await_earlier_gates(client: Any, name: str, version: int,
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


def get_version(client: Any, name: str, version: str | int) -> Any:
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
    client = mlflow_client()
    require_model(client, name)
    mv = get_version(client, name, version)
    champ = alias_version(client, name, CHAMPION)
    if champ is not None and champ.version == mv.version:
        raise UserError(f"version {mv.version} is already the champion of {name!r}")
    if force:
        if not (reason or "").strip():
            raise UserError("promote --force: say why with --reason TEXT (it is recorded "
                            "with who forced it)")
        move_champion(client, name, mv, champ, "forced", reason or "")
        tag_version(client, name, mv, {"champion.forced": "true"})
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
    move_champion(client, name, mv, champ, "promote", decision.reason)
    return {"version": int(mv.version), "previous": champ and int(champ.version),
            "how": "gate", "reason": decision.reason}


def rollback(params: Params, reason: str | None = None) -> dict:
    """`champion` back to the version it replaced; again and again, like an undo stack."""
    name = params.register_.model_name
    client = mlflow_client()
    require_model(client, name)
    champ = alias_version(client, name, CHAMPION)
    if champ is None:
        raise UserError(f"model {name!r} has no champion to roll back; promote one with "
                        "`tinyldm promote VERSION`")
    previous = (champ.tags or {}).get("champion.previous", "")
    if not previous:
        raise UserError(f"champion v{champ.version} of {name!r} replaced no earlier champion; "
                        "nothing to roll back to (promote a version instead)")
    prev = get_version(client, name, previous)
    client.set_registered_model_alias(name, CHAMPION, str(prev.version))
    tag_version(client, name, champ, {
        "rollback.by": _who(), "rollback.reason": (reason or "")[:5000],
        "rollback.at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "rollback.to": str(prev.version)})
    return {"version": int(prev.version), "from": int(champ.version)}


def list_models(params: Params) -> list[dict]:
    """Every version, newest first: aliases, gate decision, key metrics, data version."""
    name = params.register_.model_name
    client = mlflow_client()
    require_model(client, name)
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


def require_model(client: Any, name: str) -> None:
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
