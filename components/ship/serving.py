"""Loading a registered generator and drawing with it: `tinyldm generate` and `tinyldm serve`
(`mlflow models serve` over the same pyfunc model)."""

from __future__ import annotations

import base64
import functools
import os
import re
import sys
from typing import Any

import pandas as pd

from components.config import Params
from components.contracts import UserError
from components.ship.registry import CHAMPION, get_version, mlflow_client, require_model
from components.tracking import setup_store, tracking_uri


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
    from mlflow.exceptions import MlflowException

    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/([^/]+))?", uri)
    if not m:
        raise UserError(f"{uri}: not a model URI; use models:/<name>@<alias> or "
                        "models:/<name>/<version>")
    name, alias, version = m.groups()
    client = mlflow_client()
    require_model(client, name)
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
    get_version(client, name, version)
    return uri


@functools.lru_cache(maxsize=2)
def _load(store: str, uri: str) -> Any:
    """Cached per store too: models:/x/1 in one store is not models:/x/1 in another."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(uri)


def load_generator_model(uri: str) -> Any:
    """The pyfunc generator behind `uri` (alias resolved now, loaded models cached)."""
    setup_store()
    if uri.startswith("models:/"):
        uri = _check_registered(uri)
    return _load(tracking_uri(), uri)


def generate_png(uri: str, prompt: str, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, width: int = 256, height: int = 256,
                 text_box: str = "", typeset: bool = False) -> bytes:
    from mlflow.exceptions import MlflowException

    from components.models.generator import check_size
    from components.models.layout import parse_box

    check_size(width, height)  # before loading anything
    if text_box:
        parse_box(text_box)
    model = load_generator_model(uri)
    p: dict[str, Any] = {"seed": int(seed), "width": int(width), "height": int(height),
                         "text_box": text_box, "typeset": bool(typeset)}
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
    setup_store()
    resolved = resolve_model_uri(uri, params)
    if resolved.startswith("models:/"):
        resolved = _check_registered(resolved)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()
    return resolved, [sys.executable, "-m", "mlflow", "models", "serve", "-m", resolved,
                      "--env-manager", "local", "--host", host, "--port", str(port)]
