"""Live tracking: a training stage's curve and sample grids reach MLflow while it trains."""

from pathlib import Path

import pandas as pd
from test_models import tiny_cache_and_vae

from components import tracking
from components.config import Diffusion, Unet
from components.training.unet import train_unet


def test_unet_stage_logs_its_loss_curve_and_samples_while_it_trains(tmp_path: Path,
                                                                     monkeypatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    cache = tiny_cache_and_vae(tmp_path)
    cfg = Unet(n_feat=8, steps=12, batch_size=4, warmup=1, bf16=False, checkpoint_every=0,
               log_every=2, sample_every=6)
    client = MlflowClient(tracking.tracking_uri())
    during: list[int] = []  # points of the curve the store holds, each time one is logged
    log_metrics = tracking.log_metrics

    def watched(metrics, step=None):
        log_metrics(metrics, step)
        during.append(len(client.get_metric_history(run_id, "curve.loss")))

    monkeypatch.setattr(tracking, "log_metrics", watched)
    with tracking.stage_run("unet", {"unet": cfg.model_dump(mode="json")}, "exp") as run_id:
        train_unet(cfg, Diffusion(timesteps=50), cache, tmp_path / "unet", "stub",
                   tmp_path / "vae")
    assert during == [1, 2, 3, 4, 5, 6]  # readable in the store before training ended
    history = client.get_metric_history(run_id, "curve.loss")
    curve = pd.read_csv(tmp_path / "unet" / "loss.csv")
    assert [(m.step, round(m.value, 6)) for m in history] == list(
        zip(curve["step"], curve["loss"], strict=True))
    assert len({m.timestamp for m in history}) > 1  # logged as it came, not all at the end
    run = client.get_run(run_id)
    assert run.info.run_name == "unet" and run.data.params["unet.steps"] == "12"
    assert {a.path for a in client.list_artifacts(run_id, "samples")} == {
        "samples/step_000006.png", "samples/step_000012.png"}


def test_training_logs_nothing_and_needs_no_mlflow_without_a_run(tmp_path: Path,
                                                                  monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cache = tiny_cache_and_vae(tmp_path)
    cfg = Unet(n_feat=8, steps=4, batch_size=4, warmup=1, bf16=False, checkpoint_every=0,
               log_every=2, sample_every=2)
    assert not tracking.active()
    train_unet(cfg, Diffusion(timesteps=50), cache, tmp_path / "unet", "stub", tmp_path / "vae")
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
