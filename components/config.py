"""params.yaml -> validated pydantic models: every knob's type and limits.

params.yaml holds every default; a default written here only repeats it (a model built in
code, e.g. in a test, means what the file means); tests/unit/test_config.py fails when the
two disagree or a knob is missing from the file. Every problem a user can cause here (a
typo in a key, a wrong type, a value out of range) becomes one line naming the dotted key
and what is allowed (ConfigError). Over 400 lines on purpose: one model per section of
params.yaml, in the file's order, so a knob's bounds sit beside its neighbours'.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.config_errors import format_errors
from components.contracts import UserError

PARAMS_FILE = Path("params.yaml")


class ConfigError(UserError):
    pass


def redact(text: str) -> str:
    """Every URL's user and password in `text` as ***: what may be logged or shown."""
    return re.sub(r"([a-zA-Z][\w+.-]*://)[^/@\s\"']+@", r"\1***@", text)


def format_fields(name: str, template: str) -> set[str]:
    """The {field} names a str.format template uses; a malformed one is a ValueError
    naming the setting."""
    import string

    try:
        return {f for _t, f, _s, _c in string.Formatter().parse(template) if f}
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- sources
class SyntheticSource(Section):
    kind: Literal["synthetic"]
    n: int = Field(1200, ge=1, le=1_000_000)
    seed: int = 0
    size: int = Field(256, ge=64, le=1024)


class FolderSource(Section):
    kind: Literal["folder"]
    path: str
    include: list[str] = ["*.png", "*.jpg", "*.jpeg", "*.webp", "*.gif", "*.bmp"]
    exclude: list[str] = []


class UrlsSource(Section):
    kind: Literal["urls"]
    path: str  # .txt: one URL a line; .csv: a `url` column, optional `caption`/`alt` columns


class SiteSource(Section):
    kind: Literal["site"]
    start_urls: list[str] = Field(min_length=1)
    allowed_domains: list[str] = []  # default: the hosts of start_urls (and subdomains)
    max_pages: int = Field(50, ge=1, le=100_000)
    max_depth: int = Field(2, ge=0, le=20)
    max_images_per_page: int = Field(200, ge=1)  # more on one page are dropped (counted)


Source = Annotated[SyntheticSource | FolderSource | UrlsSource | SiteSource,
                   Field(discriminator="kind")]


class Http(Section):
    user_agent: str = "tinyldm/0.1 (brand-image collector; +https://github.com/tinyldm)"
    timeout_s: float = Field(10.0, gt=0)
    per_host_delay_s: float = Field(0.5, ge=0)  # between request starts to one host
    per_host_concurrency: int = Field(2, ge=1)
    workers: int = Field(4, ge=1, le=64)
    retries: int = Field(3, ge=0, le=10)  # on connection errors, 429 and 5xx
    backoff_s: float = Field(0.5, ge=0)  # doubled after each retry
    max_retry_after_s: float = Field(30.0, ge=0)  # a longer Retry-After is cut to this
    max_redirects: int = Field(5, ge=0)
    obey_robots: bool = True
    max_download_s: float = Field(60.0, gt=0)  # one download's whole time, trickles included
    max_stage_s: float = Field(7200.0, gt=0)  # all downloads of one scrape; then stop, keep
    max_page_bytes: int = Field(5_000_000, ge=10_000)  # an HTML page's cap (decoded)
    allow_private: list[str] = []  # non-public hosts / networks (CIDR) it may fetch from


class Scrape(Section):
    sources: list[Source] = Field(min_length=1)
    max_image_bytes: int = Field(20_000_000, ge=1_000)
    http: Http = Http()


class Brand(Section):
    palette: dict[str, str] = Field(min_length=2)
    font: str
    # logo files (transparent PNG: the mark is the opaque part); the labeller looks for
    # each at any scale; the built-in generator draws the first
    logos: list[str]

    @model_validator(mode="after")
    def _hex(self) -> Brand:
        for name, value in self.palette.items():
            v = value.lstrip("#")
            if len(v) != 6 or any(c not in "0123456789abcdefABCDEF" for c in v):
                raise ValueError(f"palette.{name}: {value!r} is not a #rrggbb colour")
        return self

    def rgb(self) -> dict[str, tuple[int, int, int]]:
        return {k: tuple(int(v.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4))
                for k, v in self.palette.items()}


