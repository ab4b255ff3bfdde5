"""The whole pipeline, for real, through the Prefect flow, on tiny settings."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from components import contracts as c
from components.stages import stage_names

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

TINY = [
    "register.model_name=tinyldm-e2e", "register.experiment=tinyldm-e2e",
    "scrape.sources=[{kind: synthetic, n: 48, seed: 3, size: 128}]",
    "vae.epochs=2", "vae.batch_size=16", "upscaler.steps=20", "upscaler.width=16",
    "unet.steps=40", "unet.batch_size=16", "unet.n_feat=32", "unet.log_every=10",
    "unet.sample_every=20",
    "sampler.steps=4", "evaluate.adherence_seeds=1",
    "evaluate.prompts=['vivid red solid poster, text at the centre, reading \"SALE\"']",
]


def _repo_copy(dest: Path) -> None:
    files = subprocess.check_output(["git", "ls-files", "-co", "--exclude-standard"],
                                    cwd=ROOT, text=True).splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True)


def _run(args, cwd, env, timeout=900):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.mark.e2e
def test_pipeline_end_to_end(tmp_path, mlflow_server):
    """Against the shared setup's MLflow: a tracking server on a PostgreSQL backend store
    (tests/services.py); everything else embedded (Prefect's temporary server, no remote)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _repo_copy(repo)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING",
                                                                   "PREFECT_API"))}
    env.update(PATH=f"{BIN}:{env['PATH']}", PREFECT_HOME=str(tmp_path / "prefect"), CI="1",
               MLFLOW_TRACKING_URI=mlflow_server.url)
    sets = [a for s in TINY for a in ("--set", s)]
    r = _run([str(BIN / "tinyldm"), "run", *sets], repo, env)
    out = r.stdout + r.stderr
    assert "tinyldm run summary" in out, out[-3000:]

    tables = {c.RAW_MANIFEST: "raw_manifest", c.GROUND_TRUTH: "ground_truth",
              c.OCR_TABLE: "ocr", c.VALID_MANIFEST: "validated_manifest",
              c.QUARANTINE: "quarantine", c.CAPTIONS: "captions",
              c.LATENTS / "index.parquet": "latent_index"}
    for path, table in tables.items():
        df = c.read_table(repo / path, table)
        assert table in ("quarantine",) or len(df) > 0, path
    caps = c.read_table(repo / c.CAPTIONS, "captions")
    assert set(caps["split"]) <= {"train", "val", "test"} and caps["caption"].str.len().min() > 10
    for f in ["models/vae/weights.safetensors", "models/vae/config.json",
              "models/unet/weights.safetensors", "models/unet/config.json",
              "reports/eval/grids/samples.png", "reports/eval/grids/real_vs_generated.png",
              "reports/eval/report.html", "data/labels/labelstudio_tasks.json",
              "reports/validation/gx_results.json"]:
        assert (repo / f).stat().st_size > 0, f
    for stage in stage_names(repo / "dvc.yaml"):
        assert (repo / c.metrics_path(stage)).exists(), stage
    reg = json.loads((repo / c.metrics_path("register")).read_text())
    assert reg["alias"] == "champion" and reg["version"] == 1
    from mlflow import MlflowClient  # the version is in the server's Postgres store

    server = MlflowClient(mlflow_server.url)
    mv = server.get_model_version_by_alias("tinyldm-e2e", "champion")
    assert mv.version == "1"
    # the model hangs in the pipeline's run, and every stage's live run nests under it
    stage_runs = server.search_runs([server.get_run(mv.run_id).info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{mv.run_id}'")
    assert sorted(r.info.run_name for r in stage_runs) == sorted(
        s for s in stage_names(repo / "dvc.yaml") if s != "register")
    unet_run = next(r for r in stage_runs if r.info.run_name == "unet")
    curve = server.get_metric_history(unet_run.info.run_id, "curve.loss")
    assert [m.step for m in curve] == [10, 20, 30, 40]
    assert {a.path for a in server.list_artifacts(unet_run.info.run_id, "samples")} == {
        "samples/step_000020.png", "samples/step_000040.png"}
    assert not (repo / "mlflow.db").exists()  # nothing went to the embedded default
    ev = json.loads((repo / c.metrics_path("evaluate")).read_text())
    assert ev["fd"] >= 0 and ev["fid_images"] >= 2 and "sample_images_per_s" not in ev
    assert ev["detail_ratio_800"] > 0 and ev["detail_ratio_800_real"] > 1
    assert {"format_banner_layout", "format_story_background"} <= set(ev)
    timings = json.loads((repo / "reports/metrics/evaluate.json").read_text())
    assert timings["sample_images_per_s"] > 0
    models = _run([str(BIN / "tinyldm"), "models"], repo, env).stdout
    row = next(r for r in models.splitlines() if r.split()[:1] == ["1"])  # version 1
    assert "champion" in row, models

    png = tmp_path / "gen.png"
    _run([str(BIN / "tinyldm"), "generate", "vivid blue solid poster", "--out", str(png),
          "--width", "96", "--height", "80", "--steps", "3"], repo, env)
    assert Image.open(png).size == (96, 80)

    status = _run([str(BIN / "dvc"), "status"], repo, env).stdout
    assert "up to date" in status, status
    repro = _run([str(BIN / "dvc"), "repro"], repo, env).stdout
    assert "Running stage" not in repro, repro
