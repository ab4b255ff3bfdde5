"""Each text encoder end to end on tiny data: the packaged MiniLM, any transformers model
from a local folder (a tiny random BERT with a tokenizer trained here), and TF-IDF."""

from __future__ import annotations

import numpy as np
import pytest

from components.config import TextEncoder
from components.contracts import UserError
from components.models.text_encoders import TfidfTextEncoder, get_encoder, save_encoder

CAPTIONS = [f'{s} {c} {k} poster, text at the {layout}, reading "{t}"'
            for s, c, k, layout, t in [
                ("vivid", "red", "solid", "centre", "SUMMER SALE"),
                ("soft", "blue", "gradient", "top", "NEW ARRIVALS"),
                ("muted", "green", "solid", "left", "GRAND OPENING"),
                ("vivid", "yellow", "gradient", "bottom", "FREE SHIPPING"),
                ("soft", "purple", "solid", "right", "BIG EVENT"),
                ("vivid", "pink", "solid", "centre", "HOT PICKS")]]


def _check(vectors: np.ndarray, n: int, dim: int) -> None:
    assert vectors.shape == (n, dim) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


def test_minilm_is_pretrained_and_tells_colours_apart() -> None:
    enc = get_encoder(TextEncoder(name="minilm"))
    out = enc.encode(CAPTIONS[:2])
    _check(out.vectors, 2, 384)
    assert out.n_truncated == 0
    same = enc.encode([CAPTIONS[0], CAPTIONS[0]]).vectors
    assert np.allclose(same[0], same[1], atol=1e-5)
    assert float(out.vectors[0] @ out.vectors[1]) < 0.99


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A randomly initialised 1-layer BERT and a WordPiece tokenizer trained with
    `tokenizers` on the captions, saved like any hub model."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CAPTIONS * 5, trainers.WordPieceTrainer(vocab_size=200,
                                                                     special_tokens=special))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    BertModel(BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(folder)
    return str(folder)


def test_hf_encoder_from_a_local_folder(tiny_bert: str) -> None:
    enc = get_encoder(TextEncoder(name=f"hf:{tiny_bert}", max_tokens=64))
    _check(enc.encode(CAPTIONS).vectors, len(CAPTIONS), 32)


def test_bf16_encoding_is_close_to_fp32_and_keyed_apart(tiny_bert: str) -> None:
    """text_encoder.bf16: states within bf16 rounding of fp32's, under another identity (the
    latent cache key), so a cache never mixes the two."""
    fp32 = get_encoder(TextEncoder(name=f"hf:{tiny_bert}", max_tokens=64, bf16=False))
    bf16 = get_encoder(TextEncoder(name=f"hf:{tiny_bert}", max_tokens=64, bf16=True))
    assert fp32.identity != bf16.identity
    a, b = fp32.encode(CAPTIONS), bf16.encode(CAPTIONS)
    assert not np.array_equal(a.tokens, b.tokens)
    assert np.abs(a.tokens - b.tokens).max() < 0.05 * np.abs(a.tokens).max()
    _check(b.vectors, len(CAPTIONS), 32)


def test_long_captions_are_counted_or_refused(tiny_bert: str) -> None:
    long = CAPTIONS[0] + " " + " ".join(["sale"] * 80)
    out = get_encoder(TextEncoder(name=f"hf:{tiny_bert}", max_tokens=16)).encode(
        [CAPTIONS[1], long])
    assert out.n_truncated == 1  # never cut silently
    with pytest.raises(UserError, match="exceed the 16-token limit"):
        get_encoder(TextEncoder(name=f"hf:{tiny_bert}", max_tokens=16,
                                policy="error")).encode([long])


def test_chunk_policy_encodes_every_window(tiny_bert: str) -> None:
    """chunk: a long caption is the length-weighted mean of its windows, so its tail counts
    (truncate would drop it) and a short caption encodes exactly as before."""
    head = f"{CAPTIONS[0]} {CAPTIONS[0]}"  # over 16 tokens on its own
    long_a, long_b = f"{head} {' '.join(['sale'] * 40)}", f"{head} {' '.join(['blue'] * 40)}"
    chunk = get_encoder(TextEncoder(name=f"hf:{tiny_bert}", max_tokens=16, policy="chunk"))
    cut = get_encoder(TextEncoder(name=f"hf:{tiny_bert}", max_tokens=16))
    c, t = chunk.encode([long_a, long_b, CAPTIONS[1]]), cut.encode([long_a, long_b, CAPTIONS[1]])
    assert c.n_truncated == t.n_truncated == 2  # counted either way
    assert np.allclose(t.vectors[0], t.vectors[1])  # truncation lost the different tails
    assert not np.allclose(c.vectors[0], c.vectors[1], atol=1e-3)
    assert np.allclose(c.vectors[2], t.vectors[2], atol=1e-5)
    _check(c.vectors, 3, 32)


def test_unknown_or_unreachable_encoder_is_one_line(tmp_path) -> None:
    with pytest.raises(UserError, match="unknown; use minilm, tfidf or hf:"):
        get_encoder(TextEncoder(name="clip"))
    with pytest.raises(UserError, match="cannot load"):
        get_encoder(TextEncoder(name=f"hf:{tmp_path / 'nothing-here'}"))


def test_tfidf_fits_saves_and_reloads_identically(tmp_path) -> None:
    with pytest.raises(UserError, match="not fitted yet"):
        get_encoder(TextEncoder(name="tfidf"))
    enc = get_encoder(TextEncoder(name="tfidf", dim=4), fit_captions=CAPTIONS)
    vectors = enc.encode(CAPTIONS).vectors
    _check(vectors, len(CAPTIONS), 4)
    save_encoder(enc, tmp_path / "te")
    again = get_encoder(TextEncoder(name="tfidf"), saved=tmp_path / "te")
    assert isinstance(again, TfidfTextEncoder)
    assert np.allclose(again.encode(CAPTIONS).vectors, vectors, atol=1e-6)
    with pytest.raises(UserError, match="no fitted tfidf"):
        TfidfTextEncoder.load(tmp_path / "missing")


def test_one_encoder_serves_concurrent_requests(tiny_bert: str) -> None:
    """The served model shares one fast tokenizer between request threads; counting (no
    truncation) and encoding (truncation) at once must not collide ("Already borrowed")."""
    from concurrent.futures import ThreadPoolExecutor

    enc = get_encoder(TextEncoder(name=f"hf:{tiny_bert}", max_tokens=16))
    texts = ["vivid red solid poster reading SALE " * k for k in range(1, 6)]
    alone = enc.encode(texts).vectors

    def work(i: int):
        return enc.count_tokens(texts) if i % 2 else enc.encode(texts).vectors

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(200)))
    assert all(np.array_equal(r, alone) for r in results[::2])
    assert all(r == enc.count_tokens(texts) for r in results[1::2])


