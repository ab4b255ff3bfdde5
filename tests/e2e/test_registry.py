"""The register stage: the promotion gate (pure), the run tree, and a registration round
trip of a tiny real generator against a throwaway SQLite store."""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image
from services import free_port, wait_http

from components import tracking
from components.config import GateRule, load_params
from components.contracts import CAPTIONS, EVAL_GRIDS, UserError, metrics_path, write_json
from components.ingest.ocr import read_texts
from components.models.layout import fit_layouts
from components.ship import gate, register, registry, serving
from components.ship.gate import decide

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
# the round trips gate on one metric they set by hand
ONE_RULE = ["sampler.steps=2", "register.gate=[{metric: prompt_adherence_background}]"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------ gate
def _rule(metric: str = "m", direction: str = "max", min_margin: float = 0.0) -> GateRule:
    return GateRule(metric=metric, direction=direction, min_margin=min_margin)


def test_better_value_becomes_champion() -> None:
    assert decide([_rule()], {"m": 0.8}, {"m": 0.5}).promote


def test_worse_or_equal_value_stays_challenger() -> None:
    assert not decide([_rule()], {"m": 0.4}, {"m": 0.5}).promote
    assert not decide([_rule()], {"m": 0.5}, {"m": 0.5}).promote  # must beat, not tie


def test_no_champion_means_champion() -> None:
    assert decide([_rule()], {"m": 0.1}, None).promote


def test_min_direction_and_margins() -> None:
    assert decide([_rule(direction="min")], {"m": 0.2}, {"m": 0.3}).promote
    assert not decide([_rule(direction="min")], {"m": 0.4}, {"m": 0.3}).promote
    assert not decide([_rule(min_margin=0.1)], {"m": 0.55}, {"m": 0.5}).promote
    assert decide([_rule(min_margin=0.1)], {"m": 0.65}, {"m": 0.5}).promote
    # a negative margin is a guard rail: up to that much worse still passes
    assert decide([_rule(min_margin=-0.05)], {"m": 0.47}, {"m": 0.5}).promote
    assert not decide([_rule(min_margin=-0.05)], {"m": 0.44}, {"m": 0.5}).promote


def test_every_rule_must_pass_and_each_number_is_reported() -> None:
    rules = [_rule("fd", "min"), _rule("adh", "max", -0.02)]
    d = decide(rules, {"fd": 1.0, "adh": 0.90}, {"fd": 1.2, "adh": 0.95})
    assert not d.promote and "adh 0.9 vs 0.95" in d.reason and "fd" not in d.reason
    assert decide(rules, {"fd": 1.0, "adh": 0.94}, {"fd": 1.2, "adh": 0.95}).promote
    tags = gate.gate_tags(d, "3")
    assert tags["gate.decision"] == "rejected" and tags["gate.champion_version"] == "3"
    assert tags["gate.fd.new"] == "1" and tags["gate.fd.champion"] == "1.2"
    assert tags["gate.fd.passed"] == "true" and tags["gate.adh.passed"] == "false"


def test_missing_or_nan_values_never_promote() -> None:
    assert not decide([_rule()], {"m": math.nan}, None).promote
    d = decide([_rule()], {"m": 0.9}, {"other": 0.1})
    assert not d.promote and "champion has no m" in d.reason and "--force" in d.reason


# ------------------------------------------------------------------ helpers
def test_flatten_uses_dotted_keys_and_keeps_lists() -> None:
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == \
        {"a.b": 1, "a.c": [1, 2], "d": "x"}


def test_stage_params_follow_dvc_yaml(tmp_path: Path) -> None:
    assert tracking.stage_sections("vae", tmp_path) == ["vae"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {"unet": {"cmd": "x", "params": ["unet", "diffusion.timesteps"]}}}))
    sel = tracking.select_params({"unet": {"lr": 1}, "diffusion": {"timesteps": 5, "x": 1},
                                  "vae": {"lr": 2}},
                                 tracking.stage_sections("unet", tmp_path))
    assert sel == {"unet.lr": 1, "diffusion.timesteps": 5}


