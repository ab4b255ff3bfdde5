"""`tinyldm serve` refuses abusive work before any sampling: a bearer token when set, the
body size, requests at once (429 + Retry-After), prompts and steps per request."""

from __future__ import annotations

import asyncio

import httpx
import pandas as pd
import pytest

from components.config import Serve
from components.ship.serving import guarded

CFG = Serve(max_prompts=2, max_steps=30, max_body_bytes=2048, max_concurrent=1,
            retry_after_s=7)


def _slow_app(release: asyncio.Event, started: asyncio.Event):
    async def app(scope, receive, send):
        if scope["path"] == "/invocations":  # sampling: until released
            started.set()
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    return app


def _run(coro):
    return asyncio.run(coro)


def test_one_request_at_a_time_the_next_is_told_when_to_retry() -> None:
    async def go():
        release, started = asyncio.Event(), asyncio.Event()
        app = guarded(_slow_app(release, started), CFG, "")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            first = asyncio.create_task(client.post("/invocations", content=b"{}"))
            await started.wait()
            # (a guard that let it through would hang it: fail in 10 s instead)
            busy = await asyncio.wait_for(client.post("/invocations", content=b"{}"), 10)
            ping = await client.get("/ping")  # health checks are never refused
            release.set()
            done = await first
            after = await client.post("/invocations", content=b"{}")
        return busy, ping, done, after

    busy, ping, done, after = _run(go())
    assert busy.status_code == 429 and busy.headers["retry-after"] == "7"
    assert "serve.max_concurrent=1" in busy.json()["message"]
    assert ping.status_code == 200 and done.status_code == 200
    assert after.status_code == 200  # the slot is free again


def test_token_and_body_size() -> None:
    async def go():
        release, started = asyncio.Event(), asyncio.Event()
        release.set()
        app = guarded(_slow_app(release, started), CFG, "s3cret")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            return [await client.post("/invocations", content=b"{}"),
                    await client.post("/invocations", content=b"{}",
                                      headers={"Authorization": "Bearer wrong"}),
                    await client.post("/invocations", content=b"x" * 4096,
                                      headers={"Authorization": "Bearer s3cret"}),
                    await client.post("/invocations", content=b"{}",
                                      headers={"Authorization": "Bearer s3cret"}),
                    await client.get("/ping")]

    none, wrong, big, ok, ping = _run(go())
    assert none.status_code == 401 and wrong.status_code == 401
    assert none.headers["www-authenticate"] == "Bearer"
    assert big.status_code == 413 and "serve.max_body_bytes=2048" in big.json()["message"]
    assert ok.status_code == 200 and ping.status_code == 200


@pytest.mark.parametrize("prompts,params,reason", [
    (["a", "b", "c"], {}, "3 prompts in one request, over serve.max_prompts=2"),
    (["a"], {"steps": 31}, r"steps=31: must be 1..30 \(serve.max_steps\)"),
    (["a"], {"steps": 0}, "steps=0: must be 1..30"),
])
def test_a_request_over_a_limit_is_a_400_before_sampling(prompts, params, reason) -> None:
    from mlflow.exceptions import MlflowException
    from test_numbers import _Recorder

    from components.ship.pyfunc_model import GeneratorModel

    model, rec = GeneratorModel(), _Recorder()
    model.generator, model.limits = rec.gen, CFG
    with pytest.raises(MlflowException, match=reason) as e:
        model.predict(None, pd.DataFrame({"prompt": prompts}), params)
    assert e.value.get_http_status_code() == 400 and rec.calls == []
    model.predict(None, pd.DataFrame({"prompt": ["a", "b"]}), {"steps": 30})
    assert rec.calls == [["a", "b"]]
