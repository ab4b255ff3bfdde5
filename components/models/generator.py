"""The one composition of text encoder + U-Net + sampler + VAE (a diffusers "pipeline").

evaluate, generate and the served MLflow model all call `Generator`, so what is
measured is what is shipped. Prompt i of a call draws its noise from a generator seeded
by (seed, i): the same seed gives the same images, and an image does not depend on the
other prompts in the batch (up to float rounding of batched convolutions).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from components.config import Diffusion as DiffusionCfg
from components.config import Sampler as SamplerCfg
from components.config import TextEncoder as TextEncoderCfg
from components.contracts import UserError
from components.models.buckets import nearest, size_at, stretch
from components.models.diffusion import NoiseSchedule, make_sampler, sample
from components.models.glyphs import glyph_batch
from components.models.images import to_pil
from components.models.layout import plan
from components.models.precision import cpu_autocast
from components.models.prompts import Reading, Vocabulary, normalise, read_prompt
from components.models.typeset import typeset as text_typeset
from components.models.unet import ContextUnet, load_unet, read_unet_config
from components.models.upscaler import Upscaler, load_upscaler
from components.models.vae import VAE, load_vae

MIN_SIDE, MAX_SIDE = 8, 800  # output width/height limits of generate and the served model
# what a prompt that places text but quotes none gets: greeked lines (bars where the words
# go, a mock-up's placeholder), so the text block lands where it asked
GREEKED = "\u2588\u2588\u2588\u2588"


def check_size(width: int | None, height: int | None) -> None:
    for key, v in [("width", width), ("height", height)]:
        if v is not None and not MIN_SIDE <= v <= MAX_SIDE:
            raise UserError(f"{key}={v}: must be between {MIN_SIDE} and {MAX_SIDE} pixels")


def prompt_seed(seed: int, i: int) -> int:
    """A 63-bit seed for prompt i of a call with `seed` (independent streams)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") >> 1