def test_data_version_reads_dvc_lock_and_ocr_cer(tmp_path: Path) -> None:
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "scrape": {"cmd": "x", "outs": [{"path": "data/raw", "md5": "abc.dir"}]}}}))
    (tmp_path / "reports/metrics").mkdir(parents=True)
    (tmp_path / "reports/metrics/ocr.json").write_text(json.dumps({"cer": 0.12}))
    (tmp_path / "reports/metrics/validate.json").write_text(json.dumps(
        {"gx_success": True, "expectations": 9, "expectations_failed": 0, "quarantined": 4,
         "dataset_problems": []}))
    v = register.data_version(tmp_path)
    assert v["dvc.data/raw"] == "abc.dir"
    assert v["data.ocr_cer"] == "0.12"
    assert v["data.gx_success"] == "true" and v["data.gx_expectations"] == "9"
    assert v["data.gx_expectations_failed"] == "0" and v["data.quarantined"] == "4"
    assert v["data.dataset_problems"] == "none"


def test_resolve_model_uri() -> None:
    params = load_params(PARAMS)
    name = params.register_.model_name
    assert serving.resolve_model_uri(None, params) == f"models:/{name}@champion"
    assert serving.resolve_model_uri("@challenger", params) == f"models:/{name}@challenger"
    assert serving.resolve_model_uri("3", params) == f"models:/{name}/3"
    assert serving.resolve_model_uri("runs:/abc/generator", params) == "runs:/abc/generator"


