"""Data-parallel training: `processes: 2` runs the same VAE and U-Net stages in 2 CPU
processes (torchrun, gloo); they stay in step and train like one process with the
doubled batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_models import write_tiny_cache

from components.config import Diffusion, Unet, Vae, load_params
from components.training.unet import train_unet
from components.training.vae import train_vae

VAE_CFG = Vae(image_size=16, base_channels=8, channel_mult=[1, 2], latent_channels=4,
              epochs=2, batch_size=2, bf16=False, device="cpu")
UNET_CFG = Unet(n_feat=8, steps=12, batch_size=2, warmup=2, bf16=False, device="cpu",
                checkpoint_every=0)


def _sets(section: str, cfg) -> list[str]:
    return [f"--set={section}.{k}={json.dumps(v)}" for k, v in cfg.model_dump().items()]


def _stage(name: str, sets: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "flows.cli", "stage", name, *sets], env=env,
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert f"{name}: 2 data-parallel processes (torchrun)" in run.stdout
    return json.loads(Path(f"reports/metrics/{name}.json").read_text())


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "weights.safetensors"))


def test_two_gloo_processes_train_in_step_like_one_with_the_doubled_batch(workdir: Path):
    (workdir / "img").mkdir()
    paths = []
    for i in range(10):
        paths.append(workdir / "img" / f"{i:02d}.png")
        Image.new("RGB", (24, 24), (25 * i, 200 - 15 * i, 90 + 10 * (i % 3))).save(paths[-1])
    (workdir / "data" / "split").mkdir(parents=True)
    pd.DataFrame({"id": [p.stem for p in paths], "path": [str(p) for p in paths],
                  "split": ["train"] * 8 + ["val"] * 2, "format": "poster"}).to_parquet(
        workdir / "data" / "split" / "split.parquet")
    encoder = load_params().text_encoder.name
    write_tiny_cache(workdir / "data" / "latents", shape=(4, 8, 8), encoder=encoder)

    vae2 = _stage("vae", _sets("vae", VAE_CFG.model_copy(update={"processes": 2})))
    unet2 = _stage("unet", [*_sets("unet", UNET_CFG.model_copy(update={"processes": 2})),
                            "--set=diffusion.timesteps=50"])
    for m in (vae2, unet2):
        assert m["processes"] == 2 and m["device"] == "cpu"
        assert m["process_weight_spread"] == 0.0  # the processes ended in step
    for w in (_weights(workdir / "models" / "vae"), _weights(workdir / "models" / "unet")):
        assert all(torch.isfinite(v.float()).all() for v in w.values())

    # one process with the global batch (2 x 2) takes the same steps on the same draws
    vae1 = train_vae(VAE_CFG.model_copy(update={"batch_size": 4}), paths[:8], paths[8:],
                     workdir / "vae1")
    unet1 = train_unet(UNET_CFG.model_copy(update={"batch_size": 4}), Diffusion(timesteps=50),
                       workdir / "data" / "latents", workdir / "unet1", encoder,
                       workdir / "models" / "vae")
    assert vae1["processes"] == 1 and unet1["processes"] == 1
    assert vae1["epoch_losses"] == pytest.approx(vae2["epoch_losses"], rel=1e-5)
    assert unet1["final_loss"] == pytest.approx(unet2["final_loss"], rel=1e-5)
    for one, two in [("vae1", "models/vae"), ("unet1", "models/unet")]:
        w1, w2 = _weights(workdir / one), _weights(workdir / two)
        assert w1.keys() == w2.keys()
        # Adam turns float-rounding differences in tiny gradients into up to lr a step
        assert max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1) < 0.01


def test_cuda_device_without_a_gpu_is_one_line(monkeypatch):
    from components.contracts import UserError
    from components.training.runtime import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="unet.device is cuda but no CUDA GPU"):
        runtime("cuda", "auto", "unet")
    rt = runtime("auto", False, "unet")
    assert rt.device.type == "cpu" and rt.precision == "fp32" and rt.world == 1
