"""Loading a registered generator and drawing with it: `tinyldm generate` and `tinyldm serve`
(MLflow's scoring server over the same pyfunc model, in this process, behind limits)."""

from __future__ import annotations

import base64
import functools
import json
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
    read = out["prompt_read"].iloc[0] if "prompt_read" in out else prompt
    if read != prompt:
        print(f"generate: read the prompt as: {read}", file=sys.stderr)
    return base64.b64decode(out["image"].iloc[0])


LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def serve_app(uri: str | None, params: Params, host: str, port: int) -> tuple[str, Any]:
    """The resolved version (an alias pinned now) and an ASGI app serving it: MLflow's own
    scoring server (`mlflow models serve`'s /invocations, /ping) behind the request limits
    of params.serve and, when its variable is set, a bearer token."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: must be 1..65535")
    cfg = params.serve
    token = os.environ.get(cfg.token_env, "")
    if host not in LOOPBACK and not token:
        raise UserError(f"--host {host}: serving beyond this machine needs a bearer token; "
                        f"set {cfg.token_env} (serve.token_env) or serve on 127.0.0.1")
    resolved = resolve_model_uri(uri, params)
    model = load_generator_model(resolved)
    if resolved.startswith("models:/"):
        resolved = _check_registered(resolved)
    model.unwrap_python_model().limits = cfg  # per-request limits, checked in predict
    from mlflow.pyfunc import scoring_server

    return resolved, guarded(scoring_server.init(model), cfg, token)


def guarded(app: Any, cfg: Any, token: str) -> Any:
    """`app` behind the server-wide limits (pure ASGI, before any body is read): a bearer
    token when `token` is set (401), a declared body size (411 without one, 413 over
    serve.max_body_bytes) and at most serve.max_concurrent requests at once (429 with
    Retry-After); /ping and /health stay open."""
    busy = 0

    async def reply(send, status: int, message: str, headers=()) -> None:
        body = json.dumps({"error_code": status, "message": message}).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), *headers]})
        await send({"type": "http.response.body", "body": body})

    async def guard(scope, receive, send) -> None:
        nonlocal busy
        if scope["type"] != "http" or scope["path"] in ("/ping", "/health", "/version"):
            return await app(scope, receive, send)
        headers = dict(scope["headers"])
        if token and headers.get(b"authorization", b"").decode() != f"Bearer {token}":
            return await reply(send, 401, "missing or wrong bearer token (Authorization: "
                                          "Bearer <token>)", [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if scope["method"] == "POST" and length is None:
            return await reply(send, 411, "send a Content-Length")
        if length is not None and int(length) > cfg.max_body_bytes:
            return await reply(send, 413, f"request body of {int(length)} bytes, over "
                                          f"serve.max_body_bytes={cfg.max_body_bytes}")
        if busy >= cfg.max_concurrent:
            return await reply(send, 429, f"busy: {busy} request(s) sampling "
                                          f"(serve.max_concurrent={cfg.max_concurrent}); "
                                          f"retry in {cfg.retry_after_s} s",
                               [(b"retry-after", str(cfg.retry_after_s).encode())])
        busy += 1
        try:
            return await app(scope, receive, send)
        finally:
            busy -= 1

    return guard