def test_default_store_is_a_sqlite_file_in_cwd(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.tracking_uri() == "http://mlflow:5000"


def test_empty_registry_is_a_user_error(store: Path) -> None:
    params = load_params(PARAMS)
    with pytest.raises(UserError, match="no model registered yet"):
        serving.load_generator_model(serving.resolve_model_uri(None, params))


def test_size_outside_limits_is_a_user_error() -> None:
    with pytest.raises(UserError, match="width"):
        serving.generate_png("models:/x@champion", "red poster", width=4)
    with pytest.raises(UserError, match="height"):
        serving.generate_png("models:/x@champion", "red poster", height=801)


def test_missing_gate_metric_is_a_user_error(store: Path) -> None:
    params = load_params(PARAMS)
    _write_metrics(store, {"vae_psnr": 20.0})
    with pytest.raises(UserError, match="register.gate: fd, prompt_adherence_background not"):
        register.register(params)


# ------------------------------------------------------------------ round trip
def _write_metrics(root: Path, evaluate: dict) -> None:
    for stage, metrics in [("evaluate", evaluate), ("ocr", {"cer": 0.1, "n_images": 3}),
                           ("vae", {"psnr": 21.5, "loss": {"val": 0.01}})]:
        write_json(root / metrics_path(stage), metrics)
    (root / EVAL_GRIDS).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(root / EVAL_GRIDS / "grid.png")
    (root / "reports/validation").mkdir(parents=True, exist_ok=True)
    (root / "reports/validation/raw.json").write_text("{}")


def _tiny_models(root: Path) -> None:
    """A real VAE + Context U-Net with random weights, saved where the stages put them."""
    import torch

    from components.config import Diffusion, Vae
    from components.config import Upscaler as UpscalerCfg
    from components.models.unet import ContextUnet, save_unet
    from components.models.upscaler import Upscaler, save_upscaler
    from components.models.vae import VAE, save_vae

    torch.manual_seed(0)
    vae_cfg = Vae(image_size=16, base_channels=8, channel_mult=[1, 2], latent_channels=4)
    vae = VAE(vae_cfg)
    save_vae(vae, vae_cfg, root / "models/vae")
    shape = list(vae.latent_shape())
    unet = ContextUnet(in_channels=shape[0], n_feat=8, context_dim=384, height=shape[1],
                       glyph_channels=4, glyph_down=vae.down_factor)
    # a separate EMA copy: save_unet(model, None, ...) aliases the two weight sets, which
    # safetensors refuses
    config = {"diffusion": Diffusion(timesteps=10).model_dump(mode="json"),
              "scale_factor": 1.0, "latent_shape": shape, "text_encoder": "minilm"}
    save_unet(unet, copy.deepcopy(unet), config, root / "models/unet")
    save_upscaler(Upscaler(factor=2, width=8, depth=1), UpscalerCfg(factor=2, width=8, depth=1),
                  root / "models/upscaler")
    Image.new("RGB", (8, 8)).save(root / "models/vae/recon.png")
    Image.new("RGB", (8, 8)).save(root / "models/unet/samples.png")
    (root / "models/unet/loss.csv").write_text("step,loss\n50,0.9\n100,0.5\n150,0.4\n")
    # what the latents stage hands the model for its glyph maps: layout statistics, font
    two = [{"text": "SUMMER", "box": [0.05, 0.38, 0.95, 0.5], "words": []},
           {"text": "SALE", "box": [0.05, 0.5, 0.95, 0.62], "words": []}]
    write_json(root / "models/unet/layout.json",
               fit_layouts([("centre", two), ("centre", two[1:])]))
    shutil.copyfile(params_font(), root / "models/unet/font.ttf")


def params_font() -> str:
    return load_params(PARAMS).brand.font


def test_register_promote_rollback_round_trip(store: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    params = load_params(PARAMS, ONE_RULE)
    name = params.register_.model_name
    _tiny_models(store)
    client = MlflowClient(tracking.tracking_uri())

    _write_metrics(store, {"prompt_adherence_background": 0.5, "vae_psnr": 20.0})
    first = register.register(params)
    assert first["alias"] == "champion" and first["champion_before"] is None
    assert first["model_uri"] == f"models:/{name}/{first['version']}"

    _write_metrics(store, {"prompt_adherence_background": 0.4, "vae_psnr": 20.0})
    worse = register.register(params)
    assert worse["alias"] == "challenger" and worse["champion_before"] == first["version"]
    aliases = client.get_registered_model(name).aliases
    assert aliases == {"champion": first["version"], "challenger": worse["version"]}
    tags = client.get_model_version(name, str(worse["version"])).tags
    assert tags["gate.decision"] == "rejected"
    assert tags["gate.prompt_adherence_background.champion"] == "0.5"

    _write_metrics(store, {"prompt_adherence_background": 0.7, "vae_psnr": 20.0})
    better = register.register(params)
    assert better["alias"] == "champion"
    assert client.get_registered_model(name).aliases["champion"] == better["version"]

    run = client.get_run(better["run_id"])
    assert run.data.metrics["evaluate.prompt_adherence_background"] == 0.7
    assert run.data.metrics["vae.loss.val"] == 0.01
    assert run.data.params["vae.epochs"] == str(params.vae.epochs)
    assert run.data.tags["data.ocr_cer"] == "0.1" and run.data.tags["gate.decision"] == "promoted"
    children = client.search_runs([run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {c.info.run_name for c in children} >= {"vae", "unet", "evaluate"}
    unet_run = next(c for c in children if c.info.run_name == "unet")
    curve = client.get_metric_history(unet_run.info.run_id, "curve.loss")
    assert [(m.step, m.value) for m in curve] == [(50, 0.9), (100, 0.5), (150, 0.4)]
    arts = {a.path for folder in ["eval", "vae", "unet", "validation"]
            for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"eval/grid.png", "vae/recon.png", "unet/samples.png",
            "validation/raw.json"} <= arts

    uri = serving.resolve_model_uri(None, params)
    png = serving.generate_png(uri, "vivid red solid poster", seed=1, width=40, height=24)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size == (40, 24)
    assert serving.generate_png(uri, "vivid red solid poster", seed=1, width=40,
                                 height=24) == png  # same seed, same image
    with pytest.raises(UserError, match="over the text encoder's 256-token limit"):
        serving.generate_png(uri, "red " * 300)
    # --typeset: exactly the requested words at 800 px, where the user's text box says
    png = serving.generate_png(uri, 'vivid red solid poster, reading "OPEN HOUSE"', seed=2,
                               width=800, height=800, text_box="0.1,0.55,0.8,0.3",
                               typeset=True)
    with Image.open(io.BytesIO(png)) as im:  # (random weights: OCR the box, not the noise)
        assert read_texts([im.crop((40, 400, 760, 720))], params.ocr) == ["OPEN\nHOUSE"]
    with pytest.raises(UserError, match="text box '1,2': give x,y,w,h"):
        serving.generate_png(uri, 'red poster, reading "SALE"', text_box="1,2")
    with pytest.raises(UserError, match="no alias 'nope'"):
        serving.load_generator_model(f"models:/{name}@nope")
    with pytest.raises(UserError, match="no registered model 'other'"):
        serving.load_generator_model("models:/other@champion")
    with pytest.raises(UserError, match="has no version 9 .versions: 1, 2, 3"):
        serving.load_generator_model(f"models:/{name}/9")

    # promote: the gate refuses the worse v2; --force needs a reason and records it
    v1, v2, v3 = first["version"], worse["version"], better["version"]
    with pytest.raises(UserError, match=f"version {v2} does not pass the gate.*--force"):
        registry.promote(params, v2)
    with pytest.raises(UserError, match="--reason"):
        registry.promote(params, v2, force=True)
    monkeypatch.setenv("TINYLDM_USER", "alice")
    r = registry.promote(params, v2, force=True, reason="v3 draws the logo wrong")
    assert r == {"version": v2, "previous": v3, "how": "forced",
                 "reason": "v3 draws the logo wrong"}
    tags = client.get_model_version(name, str(v2)).tags
    assert tags["champion.by"] == "alice" and tags["champion.forced"] == "true"
    assert tags["champion.reason"] == "v3 draws the logo wrong"
    assert tags["champion.previous"] == str(v3)
    assert client.get_run(worse["run_id"]).data.tags["champion.by"] == "alice"
    assert "challenger" not in client.get_registered_model(name).aliases  # v2 was it

    # rollback walks back through the champions: v2 -> v3 -> v1 -> nothing left
    assert registry.rollback(params, reason="oops") == {"version": v3, "from": v2}
    assert registry.rollback(params) == {"version": v1, "from": v3}
    with pytest.raises(UserError, match="nothing to roll back to"):
        registry.rollback(params)
    assert client.get_model_version(name, str(v2)).tags["rollback.reason"] == "oops"
    # a version that passes the gate is promoted without force
    assert registry.promote(params, v3)["how"] == "gate"
    with pytest.raises(UserError, match="already the champion"):
        registry.promote(params, v3)

    rows = registry.list_models(params)
    assert [row["version"] for row in rows] == [v3, v2, v1]
    assert rows[0]["aliases"] == "champion" and rows[0]["prompt_adherence_background"] == 0.7
    assert rows[1]["gate"] == "rejected"


# ------------------------------------------------------------------ serving
def _post(url: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_serve_answers_invocations_with_png(store: Path) -> None:
    params = load_params(PARAMS, ONE_RULE)
    _tiny_models(store)
    _write_metrics(store, {"prompt_adherence_background": 0.5})
    version = register.register(params)["version"]
    port = free_port()
    log = open(store / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(Path(sys.executable).parent / "tinyldm"), "serve",
                             "--params", str(PARAMS), "--port", str(port)],
                            cwd=store, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/ping", proc, store / "serve.log", "tinyldm serve")
        status, text = _post(f"{base}/invocations", {
            "dataframe_split": {"columns": ["prompt"], "data": [["vivid red solid poster"]]},
            "params": {"seed": 1, "width": 48, "height": 32}})
        assert status == 200, text
        png = base64.b64decode(json.loads(text)["predictions"][0]["image"])
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.size == (48, 32)
        status, text = _post(f"{base}/invocations", {
            "dataframe_split": {"columns": ["prompt"], "data": [["red"]]},
            "params": {"width": 4}})
        assert status == 400 and "width=4" in text, (status, text)
        status, text = _post(f"{base}/invocations", {
            "dataframe_split": {"columns": ["prompt"], "data": [['red, reading "SALE"']]},
            "params": {"width": 64, "height": 64, "text_box": "0.5,0.5,0.8,0.2"}})
        assert status == 400 and "must lie inside the image" in text, (status, text)
        status, text = _post(f"{base}/invocations", {
            "dataframe_split": {"columns": ["prompt"], "data": [['red, reading "SALE"']]},
            "params": {"width": 400, "height": 400, "typeset": True,
                       "text_box": "0.2,0.4,0.6,0.2"}})
        assert status == 200, text
        png = base64.b64decode(json.loads(text)["predictions"][0]["image"])
        with Image.open(io.BytesIO(png)) as im:
            assert read_texts([im.crop((40, 120, 360, 280))], params.ocr) == ["SALE"]
        status, text = _post(f"{base}/invocations", {  # an empty prompt is the caller's too
            "dataframe_split": {"columns": ["prompt"], "data": [["  "]]}})
        assert status == 400 and "prompt: empty" in text, (status, text)
        assert _children(proc.pid) == []  # the server is this process: nothing to orphan
    finally:
        proc.terminate()  # SIGTERM to the PID, as systemd or a container runtime does
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed"
        log.close()
    out = (store / "serve.log").read_text()
    assert f"serving models:/{params.register_.model_name}/{version}" in out
    assert code == 0 and "tinyldm serve: stopped" in out, (code, out[-2000:])


def _children(pid: int) -> list[int]:
    """PIDs whose parent is pid (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_champion_is_measured_again_when_the_val_data_changed(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Numbers from other val data do not compare: the gate re-measures the champion (its
    downloaded VAE and U-Net, its own sampler) on the current data, and says so."""
    from mlflow import MlflowClient

    from components.judge import evaluate

    params = load_params(PARAMS, ONE_RULE)
    name = params.register_.model_name
    _tiny_models(store)
    _write_metrics(store, {"prompt_adherence_background": 0.5, "eval_set": "old-data"})
    v1 = register.register(params)["version"]

    seen = {}

    def fake_measure(p, vae_dir, unet_dir, sampler, what, upscaler_dir):
        seen.update(vae=(vae_dir / "weights.safetensors").exists(),
                    unet=(unet_dir / "weights.safetensors").exists(),
                    upscaler=(upscaler_dir / "weights.safetensors").exists(),
                    steps=sampler.steps, what=what)
        return evaluate.Evaluation({"prompt_adherence_background": 0.25, "eval_set": "x"},
                                   [], [], [], [], [])

    monkeypatch.setattr(evaluate, "measure", fake_measure)
    _write_metrics(store, {"prompt_adherence_background": 0.4, "eval_set": "new-data"})
    r = register.register(params)
    tags = MlflowClient().get_model_version(name, str(r["version"])).tags
    assert seen == {"vae": True, "unet": True, "upscaler": True, "steps": 2,
                    "what": f"re-measuring champion v{v1}"}
    assert r["alias"] == "champion"  # 0.4 beats the champion's 0.25 on the new data
    tags = MlflowClient().get_model_version(name, str(r["version"])).tags
    assert tags["gate.champion_source"] == "re-measured on the current val data"
    assert tags["gate.prompt_adherence_background.champion"] == "0.25"
    assert tags["gate.champion_version"] == str(v1)

    def broken(*a, **k):
        raise RuntimeError("cannot load this architecture")

    monkeypatch.setattr(evaluate, "measure", broken)
    _write_metrics(store, {"prompt_adherence_background": 0.3, "eval_set": "newer-data"})
    r3 = register.register(params)
    assert r3["alias"] == "challenger"  # vs the stored 0.4
    tags = MlflowClient().get_model_version(name, str(r3["version"])).tags
    assert "re-measuring failed: RuntimeError" in tags["gate.champion_source"]
    # same eval set: the stored numbers are used, nothing is measured
    _write_metrics(store, {"prompt_adherence_background": 0.9, "eval_set": "new-data"})
    assert register.register(params)["alias"] == "champion"


def _stage_run(params, stage: str):
    return tracking.stage_run(stage, params.model_dump(mode="json", by_alias=True),
                              params.register_.experiment)


def test_register_logs_into_the_pipeline_run_beside_the_live_stage_runs(store: Path) -> None:
    from mlflow import MlflowClient

    params = load_params(PARAMS, ONE_RULE)
    _tiny_models(store)
    _write_metrics(store, {"prompt_adherence_background": 0.5, "vae_psnr": 20.0})
    (store / CAPTIONS).parent.mkdir(parents=True)
    pd.DataFrame({"id": ["a", "b", "c"], "caption": ["x", "y", "z"]}).to_parquet(store / CAPTIONS)
    with tracking.pipeline_run(params.register_.experiment) as parent:
        with _stage_run(params, "vae") as vae_run:
            tracking.log_metrics({"curve.loss": 0.3}, 1)
        result = register.register(params)
    assert result["run_id"] == parent  # the model hangs in the pipeline's own run
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(parent)
    children = client.search_runs([run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    names = sorted(c.info.run_name for c in children)
    assert names.count("vae") == 1 and vae_run in {c.info.run_id for c in children}
    assert "unet" in names  # no live run: summarised from its outputs, as before
    assert run.info.status == "FINISHED"
    (captions,) = run.inputs.dataset_inputs  # lineage: the captions table (no images here)
    assert captions.dataset.name == "captions"
    assert json.loads(captions.dataset.profile)["num_rows"] == 3


def test_register_adopts_a_stage_run_that_ran_outside_a_pipeline(store: Path) -> None:
    from mlflow import MlflowClient

    params = load_params(PARAMS, ONE_RULE)
    _tiny_models(store)
    _write_metrics(store, {"prompt_adherence_background": 0.5, "vae_psnr": 20.0})
    with _stage_run(params, "vae") as vae_run:  # e.g. `dvc repro` ran the vae stage
        pass
    client = MlflowClient(tracking.tracking_uri())
    assert "mlflow.parentRunId" not in client.get_run(vae_run).data.tags
    first = register.register(params)
    assert client.get_run(vae_run).data.tags["mlflow.parentRunId"] == first["run_id"]
    second = register.register(params)  # the vae did not run again: it stays with the first
    assert client.get_run(vae_run).data.tags["mlflow.parentRunId"] == first["run_id"]
    later = client.search_runs([client.get_run(vae_run).info.experiment_id],
                               f"tags.mlflow.parentRunId = '{second['run_id']}'")
    assert "vae" in {c.info.run_name for c in later}


def test_an_empty_pipeline_run_is_not_kept(store: Path) -> None:
    from mlflow import MlflowClient

    with tracking.pipeline_run("exp") as run_id:  # every stage up to date: nothing ran
        pass
    assert MlflowClient(tracking.tracking_uri()).get_run(run_id).info.lifecycle_stage == \
        "deleted"


def test_no_credential_reaches_the_logged_params(store: Path) -> None:
    from mlflow import MlflowClient

    assert tracking.param_value(["https://bob:hunter2@intranet.example/a", "x"]) == \
        '["https://***@intranet.example/a", "x"]'
    params = load_params(PARAMS, [*ONE_RULE, "scrape.sources=[{kind: site, start_urls: "
                                  "['https://bob:hunter2@intranet.example/']}]",
                                  "retrain.notify=['env:HOOK', 'block:ops-slack']"])
    _tiny_models(store)
    _write_metrics(store, {"prompt_adherence_background": 0.5})
    run = MlflowClient(tracking.tracking_uri()).get_run(register.register(params)["run_id"])
    logged = json.dumps(run.data.params)
    assert "hunter2" not in logged and "bob:" not in logged
    assert "https://***@intranet.example/" in run.data.params["scrape.sources"]
    assert run.data.params["retrain.notify"] == '["env:HOOK", "block:ops-slack"]'
