"""The evaluation report: one self-contained HTML file (images inline as data URIs, no
scripts, nothing fetched), readable offline and attachable to an MLflow run or an email."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from jinja2 import Environment
from PIL import Image

from components.contracts import (
    TRAINING_CURVE,
    UNET_DIR,
    VAE_DIR,
    atomic_write_text,
    results_only,
)

# section title -> metric name prefixes, in report order; the rest go under "other"
GROUPS = [("VAE reconstruction (val)", ("vae_",)),
          ("Fidelity: generated vs real val images",
           ("fd", "kid", "diversity", "fid_", "feature_space", "detail_ratio")),
          ("Prompt adherence (held-out prompts)", ("prompt_adherence_",)),
          ("Banners and stories (held-out prompts at 800 x 400 and 450 x 800)", ("format_",)),
          ("Labeller agreement at the model's size (real val images)",
           ("labeller_agreement_",)),
          ("Adherence per background colour", ("adherence_",)),
          ("Text: OCR on generated images", ("text_",)),
          ("Speed", ("sample_",))]

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tinyldm evaluation</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}
td.v{text-align:right;font-variant-numeric:tabular-nums}
img{image-rendering:pixelated;max-width:100%;border:1px solid #ccc}
figure{margin:1em 0 2em}figcaption{color:#555;margin-top:.3em}
.note{color:#555;font-size:.9em}
</style></head><body>
<h1>tinyldm evaluation</h1>
<p class="note">Feature space for FD/KID: <code>{{ feature_space }}</code>
(lower is better; comparable only between runs with the same feature space and
<code>evaluate.fid_images</code>). Prompt adherence: the share of generated images whose
auto-label equals what the prompt asked.</p>
{% for title, rows in groups %}
<h2>{{ title }}</h2>
<table>{% for k, v in rows %}<tr><td>{{ k }}</td><td class="v">{{ v }}</td></tr>{% endfor %}</table>
{% endfor %}
<h2>Images</h2>
{% for src, caption in images %}
<figure><img src="{{ src }}" alt="{{ caption }}"><figcaption>{{ caption }}</figcaption></figure>
{% endfor %}
<details><summary>Held-out adherence prompts (rows of adherence.png)</summary><ol>
{% for c in cases %}<li>{{ c }}</li>{% endfor %}</ol></details>
{% if free %}<details><summary>Prompts in users' own words (rows of free_prompts.png) and what
each asks for</summary><ol>
{% for c in free %}<li>{{ c }}</li>{% endfor %}</ol></details>{% endif %}
<details><summary>Captions of the real_vs_generated.png columns</summary><ol>
{% for c in real_captions %}<li>{{ c }}</li>{% endfor %}</ol></details>
</body></html>
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def grouped(metrics: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for key, value in metrics.items():
        title = next((t for t, prefixes in GROUPS if key.startswith(prefixes)), "other")
        out.setdefault(title, []).append((key, _fmt(value)))
    return [(t, out[t]) for t in [t for t, _p in GROUPS] + ["other"] if t in out]


def write_report(path: Path, metrics: dict, images: list[tuple[Path, str]],
                 cases: Iterable[dict], real_captions: Iterable[str],
                 free: Iterable[dict] = ()) -> None:
    """The report as one self-contained HTML file. It holds what a re-run reproduces (no
    date, no timings: `dvc repro --force` writes the same bytes); the run's facts are in
    reports/metrics/evaluate.json and MLflow."""
    html = Environment(autoescape=True).from_string(TEMPLATE).render(
        feature_space=metrics.get("feature_space", "?"),
        groups=grouped(results_only(metrics)),
        images=[(_data_uri(p), c) for p, c in images],
        cases=[c["prompt"] for c in cases], real_captions=list(real_captions),
        free=[f"{c['prompt']} ({', '.join(f'{k}: {v}' for k, v in c.items() if k != 'prompt')})"
              for c in free])
    atomic_write_text(path, html)


def training_curves() -> Image.Image | None:
    """The VAE and U-Net loss curves (the DVC plots' data) as one PNG, if they exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(d / TRAINING_CURVE, t) for d, t in [(VAE_DIR, "VAE"), (UNET_DIR, "U-Net")]
              if (d / TRAINING_CURVE).exists()]
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.2), squeeze=False)
    for ax, (path, title) in zip(axes[0], curves, strict=True):
        df = pd.read_csv(path)
        x = df.columns[0]
        ax.plot(df[x], df["loss"], label="loss")
        ax.set_xlabel(x)
        ax.set_ylabel("loss (blue)")
        ax.set_title(f"{title} training loss")
        ax.set_yscale("log")
        if "val_psnr" in df:
            ax2 = ax.twinx()
            ax2.plot(df[x], df["val_psnr"], color="tab:orange", label="val PSNR (dB)")
            ax2.set_ylabel("val PSNR, dB (orange)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