BUCKETS = {"poster": (1, 1), "portrait": (4, 5), "story": (9, 16), "landscape": (16, 9),
           "banner": (2, 1), "strip": (3, 1)}


class Formats(Section):
    """Aspect-ratio buckets (models/buckets.py): caption word -> (width, height) ratio."""
    buckets: dict[str, tuple[int, int]] = Field(default_factory=lambda: dict(BUCKETS),
                                                min_length=1)
    max_stretch: float = Field(1.25, ge=1, le=4)  # beyond every bucket: quarantined

    @model_validator(mode="after")
    def _names(self) -> Formats:
        for name, (w, h) in self.buckets.items():
            if not re.fullmatch(r"[a-z][a-z-]*", name) or w < 1 or h < 1 or max(w, h) > 64:
                raise ValueError(f"buckets.{name}: a lower-case word (the caption's format) "
                                 "and a ratio [width, height] of whole numbers 1..64")
        return self


class Synthetic(Section):
    vocabulary: list[str] = Field(min_length=3)
    formats: dict[str, float] = Field({"poster": 1.0}, min_length=1)  # bucket -> share
    gradient_share: float = Field(0.25, ge=0, le=1)
    logo_share: float = Field(0.4, ge=0, le=1)
    logo_size: float = Field(0.2, ge=0.08, le=0.3)  # the labeller looks for 8-30% of the side
    headline_share: float = Field(0.0, ge=0, le=1)  # images with one large headline line
    # corners the logo may take, in order of preference: the first one clear of the text
    # (a brand's rule); "random": any clear corner
    logo_corners: list[Literal["top-left", "top-right", "bottom-left", "bottom-right",
                               "random"]] = Field(["bottom-right", "top-left"], min_length=1)


class Ocr(Section):
    lang: str = "eng"
    psm: int = Field(6, ge=0, le=13)
    min_conf: float = Field(30, ge=0, le=100)
    upscale_below: int = Field(512, ge=0, le=4096)
    invert_dark: bool = True
    autocontrast: bool = False
    denoise: int = Field(7, ge=0, le=31)  # median filter (px, odd) on busy images; 0: off
    flatten: bool = False  # subtract the per-row background: dark text on white, any colours
    remove_shapes: float = Field(0.0, ge=0, le=0.5)  # paint over solids thicker than this
    # share of the short side (filled shapes read as letters); 0: off
    max_height_ratio: float = Field(1.4, ge=0)  # drop 1-letter words taller than this x the
    # median word height (shapes read as "A"/"O"); 0: off
    binarize: bool = False  # Otsu threshold before Tesseract (its own is usually as good)
    oem: int = Field(1, ge=0, le=3)  # 1: LSTM engine only (the packaged eng model)
    retry_below_conf: float = Field(80, ge=0, le=100)  # read again other ways below this
    large_type_side: int = Field(160, ge=0, le=4096)  # short side large type is shrunk to
    workers: int = Field(0, ge=0, le=256)
    timeout_s: float = Field(30, gt=0)


class Scale(Section):
    """How per-image work (OCR, auto-labels) fans out: the stage's own thread pool, or a
    Prefect task runner over chunks of images (processes, or Dask: local or a scheduler)."""
    task_runner: Literal["threads", "processes", "dask"] = "threads"
    workers: int = Field(0, ge=0, le=4096)  # processes / local Dask workers; 0: one per core
    dask_address: str = Field("", pattern=r"^$|^([a-z]+://)?[^\s:/]+:\d+$")  # "": local
    chunk_size: int = Field(16, ge=1, le=100_000)  # images per task (processes and dask)


