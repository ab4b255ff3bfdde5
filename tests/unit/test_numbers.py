"""Known answers for wiring that a wrong value would slip through (issue 26): the scale
settings given on the command line reach the stage as its mapper."""

from __future__ import annotations

import contextlib

import pytest

from components.config import Sampler
from flows.cli import main
from flows.fanout import TaskRunnerMapper

_MISSING = object()


@pytest.fixture
def called(monkeypatch) -> list[dict]:
    """`tinyldm stage NAME` runs a stand-in entry that records what it was handed; no
    MLflow run is opened."""
    calls: list[dict] = []

    def fake_entry(name: str):
        def stage(params, mapper=_MISSING):
            calls.append({"name": name, "params": params, "mapper": mapper})
            return {"images": 0}
        return stage

    monkeypatch.setattr("flows.stage.entry", fake_entry)
    monkeypatch.setattr("flows.stage.tracking.stage_run",
                        lambda *a, **kw: contextlib.nullcontext())
    return calls


@pytest.mark.parametrize("name", ["ocr", "labels"])
def test_cli_scale_task_runner_reaches_the_stage_as_its_mapper(workdir, called, name) -> None:
    from prefect.task_runners import ProcessPoolTaskRunner

    assert main(["stage", name, "--set", "scale.task_runner=processes",
                 "--set", "scale.workers=3", "--set", "scale.chunk_size=5"]) == 0
    [call] = called
    assert call["params"].scale.task_runner == "processes"
    mapper = call["mapper"]
    assert isinstance(mapper, TaskRunnerMapper), mapper
    assert mapper.scale.task_runner == "processes" and mapper.workers == 3
    assert mapper.name == name
    runner = mapper.runner()
    assert isinstance(runner, ProcessPoolTaskRunner)


def test_threads_hand_no_mapper_and_other_stages_none_at_all(workdir, called) -> None:
    assert main(["stage", "ocr", "--set", "scale.task_runner=threads"]) == 0
    assert main(["stage", "vae", "--set", "scale.task_runner=processes"]) == 0
    ocr_call, vae_call = called
    assert ocr_call["mapper"] is None  # handed, and None: the stage's own thread pool
    assert vae_call["mapper"] is _MISSING


class _Recorder:
    """The generator's request checks as they are, with generate recorded, not run."""

    def __init__(self) -> None:
        from PIL import Image

        from components.models.generator import Generator

        self.gen = Generator.__new__(Generator)
        self.gen.text_encoder = object()  # no token limit to check
        self.gen.layout_stats = self.gen.font_path = None  # trained without glyph maps
        self.gen.sampler_cfg, self.gen.vocabulary = Sampler(), None  # reads prompts as written
        self.calls: list[list[str]] = []
        self.gen.generate = lambda prompts, **kw: (self.calls.append(prompts) or
                                                   [Image.new("RGB", (8, 8))] * len(prompts))


@pytest.mark.parametrize("prompts,params,reason", [
    ([""], {}, "prompt: empty"),
    (["vivid red solid poster", "   "], {}, "prompt: empty"),
    (["vivid red solid poster"], {"width": 801}, "width=801"),
    (["vivid red solid poster"], {"height": 7}, "height=7"),
    (['red poster, reading "SALE"'], {"text_box": "0.1,0.2"}, "text box '0.1,0.2': give x,y"),
])
def test_served_model_refuses_a_bad_request_as_invalid_parameter(prompts, params,
                                                                 reason) -> None:
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from components.ship.pyfunc_model import GeneratorModel

    model, rec = GeneratorModel(), _Recorder()
    model.generator = rec.gen
    with pytest.raises(MlflowException, match=reason) as e:
        model.predict(None, pd.DataFrame({"prompt": prompts}), params)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    assert e.value.get_http_status_code() == 400
    assert rec.calls == []  # refused before any sampling
    out = model.predict(None, pd.DataFrame({"prompt": ["vivid red solid poster"]}), {})
    assert rec.calls == [["vivid red solid poster"]]
    assert list(out.columns) == ["image", "prompt_read"]
