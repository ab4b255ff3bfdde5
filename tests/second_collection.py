"""A second, independent test collection: another brand's graphics, drawn by a renderer
that shares no drawing or layout code with components/ingest/synthetic.py, so that the
labellers and OCR are measured on material tinyldm did not make.

The brand "Northwind": eight colours of which two are black and white, three logo files
(a ring, a monogram square with a letter cut out, a triangle with a hole), four fonts.
Its pieces: posters, portraits, banners and strips; text bare or on a white or black card,
sometimes tilted, a small second line apart from the main block; solid, eased gradient,
halftone, paper-grain and photo-like backgrounds; flat figures; circles and round letters
that are not the logo; a share saved as JPEG.

Ground truth uses tinyldm's label system (components/labelling/labeller.py): background
(the palette colour at the top), background_kind (solid / gradient / texture: photos are
textures), gradient_to, layout (of the main text block), figure_size, saturation (black
and white are "vivid": drawn as they are), logo, and the text (lines top to bottom).

Seeds: the accuracy tests use seed 0 and the bench (bench/bench_second_collection.py)
seed 1. Keep both out of the tuning loop: tune on the built-in data, measure here."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from components.labelling.labeller import FIGURE_SHARES, scale_saturation

PALETTE = {"black": "#161616", "white": "#f6f3ec", "red": "#c8102e", "orange": "#ff7f11",
           "gold": "#e0a800", "green": "#2d6a4f", "blue": "#1d4e89", "violet": "#7f5af0"}
CHROMATIC = [k for k in PALETTE if k not in ("black", "white")]
LEVELS = {"muted": 0.45, "soft": 0.7, "vivid": 1.0}  # tinyldm's default saturation levels
FONTS = [f"/usr/share/fonts/truetype/dejavu/{f}.ttf" for f in
         ("DejaVuSerif-Bold", "DejaVuSansCondensed-Bold", "DejaVuSansMono-Bold",
          "DejaVuSans-Bold")]
WORDS = ["open", "house", "live", "jazz", "bakery", "bread", "autumn", "vinyl", "records",
         "craft", "beer", "book", "fair", "farm", "tour", "food", "truck", "film", "nights",
         "wine", "tasting", "pottery", "class", "local", "makers", "cycle", "repair", "cafe",
         "quiz", "tonight", "choir", "concert", "bike", "ride", "soup", "kitchen", "photo",
         "walk", "harbour", "lights", "comedy", "folk"]
FOOTERS = ["northwind.co", "since 1987", "all welcome", "free entry", "book online"]
FORMATS = {"poster": (384, 384), "portrait": (320, 400), "banner": (512, 256),
           "strip": (576, 192)}
LOGOS = ["ring", "monogram", "holed"]


def rgb(hex_colour: str) -> tuple[int, int, int]:
    v = hex_colour.lstrip("#")
    return int(v[0:2], 16), int(v[2:4], 16), int(v[4:6], 16)


def logo_shape(kind: str, side: int) -> Image.Image:
    """One of the brand's marks as an L mask (255: mark) of side x side."""
    m = Image.new("L", (side * 4, side * 4), 0)
    d = ImageDraw.Draw(m)
    s = side * 4
    if kind == "ring":
        d.ellipse((0, 0, s - 1, s - 1), fill=255)
        d.ellipse((s * 0.27, s * 0.27, s * 0.73, s * 0.73), fill=0)
    elif kind == "monogram":
        d.rounded_rectangle((0, 0, s - 1, s - 1), radius=s // 8, fill=255)
        f = ImageFont.truetype(FONTS[3], int(s * 0.8))
        d.text((s / 2, s / 2), "N", font=f, fill=0, anchor="mm")
    else:  # a triangle with a round hole
        d.polygon([(s / 2, 0), (s - 1, s - 1), (0, s - 1)], fill=255)
        d.ellipse((s * 0.38, s * 0.5, s * 0.62, s * 0.74), fill=0)
    return m.resize((side, side), Image.Resampling.LANCZOS)


def write_brand(folder: Path) -> dict:
    """The brand's logo files (transparent PNGs) under folder; -> the `brand` params."""
    folder.mkdir(parents=True, exist_ok=True)
    logos = []
    for kind in LOGOS:
        im = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
        im.putalpha(logo_shape(kind, 256))
        path = folder / f"{kind}.png"
        im.save(path)
        logos.append(str(path))
    return {"palette": dict(PALETTE), "font": FONTS[3], "logos": logos}


def _luminance(c: tuple) -> float:
    lin = [(v / 255) / 12.92 if v <= 10 else ((v / 255 + 0.055) / 1.055) ** 2.4 for v in c]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _dark_ink(bg: tuple) -> bool:
    """A designer's choice: dark ink where it contrasts more than white (WCAG ratio)."""
    lum = _luminance(bg)
    return (lum + 0.05) / 0.06 > 1.05 / (lum + 0.05)


def _eased(t: np.ndarray) -> np.ndarray:
    return t * t * (3 - 2 * t)


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Values in 0..1 varying smoothly over about `cells` blobs across the image."""
    small = rng.random((max(2, cells * h // max(w, h) + 1), max(2, cells * w // max(w, h) + 1)))
    im = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(im, np.float32) / 255


def _background(rng: np.random.Generator, w: int, h: int, theme: str) -> tuple[np.ndarray, dict]:
    if theme in ("black", "white"):
        kind = str(rng.choice(["solid", "texture"], p=[0.75, 0.25]))
        top, level, bottom = theme, "vivid", None
    else:
        kind = str(rng.choice(["solid", "gradient", "texture"], p=[0.45, 0.25, 0.3]))
        top, level = theme, str(rng.choice(list(LEVELS)))
        bottom = str(rng.choice([c for c in CHROMATIC if c != top])) if kind == "gradient" \
            else None
    c0 = np.array(scale_saturation(rgb(PALETTE[top]), LEVELS[level]), np.float32)
    a = np.broadcast_to(c0, (h, w, 3)).copy()
    if kind == "gradient":
        c1 = np.array(scale_saturation(rgb(PALETTE[bottom]), LEVELS[level]), np.float32)
        t = _eased(np.linspace(0, 1, h, dtype=np.float32))[:, None, None]
        a = np.broadcast_to(c0 * (1 - t) + c1 * t, (h, w, 3))
    elif kind == "texture":
        style = str(rng.choice(["halftone", "grain", "photo"]))
        if style == "halftone":  # dots of a darker shade on a grid
            step = int(rng.integers(7, 12))
            yy, xx = np.mgrid[0:h, 0:w]
            r = (np.hypot((xx % step) - step / 2, (yy % step) - step / 2) < step * 0.3)
            a = np.where(r[..., None], c0 * 0.55, c0)
        elif style == "grain":
            a = c0 + rng.normal(0, 38, (h, w, 1)).astype(np.float32)
        else:  # photo-like: smooth light and shade of the tint, a vignette, fine noise
            light = 0.5 * _smooth_noise(rng, w, h, 5) + 0.5 * _smooth_noise(rng, w, h, 14)
            yy, xx = np.mgrid[0:h, 0:w]
            vig = 1 - 0.35 * (((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) * 2)
            shade = (0.45 + 0.75 * light) * vig
            a = np.clip(c0 * shade[..., None], 0, 255) + rng.normal(0, 6, (h, w, 1))
    truth = {"background": top, "background_kind": kind,
             "gradient_to": bottom or "none", "saturation": level}
    return np.clip(a, 0, 255).astype(np.uint8), truth


def _fit_lines(lines: list[str], font_path: str, max_w: float, max_px: int
               ) -> tuple[ImageFont.FreeTypeFont, list[tuple[int, int]]]:
    px = max_px
    while True:
        f = ImageFont.truetype(font_path, px)
        sizes = [(int(f.getlength(t)), int(px * 1.15)) for t in lines]
        if max(s[0] for s in sizes) <= max_w or px <= 10:
            return f, sizes
        px -= 2


def _block_image(lines: list[str], font_path: str, max_w: float, max_px: int,
                 ink: tuple, card: tuple | None) -> Image.Image:
    """The text block as an RGBA layer: the lines centred, on a rounded card or bare."""
    f, sizes = _fit_lines(lines, font_path, max_w, max_px)
    bw, bh = max(s[0] for s in sizes), sum(s[1] for s in sizes)
    pad = int(0.35 * sizes[0][1]) if card else 2
    layer = Image.new("RGBA", (bw + 2 * pad, bh + 2 * pad), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    if card:
        d.rounded_rectangle((0, 0, layer.width - 1, layer.height - 1), radius=pad, fill=card)
    y = pad
    for t, (_lw, lh) in zip(lines, sizes, strict=True):
        d.text((layer.width / 2, y + lh / 2), t, font=f, fill=ink, anchor="mm")
        y += lh
    return layer


def _place(layout: str, bw: int, bh: int, w: int, h: int, rng: np.random.Generator
           ) -> tuple[int, int]:
    m = 0.07
    jx, jy = (rng.uniform(-0.02, 0.02) * w, rng.uniform(-0.02, 0.02) * h)
    x = {"left": m * w, "right": w - m * w - bw}.get(layout, (w - bw) / 2 + jx)
    y = {"top": m * h + 0.03 * h, "bottom": h - m * h - 0.03 * h - bh}.get(layout,
                                                                            (h - bh) / 2 + jy)
    return int(x), int(y)


def _free(box: tuple, taken: list[tuple], pad: int) -> bool:
    return all(box[2] + pad <= t[0] or t[2] + pad <= box[0] or box[3] + pad <= t[1]
               or t[3] + pad <= box[1] for t in taken)


def _spot(rng: np.random.Generator, side: int, w: int, h: int, taken: list[tuple],
          corners_only: bool) -> tuple | None:
    """A free square of `side`, clear of the edge bands, in a corner or anywhere."""
    m = int(0.06 * min(w, h))
    for _ in range(60):
        if corners_only:
            x = int(rng.choice([m, w - m - side]))
            y = int(rng.choice([m, h - m - side]))
        else:
            x, y = int(rng.integers(m, max(m + 1, w - m - side))), \
                int(rng.integers(m, max(m + 1, h - m - side)))
        box = (x, y, x + side, y + side)
        if _free(box, taken, int(0.03 * min(w, h))):
            return box
    return None


def _figure(d: ImageDraw.ImageDraw, shape: str, box: tuple, colour: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "disk":
        d.ellipse(box, fill=colour)
    elif shape == "diamond":
        d.polygon([((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1),
                   (x0, (y0 + y1) / 2)], fill=colour)
    elif shape == "half":
        d.pieslice(box, 180, 360, fill=colour)
    else:
        d.rounded_rectangle(box, radius=(x1 - x0) // 5, fill=colour)


def render(index: int, seed: int) -> tuple[Image.Image, dict, str]:
    """Image `index` of the collection with `seed`: (image, ground truth, "png" | "jpg")."""
    rng = np.random.default_rng([seed, index, 27])
    fmt = str(rng.choice(list(FORMATS), p=[0.45, 0.15, 0.25, 0.15]))
    w, h = FORMATS[fmt]
    side = min(w, h)
    theme = str(rng.choice(["black", "white", *CHROMATIC], p=[0.12, 0.12] + [0.76 / 6] * 6))
    bg, truth = _background(rng, w, h, theme)
    img = Image.fromarray(bg)
    light_bg = _dark_ink(tuple(int(v) for v in bg[h // 2, w // 2]))
    layout = str(rng.choice(["centre", "left", "right", "top", "bottom"]))
    headline = rng.random() < 0.3
    n_lines = 1 if headline else int(rng.integers(1, 4))
    lines = [" ".join(rng.choice(WORDS, 1 if headline else int(rng.integers(1, 3)))).upper()
             for _ in range(n_lines)]
    on_card = rng.random() < 0.4
    if on_card:
        card = (255, 255, 255) if theme != "white" and rng.random() < 0.7 else (20, 20, 20)
        ink = (20, 20, 20) if card[0] > 128 else (255, 255, 255)
    else:
        card, ink = None, ((25, 25, 25) if light_bg else (255, 255, 255))
    max_w = (0.42 if layout in ("left", "right") else 0.8) * w
    max_px = int(side * (rng.uniform(0.2, 0.32) if headline else rng.uniform(0.09, 0.14)))
    layer = _block_image(lines, str(rng.choice(FONTS)), max_w, max_px, ink, card)
    if rng.random() < 0.3:  # slightly tilted
        layer = layer.rotate(float(rng.uniform(-4, 4)), Image.Resampling.BICUBIC, expand=True)
    x, y = _place(layout, layer.width, layer.height, w, h, rng)
    img.paste(layer, (x, y), layer)
    taken = [(x, y, x + layer.width, y + layer.height)]
    text_lines = [(y, t) for t in lines]
    d = ImageDraw.Draw(img)
    if rng.random() < 0.35:  # a small second block apart from the main one
        f = ImageFont.truetype(FONTS[1], max(11, int(side * 0.05)))
        footer = str(rng.choice(FOOTERS)).upper()
        fw, fh = int(f.getlength(footer)), int(side * 0.05)
        spot = _spot(rng, 1, w - fw, h - fh, taken, corners_only=False)
        if spot is not None:
            box = (spot[0], spot[1], spot[0] + fw, spot[1] + fh)
            if _free(box, taken, int(0.04 * side)):
                d.text((box[0], box[1]), footer, font=f,
                       fill=(25, 25, 25) if light_bg else (255, 255, 255))
                taken.append(box)
                text_lines.append((box[1], footer))
    logo = rng.random() < 0.45
    if logo:
        lside = int(side * rng.uniform(0.13, 0.22))
        spot = _spot(rng, lside, w, h, taken, corners_only=True)
        if spot is None:
            logo = False
        else:
            mark = logo_shape(str(rng.choice(LOGOS)), lside)
            colour = (20, 20, 20) if light_bg else (255, 255, 255)
            img.paste(Image.new("RGB", mark.size, colour), spot[:2], mark)
            taken.append(spot)
    figure_size = "none"
    if truth["background_kind"] != "texture" and rng.random() < 0.55:
        figure_size = str(rng.choice(list(FIGURE_SHARES)))
        fside = int(side * FIGURE_SHARES[figure_size] * rng.uniform(0.9, 1.1))
        spot = _spot(rng, fside, w, h, taken, corners_only=False)
        if spot is None:
            figure_size = "none"
        else:
            colour = scale_saturation(rgb(PALETTE[str(rng.choice(
                [c for c in CHROMATIC if c not in (theme, truth["gradient_to"])]))]), 1.0)
            _figure(d, str(rng.choice(["disk", "diamond", "half", "tile"])), spot, colour)
            taken.append(spot)
    if not logo and rng.random() < 0.3:  # a thin circle that is not the logo
        cside = int(side * rng.uniform(0.1, 0.2))
        spot = _spot(rng, cside, w, h, taken, corners_only=False)
        if spot is not None:
            d.ellipse(spot, outline=(25, 25, 25) if light_bg else (255, 255, 255),
                      width=max(2, cside // 14))
    ext = "png"
    if rng.random() < 0.5:  # JPEG artefacts
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(55, 90)))
        img, ext = Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), "jpg"
    truth |= {"layout": layout, "figure_size": figure_size, "logo": "yes" if logo else "no",
              "format": fmt, "on_card": on_card, "headline": headline,
              "text": "\n".join(t for _, t in sorted(text_lines, key=lambda p: p[0]))}
    return img, truth, ext


def write_collection(folder: Path, n: int, seed: int) -> list[dict]:
    """n images under folder; -> one ground-truth row per image, with its `path`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img, truth, ext = render(i, seed)
        path = folder / f"nw_{seed}_{i:04d}.{ext}"
        img.save(path, quality=95) if ext == "jpg" else img.save(path)
        rows.append({"path": str(path), **truth})
    return rows