class Generator:
    def __init__(self, vae: VAE, unet: ContextUnet, unet_config: dict, text_encoder: Any,
                 sampler: SamplerCfg, layout_stats: dict | None = None,
                 font_path: str | None = None, upscaler: Upscaler | None = None,
                 vocabulary: Vocabulary | None = None):
        self.vae, self.unet, self.config = vae.eval(), unet.eval(), unet_config
        self.upscaler = upscaler  # native size -> factor x it, for larger outputs
        self.text_encoder = text_encoder
        # what draws a prompt's glyph map: the training data's layout statistics and font
        self.layout_stats, self.font_path = layout_stats, font_path
        # the words its captions named things with (None: a model from before they were kept)
        self.vocabulary = vocabulary
        self.sampler_cfg = sampler  # params.sampler (or what a logged model carries)
        self.schedule = NoiseSchedule(DiffusionCfg(**unet_config["diffusion"]))
        self.scale_factor = float(unet_config["scale_factor"])
        self.latent_shape = tuple(unet_config["latent_shape"])
        # the formats (aspect buckets) it trained on; none recorded: squares only
        self.formats = unet_config.get("formats", {})
        self.max_stretch = float(unet_config.get("max_stretch", 1.25))

    @classmethod
    def load(cls, vae_dir: Path | str, unet_dir: Path | str, sampler: SamplerCfg,
             text_encoder: Any = None, upscaler_dir: Path | str | None = None) -> Generator:
        """`text_encoder` is anything with `.encode(list[str]).vectors` (and `.tokens`, the
        token states, for a U-Net with cross-attention); by default the
        encoder the U-Net was trained with (its config.json names it; a fitted one, tfidf,
        is saved in the U-Net's text_encoder/ folder). `upscaler_dir`: a trained upscaler
        for outputs larger than the native size (none there: Lanczos alone)."""
        config = read_unet_config(Path(unet_dir))
        if text_encoder is None:
            from components.models.text_encoders import get_encoder

            # as the latents stage encoded the training captions (a model from before
            # text_encoder_config: its name, the other settings at their defaults)
            text_encoder = get_encoder(TextEncoderCfg(**config.get(
                "text_encoder_config", {"name": config["text_encoder"]})),
                saved=Path(unet_dir) / "text_encoder")
        unet_dir = Path(unet_dir)
        layout, font = unet_dir / "layout.json", unet_dir / "font.ttf"
        vocab = unet_dir / "vocabulary.json"
        up = Path(upscaler_dir) if upscaler_dir is not None else None
        return cls(load_vae(Path(vae_dir)), load_unet(unet_dir, ema=True), config,
                   text_encoder, sampler,
                   json.loads(layout.read_text()) if layout.exists() else None,
                   str(font) if font.exists() else None,
                   load_upscaler(up) if up is not None and up.exists() else None,
                   Vocabulary(**json.loads(vocab.read_text())) if vocab.exists() else None)

    @property
    def native_size(self) -> int:
        return self.latent_shape[-1] * self.vae.down_factor

    def check_prompts(self, prompts: list[str]) -> None:
        """A request's prompts: not empty, and within the text encoder's token limit (a
        served prompt is refused, not silently cut; training captions follow the caption
        policy instead)."""
        for p in prompts:
            if not p.strip():
                raise UserError("prompt: empty; describe the image the way the training "
                                "captions do, e.g. 'vivid red solid poster, text at the "
                                "centre, figures none, logo no, reading \"SALE\".'")
        limit = getattr(self.text_encoder, "max_tokens", None)
        if limit and hasattr(self.text_encoder, "count_tokens"):
            for p, n in zip(prompts, self.text_encoder.count_tokens(prompts), strict=True):
                if n > limit:
                    raise UserError(f"prompt {p[:40]!r}...: {n} tokens, over the text "
                                    f"encoder's {limit}-token limit; shorten it")

    def format_of(self, width: int | None, height: int | None) -> str | None:
        """The trained format (aspect bucket) a width x height output is sampled in: the
        nearest to W:H, if within the buckets' max_stretch of it; None: none is (or a side
        is not given)."""
        if not width or not height or not self.formats:
            return None
        ratios = {f: v["ratio"] for f, v in self.formats.items()}
        f = nearest(width, height, ratios)
        return f if stretch(width, height, ratios[f]) <= self.max_stretch else None

    def reading(self, prompt: str) -> Reading:
        """What a prompt asks for (prompts.read_prompt) in this model's vocabulary."""
        return read_prompt(prompt, self.vocabulary or Vocabulary(formats=list(self.formats)))

    def read_prompts(self, prompts: list[str]) -> list[str]:
        """The prompts as the U-Net gets them: in the captions' canonical words when
        sampler.normalise is on and the model carries its vocabulary, else as written."""
        if not (self.sampler_cfg.normalise and self.vocabulary):
            return list(prompts)
        return [normalise(p, self.vocabulary) for p in prompts]

    def named_format(self, prompts: list[str]) -> str | None:
        """The trained format all prompts name (their first format word outside the quoted
        text: "solid banner,", "a web banner"); None when none does or they differ."""
        named = {self.reading(p).fields.get("format") for p in prompts}
        named = {f if f in self.formats else None for f in named}
        return named.pop() if len(named) == 1 else None

    def sample_size(self, width: int | None = None, height: int | None = None
                    ) -> tuple[int, int]:
        """The size (w, h) a width x height output is sampled at: its trained format's
        size (`format_of`); else the native square when a side is not given or they are
        equal; else the aspect W:H at about the native pixel count on the U-Net's grid, so
        the shapes and the text block are drawn in that format, not stretched into it."""
        n = self.native_size
        if (f := self.format_of(width, height)) is not None:
            return tuple(self.formats[f]["size"])
        if not width or not height or width == height:
            return n, n
        return size_at(width / height, n, 4 * self.vae.down_factor)

    def text_layouts(self, prompts: list[str], seed: int = 0,
                     text_box: tuple[float, ...] | None = None,
                     size: tuple[int, int] | None = None) -> list[list[dict]]:
        """Where each prompt's quoted text goes (layout.plan: lines and boxes in units of
        the image's width and height, for an image of `size` (w, h; default the native
        square)); a prompt that names a layout but quotes nothing gets GREEKED lines there,
        one that does neither []; prompt i plans with the seed its noise uses. UserError
        naming the prompt when its text cannot be placed."""
        if self.layout_stats is None or self.font_path is None:
            return [[] for _ in prompts]
        # a prompt naming no layout gets the one the training text takes most often
        blocks = self.layout_stats["blocks"]
        usual = max(blocks, key=lambda k: sum(map(len, blocks[k].values())), default="centre")
        w_h = size or (self.native_size, self.native_size)
        # the statistics of the format sampled at, where it has text in that layout
        own = self.layout_stats.get("formats", {}).get(self.format_of(*w_h)) or {}
        out = []
        for i, p in enumerate(prompts):
            reading = self.reading(p)
            layout = reading.fields.get("layout", usual)
            stats = own if layout in own.get("blocks", {}) else self.layout_stats
            try:
                text = reading.text or (GREEKED if "layout" in reading.fields else "")
                out.append(plan(text, layout, stats, self.font_path,
                                prompt_seed(seed, i), *w_h, text_box))
            except UserError as e:
                raise UserError(f"prompt {p[:40]!r}: {e}") from None
        return out

    def glyph_maps(self, layouts: list[list[dict]], size: tuple[int, int] | None = None
                   ) -> torch.Tensor | None:
        """(B, 1, H, W) in 0..1 at `size` (w, h; default the native square), through the
        one glyph renderer; None for a U-Net without glyph input."""
        if not self.unet.glyph_channels:
            return None
        w, h = size or (self.native_size, self.native_size)
        return glyph_batch(layouts, w, h, self.font_path)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> list[Image.Image]:
        return to_pil(self.vae.decode(z / self.scale_factor))

    def to_size(self, images: list[Image.Image], width: int | None = None,
                height: int | None = None, layouts: list[list[dict]] | None = None
                ) -> list[Image.Image]:
        """Native-size samples at width x height (either may be None: the native size),
        the way generate delivers them: larger than the native size through the upscaler
        when there is one (given each image's text `layouts`, an upscaler that reads glyph
        maps draws their letters), then LANCZOS for the remainder."""
        if width is None and height is None:
            return images
        size = (int(width or self.native_size), int(height or self.native_size))
        if self.upscaler is not None and images and (
                size[0] > images[0].width or size[1] > images[0].height):
            glyphs = None
            if self.upscaler.glyphs and layouts is not None:
                f = self.upscaler.factor
                glyphs = glyph_batch(layouts, images[0].width * f, images[0].height * f,
                                     self.font_path)
            images = self.upscaler.upscale(images, glyphs)
        return [im if im.size == size else im.resize(size, Image.Resampling.LANCZOS)
                for im in images]

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, width: int | None = None,
                 height: int | None = None, text_box: tuple[float, ...] | None = None,
                 typeset: bool = False, layouts: list[list[dict]] | None = None
                 ) -> list[Image.Image]:
        """Images at the model's native size (a format the prompts name: its size),
        through the upscaler and LANCZOS to width x height when either is given (the other
        defaults to the native size). The quoted text of each
        prompt is drawn into its glyph map where `text_layouts` places it (inside
        text_box, x,y,w,h in units of the side, when given; `layouts`: plans made
        before); typeset: that text is then drawn crisply at the output size
        (typeset.py)."""
        if not prompts:
            return []
        if width is None and height is None and (f := self.named_format(prompts)):
            width, height = self.formats[f]["size"]  # "a banner": its format's own size
        w, h = self.sample_size(width, height)
        if (w, h) != (self.native_size,) * 2 and self.format_of(width, height) is None:
            seen = ", ".join(f"{f} {r[0]}:{r[1]}" for f, r in
                             ((f, v["ratio"]) for f, v in self.formats.items())) or "square"
            print(f"generate: {width}x{height} is sampled at {w}x{h}; this model was trained "
                  f"on {seen} only, so expect its layouts in this format to be less "
                  "faithful", file=sys.stderr)
        if layouts is None:
            layouts = self.text_layouts(prompts, seed, text_box, (w, h))
        cfg = self.sampler_cfg
        if steps is not None:
            cfg = cfg.model_copy(update={"steps": int(steps)})
        g = cfg.guidance if guidance is None else float(guidance)
        enc = self.text_encoder.encode(self.read_prompts(prompts))
        tokens = getattr(enc, "tokens", None)  # token states, for a cross-attention U-Net
        use_tokens = tokens is not None and (self.unet.cross_attention or self.unet.pool_queries)
        context = torch.from_numpy(tokens if use_tokens else enc.vectors).float()
        gens = [torch.Generator().manual_seed(prompt_seed(seed, i))
                for i in range(len(prompts))]
        sampler = make_sampler(cfg, self.schedule)
        df = self.vae.down_factor
        with cpu_autocast(cfg.bf16):
            z = sample(self.unet, self.schedule, sampler, context,
                       (self.latent_shape[0], h // df, w // df), g, gens,
                       self.glyph_maps(layouts, (w, h)))
        images = self.to_size(self.decode_latents(z), width, height, layouts)
        if typeset:
            if self.font_path is None:
                raise UserError("typeset: this model was trained without glyph maps (no "
                                "font.ttf in its U-Net folder); retrain it")
            images = [text_typeset(im, lines if self.reading(p).text else [], self.font_path)
                      for im, lines, p in zip(images, layouts, prompts, strict=True)]
        return images
