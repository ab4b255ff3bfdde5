"""Encode every captioned image once: VAE posterior mean/log-variance + caption embedding.

Arrays are plain .npy files (memory-mapped by the U-Net stage), rows indexed by
index.parquet. Each row's key hashes the image id, the VAE weights, the image size, the
text encoder and the caption, so a changed input can never pass for a cached one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from components.config import Params
from components.contracts import (
    CAPTIONS,
    LATENTS,
    VAE_DIR,
    UserError,
    atomic_dir,
    progress,
    read_json,
    read_table,
    sha256_bytes,
    sha256_file,
    write_table,
)
from components.text_encoders import get_encoder, save_encoder
from components.vae import load_batch, load_vae

TEXT_ENCODER = "text_encoder"  # a fitted encoder (tfidf) travels with the latents and model
CACHE_FILES = ["mean.npy", "logvar.npy", "text.npy", "index.parquet", "meta.json"]


class LatentCache:
    """The latents stage's output, memory-mapped (the U-Net stage reads only its rows)."""

    def __init__(self, latents_dir: Path):
        d = Path(latents_dir)
        missing = [n for n in CACHE_FILES if not (d / n).exists()]
        if missing:
            raise UserError(f"{d}: latent cache incomplete (missing {', '.join(missing)}); "
                            "run the latents stage first")
        self.mean = np.load(d / "mean.npy", mmap_mode="r")
        self.logvar = np.load(d / "logvar.npy", mmap_mode="r")
        self.text = np.load(d / "text.npy", mmap_mode="r")
        self.index = pd.read_parquet(d / "index.parquet")
        self.meta = read_json(d / "meta.json")

    def identity(self) -> str:
        """A hash of what was encoded (every row's cache key) and how (meta.json)."""
        return sha256_bytes("\n".join([*self.index["key"], json.dumps(
            self.meta, sort_keys=True)]).encode())

    def rows(self, split: str) -> np.ndarray:
        return self.index.loc[self.index["split"] == split, "row"].to_numpy(np.int64)


def latents(params: Params) -> dict:
    caps = read_table(CAPTIONS, "captions")
    caps = caps[caps["split"].isin(["train", "val"])].reset_index(drop=True)
    if caps.empty:
        raise UserError(f"{CAPTIONS}: no train/val rows to encode")
    vae = load_vae(VAE_DIR)
    size = vae.cfg.image_size
    vae_hash = sha256_file(VAE_DIR / "weights.safetensors")[:16]
    encoder = get_encoder(params.text_encoder,
                          fit_captions=caps.loc[caps["split"] == "train", "caption"].tolist())

    means, logvars = [], []
    bs = params.latents.batch_size
    with torch.no_grad():
        for i in progress(range(0, len(caps), bs), desc="latents", unit="batch"):
            x = load_batch(caps["path"].iloc[i : i + bs].tolist(), size)
            mean, logvar = vae.encode(x)
            means.append(mean.float().numpy())
            logvars.append(logvar.float().numpy())
    mean = np.concatenate(means).astype(np.float32)
    logvar = np.concatenate(logvars).astype(np.float32)
    enc = encoder.encode(caps["caption"].tolist())
    scale = float(1.0 / max(mean.std(), 1e-6))

    index = pd.DataFrame({
        "id": caps["id"], "row": np.arange(len(caps), dtype=np.int64), "split": caps["split"],
        "caption": caps["caption"],
        "key": [sha256_bytes(f"{i}|{vae_hash}|{size}|{encoder.name}|{c}".encode())[:16]
                for i, c in zip(caps["id"], caps["caption"], strict=True)],
    })
    meta = {"scale_factor": scale, "latent_shape": list(mean.shape[1:]),
            "text_dim": int(enc.vectors.shape[1]), "text_encoder": encoder.name,
            "vae_weights": vae_hash, "image_size": size}
    with atomic_dir(LATENTS) as tmp:
        np.save(tmp / "mean.npy", mean)
        np.save(tmp / "logvar.npy", logvar)
        np.save(tmp / "text.npy", enc.vectors)
        write_table(index, tmp / "index.parquet", "latent_index")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        save_encoder(encoder, tmp / TEXT_ENCODER)
    return {"images": len(caps), "scale_factor": round(scale, 5),
            "latent_shape": "x".join(map(str, mean.shape[1:])),
            "captions_truncated": enc.n_truncated,
            "captions_truncated_share": round(enc.n_truncated / len(caps), 4)}