def test_generation_encodes_prompts_as_the_training_captions_were(tiny_bert, tmp_path) -> None:
    """The latents stage records its encoder's settings (bf16 resolved); the U-Net carries
    them and Generator.load builds that encoder, not one at today's defaults (256 tokens,
    truncate, bf16 auto): a prompt's states match the captions' the model trained on."""
    import json

    from test_models import write_tiny_cache

    from components.config import Diffusion, Sampler, Unet, Vae
    from components.models.generator import Generator
    from components.models.vae import VAE, save_vae
    from components.training.unet import train_unet

    name = f"hf:{tiny_bert}"
    cache = write_tiny_cache(tmp_path / "latents", dim=32, encoder=name)
    meta = json.loads((cache / "meta.json").read_text())
    settings = {**TextEncoder(name=name).model_dump(mode="json"),
                "max_tokens": 16, "policy": "chunk", "bf16": True}
    (cache / "meta.json").write_text(json.dumps({**meta, "text_encoder_config": settings}))
    vae = VAE(Vae(image_size=32, base_channels=8, channel_mult=[1, 2, 2]))
    save_vae(vae, vae.cfg, tmp_path / "vae")
    train_unet(Unet(n_feat=8, steps=2, batch_size=4, warmup=1, bf16=False),
               Diffusion(timesteps=50), cache, tmp_path / "unet", name, tmp_path / "vae")
    enc = Generator.load(tmp_path / "vae", tmp_path / "unet", Sampler(steps=2)).text_encoder
    assert (enc.max_tokens, enc.policy, enc.bf16) == (16, "chunk", True)