class Validate(Section):
    min_side: int = Field(32, ge=1)
    max_side: int = Field(8192, ge=1)
    formats: list[str] = ["PNG", "JPEG", "WEBP", "GIF", "BMP"]
    max_pixels: int = Field(40_000_000, ge=1)  # larger declared sizes are never decoded
    modes: list[str] = ["RGB", "L"]  # other modes are converted to RGB and counted
    min_pixel_std: float = Field(1.0, ge=0)  # below: a blank image (0-255 grey levels)
    # dataset health (rows are kept): the suite fails above these shares
    max_ocr_error_share: float = Field(0.05, ge=0, le=1)
    max_text_chars: int = Field(400, ge=1)  # OCR text longer than this is suspicious...
    max_long_text_share: float = Field(0.05, ge=0, le=1)  # ...in more than this share


class Split(Section):
    train: float = Field(0.8, gt=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sum(self) -> Split:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("train + val + test must add up to 1")
        return self


class Labels(Section):
    split: Split = Split()
    caption_template: str
    caption_variants: int = Field(4, ge=1, le=16)  # captions per image (the template's first)
    gradient_threshold: float = Field(40, ge=0)
    texture_share: float = Field(0.03, gt=0, lt=1)
    texture_share_small: float = Field(0.7, gt=0, lt=1)
    logo_threshold: float = Field(0.7, gt=0, lt=1)
    logo_threshold_small: float = Field(0.5, gt=0, lt=1)
    saturation_levels: dict[str, float]

    @model_validator(mode="after")
    def _template(self) -> Labels:
        from components.contracts import CAPTION_FIELDS

        used = format_fields("caption_template", self.caption_template)
        unknown = used - set(CAPTION_FIELDS)
        if unknown:
            raise ValueError(f"caption_template: unknown field(s) {sorted(unknown)}; "
                             f"fields: {', '.join(CAPTION_FIELDS)}")
        return self


class TextEncoder(Section):
    name: str = "minilm"
    max_tokens: int = Field(256, ge=8)
    policy: Literal["truncate", "chunk", "error"] = "truncate"
    batch_size: int = Field(64, ge=1)
    dim: int = Field(128, ge=2, le=4096)  # tfidf only: SVD dimensions
    bf16: bool | Literal["auto"] = False  # transformer encoders only


class Vae(Section):
    image_size: int = Field(64, ge=16, le=1024)
    base_channels: int = Field(24, ge=8, le=512)
    channel_mult: list[int] = Field([1, 2, 2], min_length=1, max_length=6)
    latent_channels: int = Field(4, ge=1, le=64)
    norm: Literal["group", "channel"] = "group"  # channel: LayerNorm over each pixel's channels
    loss: Literal["mse", "bce", "l1"] = "mse"
    beta: float = Field(1e-5, ge=0)
    scale_reg: float = Field(0.0, ge=0)  # weight of the scale-equivariance term (0: off)
    crop: int = Field(32, ge=0)  # train on random square crops this side; 0: whole images
    text_weight: float = Field(0.0, ge=0)  # extra loss weight on ink (text, marks) pixels
    epochs: int = Field(44, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)
    ema: float = Field(0.0, ge=0, lt=1)  # EMA decay of the weights kept (0: off)
    early_stop_patience: int = Field(0, ge=0)  # epochs without a better val PSNR; 0: off
    early_stop_min_delta: float = Field(0.05, ge=0)  # dB that count as better
    val_per_epoch: int = Field(32, ge=0)  # val images of the per-epoch curve; 0: all
    bf16: bool | Literal["auto"] = "auto"  # auto: when the CPU has bf16 units
    device: Literal["auto", "cpu", "cuda"] = "auto"
    processes: int = Field(1, ge=1, le=64)  # data-parallel processes (torchrun) on this box
    checkpoint_every: int = Field(1, ge=0)  # epochs; 0: never
    seed: int = 0

    @model_validator(mode="after")
    def _crop_fits(self) -> Vae:
        down = 2 ** (len(self.channel_mult) - 1)
        if 0 < self.crop < self.image_size and self.crop % down:
            raise ValueError(f"crop: {self.crop} is not a multiple of the down factor {down} "
                             "(0 or image_size: train on whole images)")
        return self


class Latents(Section):
    batch_size: int = Field(64, ge=1)
    flip: bool = False


class Diffusion(Section):
    timesteps: int = Field(1000, ge=10, le=4000)
    schedule: Literal["linear", "cosine"] = "cosine"
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    prediction: Literal["eps", "v"] = "v"
    min_snr_gamma: float = Field(0.0, ge=0)  # 0: plain MSE; 5 is the paper's choice


class Sampler(Section):
    name: Literal["ddpm", "ddim", "dpmpp2m"] = "dpmpp2m"
    steps: int = Field(20, ge=1, le=4000)
    guidance: float = Field(2.0, ge=0, le=50)
    eta: float = Field(0.0, ge=0, le=1)
    normalise: bool = True  # prompts read into the captions' canonical words (models/prompts.py)
    bf16: bool | Literal["auto"] = "auto"  # the U-Net samples in bf16 (auto: native bf16 CPUs)


class Unet(Section):
    n_feat: int = Field(64, ge=8, le=1024)
    steps: int = Field(2100, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(100, ge=0)
    cond_drop: float = Field(0.1, ge=0, lt=1)
    ema: float = Field(0.999, ge=0, lt=1)
    cross_attention: bool = True  # attend to caption token states (False: pooled vector only)
    pool_queries: int = Field(4, ge=0, le=16)  # learned queries pooling the caption tokens
    full_res_context: bool = True  # the caption and time also at the latent's full size
    text_drop: float = Field(0.5, ge=0, le=1)  # share of captions trained without free text
    template_share: float = Field(0.5, ge=0, le=1)  # steps on the template's caption
    glyph_channels: int = Field(32, ge=0, le=256)  # glyph map features at the input (0: off)
    bf16: bool | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    processes: int = Field(1, ge=1, le=64)  # data-parallel processes (torchrun) on this box
    checkpoint_every: int = Field(250, ge=0)  # steps; 0: never
    log_every: int = Field(50, ge=1)  # steps per point of the loss curve (loss.csv, MLflow)
    sample_every: int = Field(700, ge=0)  # steps between sample grids in MLflow; 0: none
    seed: int = 0


TEXT_UNSEEN = ["pizza", "garden", "music", "travel", "books", "yoga", "city", "dream",
               "ocean", "forest", "happy", "party", "river", "gold", "kids", "art"]


class Serve(Section):
    """`tinyldm serve`: what one request may ask for and who may ask."""
    max_prompts: int = Field(8, ge=1, le=1024)
    max_steps: int = Field(100, ge=1, le=10_000)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_concurrent: int = Field(1, ge=1, le=256)  # requests sampling at once; more: 429
    retry_after_s: int = Field(5, ge=1)
    token_env: str = Field("TINYLDM_SERVE_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class Evaluate(Section):
    prompts: list[str] = Field(min_length=1)
    seed: int = 0
    adherence_seeds: int = Field(4, ge=1, le=64)
    prompt_seeds: int = Field(4, ge=2, le=16)
    fid_images: int = Field(128, ge=8, le=10_000)
    text_images: int = Field(32, ge=0, le=10_000)  # held-out text prompts (and real images)
    text_unseen: list[str] = Field(default_factory=lambda: list(TEXT_UNSEEN))
    free_prompts: list[dict[str, str]] = Field(default_factory=list)  # {prompt, fields}
    feature_extractor: str = "builtin"
    feature_image_size: int = Field(64, ge=16, le=1024)


class GateRule(Section):
    metric: str
    direction: Literal["max", "min"] = "max"
    # > 0: must be better by more than this; < 0: may be worse by up to |margin| (a guard
    # rail on a metric that is not meant to decide)
    min_margin: float = 0.0


class Register(Section):
    model_name: str = Field("tinyldm", pattern=r"^[\w.-]+$")
    experiment: str = "tinyldm"
    gate: list[GateRule] = Field(
        default=[GateRule(metric="fd", direction="min"),
                 GateRule(metric="prompt_adherence_background", min_margin=-0.05)],
        min_length=1)


class Retrain(Section):
    """Scheduled retraining (flows/retrain.py) and the workspace lock every run takes."""
    retries: int = Field(2, ge=0, le=20)  # per stage, after a failure
    retry_delay_s: float = Field(60, ge=0, le=86_400)  # before the first retry
    exponential: bool = True  # double the delay before each further retry
    notify: list[str] = []  # told when a run fails: env:VAR, block:NAME, credential-free URLs
    on_busy: Literal["wait", "skip"] = "wait"  # another run holds the workspace
    busy_timeout_s: float = Field(6 * 3600, ge=0)  # wait: give up (an error) after this
    git: Literal["none", "commit", "branch"] = "none"  # what happens to dvc.lock after a run
    branch: str = "retrain/{date}"  # git: branch; {date}: the run's UTC time

    @model_validator(mode="after")
    def _branch_and_urls(self) -> Retrain:
        fields = format_fields("branch", self.branch)
        if fields - {"date"}:
            raise ValueError(f"branch: unknown field(s) {sorted(fields - {'date'})}; "
                             "only {date} is filled in")
        if any(c in self.branch for c in " ~^:?*[\\") or ".." in self.branch:
            raise ValueError(f"branch: {self.branch!r} is not a valid git branch name")
        for i, ref in enumerate(self.notify):  # secrets stay out of params, logs and git
            if re.fullmatch(r"(env:[A-Za-z_]\w*|block:[\w-]+)", ref):
                continue
            if not re.fullmatch(r"[a-zA-Z][\w+.-]*://\S+", ref) or "@" in ref.split("/")[2]:
                raise ValueError(f"notify.{i}: {redact(ref)!r}: give env:VAR (an environment "
                                 "variable holding Apprise URLs) or block:NAME (a saved Prefect "
                                 "Apprise block); a URL here may not carry a user or password")
        return self


class Upscaler(Section):
    """The learned upscaler: native-size samples to `factor` x their size, trained on the
    collection's own images (VAE reconstructions in, the stored images out)."""
    factor: Literal[2, 4] = 4
    width: int = Field(48, ge=8, le=512)
    depth: int = Field(4, ge=1, le=16)  # 3x3 convolutions at the input size
    glyphs: bool = True  # also reads the glyph map at the output size (sharp letters)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(32, ge=1)
    crop: int = Field(16, ge=4)  # input crop side (native pixels)
    lr: float = Field(0.002, gt=0)
    bf16: bool | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0


class Params(Section):
    scrape: Scrape
    brand: Brand
    formats: Formats = Formats()
    synthetic: Synthetic
    ocr: Ocr = Ocr()
    scale: Scale = Scale()
    validate_: Validate = Field(Validate(), alias="validate")
    labels: Labels
    text_encoder: TextEncoder = TextEncoder()
    vae: Vae = Vae()
    upscaler: Upscaler = Upscaler()
    latents: Latents = Latents()
    diffusion: Diffusion = Diffusion()
    sampler: Sampler = Sampler()
    unet: Unet = Unet()
    evaluate: Evaluate
    register_: Register = Field(Register(), alias="register")
    serve: Serve = Serve()
    retrain: Retrain = Retrain()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _formats(self) -> Params:
        unknown = sorted(set(self.synthetic.formats) - set(self.formats.buckets))
        if unknown or sum(self.synthetic.formats.values()) <= 0 or \
                min(self.synthetic.formats.values()) < 0:
            raise ValueError(f"synthetic.formats: shares (>= 0, not all 0) of formats."
                             f"buckets ({', '.join(self.formats.buckets)}); unknown: {unknown}")
        return self


# ---------------------------------------------------------------- loading
SOURCE_KINDS: dict[str, type[BaseModel]] = {"synthetic": SyntheticSource, "folder": FolderSource}


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`a.b=VALUE` strings (VALUE is YAML) -> nested override dict."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set vae.epochs=2")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value is not valid YAML ({e.problem})") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: conflicts with another --set")
        node[parts[-1]] = value
    return out


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_params(path: Path | str = PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found; run from the tinyldm repository root "
                          "(where params.yaml lives)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") \
            from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    data = merge(raw, parse_set(overrides))
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        src = f"{path}" + (" (with --set)" if overrides else "")
        raise ConfigError(format_errors(e, src, Params, SOURCE_KINDS)) from None
