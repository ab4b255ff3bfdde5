"""Collect images from the configured sources into content-addressed storage.

Every file is stored once under data/raw/images/<sha256[:2]>/<sha256>.<ext> and listed in
data/raw/manifest.parquet. Files that do not decode as images are still listed (format
"", size 0) so that validate quarantines them with a reason instead of losing them.
Synthetic sources also write their ground truth to data/raw/ground_truth.parquet.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import io
import os
import time
import warnings
from collections import Counter
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from components.config import FolderSource, Params, SiteSource, SyntheticSource, UrlsSource
from components.contracts import (
    GROUND_TRUTH,
    RAW,
    RAW_IMAGES,
    RAW_MANIFEST,
    SCHEMAS,
    SchemaError,
    UserError,
    atomic_path,
    content_path,
    open_rgb,
    progress,
    read_table,
    sha256_bytes,
    to_rgb,
    write_table,
)
from components.ingest.synthetic import render, truth_row

EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}


def inspect_image(data: bytes, max_pixels: int) -> dict:
    """Describe the image as the stages will see it (contracts.to_rgb: rotated, flattened,
    RGB); bytes that are no usable image get format "" and the reason in decode_error.
    The declared size is checked before decoding, so a decompression bomb is never
    expanded."""
    none = {"width": 0, "height": 0, "mode": "", "format": "", "phash": "", "frames": 0,
            "pixel_std": 0.0}
    if not data:
        return {**none, "decode_error": "empty file (0 bytes)"}
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            w, h = im.size
            if w * h > max_pixels:
                return {**none, "width": w, "height": h, "decode_error":
                        f"decompression bomb: declares {w}x{h} = {w * h / 1e6:.0f} MP > "
                        f"validate.max_pixels {max_pixels / 1e6:.0f} MP"}
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
            mode, fmt, frames = im.mode, im.format or "", getattr(im, "n_frames", 1)
            rgb = to_rgb(im)
    except UnidentifiedImageError:
        return {**none, "decode_error": "not an image"}
    except Image.DecompressionBombError as e:  # PIL's own limit, hit while opening
        return {**none, "decode_error": f"decompression bomb: {str(e)[:160]}"}
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, hostile: all unusable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return {**none, "decode_error": f"cannot decode: {first}"}
    grey = np.asarray(rgb.convert("L").resize((64, 64), Image.Resampling.BOX), np.float32)
    return {"width": rgb.width, "height": rgb.height, "mode": mode, "format": fmt,
            "phash": str(imagehash.phash(rgb)), "frames": int(frames),
            "pixel_std": round(float(grey.std()), 3), "decode_error": ""}


def _row(data: bytes, source: str, source_url: str, fetched_at: str, page_url: str = "",
         alt: str = "", max_pixels: int = 40_000_000) -> dict:
    digest = sha256_bytes(data)
    info = inspect_image(data, max_pixels)
    ext = EXT.get(info["format"], "bin")
    return {"id": digest, "path": str(content_path(RAW_IMAGES, digest, ext)),
            "source": source, "source_url": source_url, "page_url": page_url,
            "alt_text": alt, "fetched_at": fetched_at, "bytes": len(data), **info,
            "near_duplicate_of": ""}


def _item(data: bytes, source: str, url: str, fetched_at: str = "", truth=None,
          page_url: str = "", alt: str = "") -> dict:
    return {"data": data, "source": source, "url": url, "fetched_at": fetched_at,
            "truth": truth, "page_url": page_url, "alt": alt}


def _synthetic(i: int, src: SyntheticSource, params: Params):
    for k in progress(range(src.n), desc=f"synthetic[{i}]", unit="img"):
        data, truth = render(k, src.seed, src.size, params.brand, params.synthetic,
                             params.labels, params.formats.buckets)
        yield _item(data, f"synthetic:{src.seed}", f"synthetic://{src.seed}/{k}", truth=truth)


def _folder(i: int, src: FolderSource, max_bytes: int, skipped: Counter,
            last: dict[str, dict]):
    """Files under the folder; one that has the size and modification time it had in the
    last run (and whose stored copy is there) is not read again: its row is reused."""
    root = Path(src.path).expanduser()
    if not root.is_dir():
        raise UserError(f"scrape.sources[{i}]: folder {root} does not exist; fix its path "
                        "in params.yaml")
    real_root = root.resolve()
    files = []
    for dirpath, _dirs, names in os.walk(root):  # os.walk does not follow symlinked dirs
        for name in sorted(names):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if not any(fnmatch.fnmatch(name.lower(), g.lower()) for g in src.include):
                continue
            if any(fnmatch.fnmatch(rel, g) for g in src.exclude):
                continue
            if not p.resolve().is_relative_to(real_root):
                skipped["symlink_outside"] += 1
                continue
            files.append(p)
    if not files:
        raise UserError(f"scrape.sources[{i}]: folder {root} has no files matching "
                        f"{src.include}; add images or change include")
    for p in progress(sorted(files), desc=f"folder[{i}]", unit="img"):
        if p.stat().st_size > max_bytes:
            skipped["too_large"] += 1
            continue
        mtime = dt.datetime.fromtimestamp(p.stat().st_mtime, dt.UTC).isoformat()
        url = p.resolve().as_uri()
        prev = last.get(url)
        if (prev is not None and prev["fetched_at"] == mtime
                and prev["bytes"] == p.stat().st_size and Path(prev["path"]).is_file()):
            yield {**_item(b"", f"folder:{root}", url, mtime), "row": prev}
            continue
        yield _item(p.read_bytes(), f"folder:{root}", url, mtime)


HTTP_CACHE = Path(".cache") / "http" / "conditional.json"  # ETag / Last-Modified per URL


def _url_list(i: int, src: UrlsSource) -> list[dict]:
    """[{url, alt}] from a .txt (one URL a line, # comments) or a .csv (`url` column,
    optional `caption` / `alt` kept as metadata)."""
    path = Path(src.path).expanduser()
    if not path.is_file():
        raise UserError(f"scrape.sources[{i}]: URL list {path} does not exist; fix its path")
    if path.suffix.lower() == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "url" not in df.columns:
            raise UserError(f"scrape.sources[{i}]: {path} has no 'url' column (columns: "
                            f"{', '.join(df.columns)})")
        meta = [c for c in ("alt", "caption") if c in df.columns]
        return [{"url": r["url"].strip(), "alt": " | ".join(r[c] for c in meta if r[c])}
                for r in df.to_dict("records") if r["url"].strip()]
    return [{"url": line.strip(), "alt": ""} for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _web(i: int, src: UrlsSource | SiteSource, params: Params, counts: Counter,
         stop_at: float):
    """Download a URL list or a crawled site's images, politely (components/ingest/fetch.py);
    every URL ends fetched, unchanged (conditional GET: the stored copy is reused) or
    counted under its failure reason. Nothing starts after `stop_at` (monotonic time:
    the stage's scrape.http.max_stage_s); what came before it is kept."""
    from components.ingest.crawl import crawl
    from components.ingest.fetch import Fetcher

    cfg = params.scrape.http
    tag = f"{src.kind}{i}"
    with Fetcher(user_agent=cfg.user_agent, timeout_s=cfg.timeout_s,
                 max_bytes=params.scrape.max_image_bytes,
                 per_host_delay_s=cfg.per_host_delay_s,
                 per_host_concurrency=cfg.per_host_concurrency, retries=cfg.retries,
                 backoff_s=cfg.backoff_s, max_retry_after_s=cfg.max_retry_after_s,
                 max_redirects=cfg.max_redirects, cache_file=HTTP_CACHE,
                 obey_robots=cfg.obey_robots, max_download_s=cfg.max_download_s,
                 max_pixels=params.validate_.max_pixels, allow_private=cfg.allow_private,
                 max_page_bytes=cfg.max_page_bytes, stop_at=stop_at) as fetcher:
        if isinstance(src, UrlsSource):
            refs = [{**r, "page_url": ""} for r in _url_list(i, src)]
            source = f"urls:{src.path}"
        else:
            domains = src.allowed_domains  # [] -> the start URLs' hosts
            found = crawl(fetcher, src.start_urls, domains, src.max_pages, src.max_depth,
                          workers=cfg.workers, max_images_per_page=src.max_images_per_page)
            for reason, n in found.reasons.items():
                counts[f"{tag}.pages.{reason}"] += n
            if found.images_over_cap:
                counts[f"{tag}.images_over_page_cap"] += found.images_over_cap
            refs = [{"url": r.url, "page_url": r.page_url,
                     "alt": " | ".join(x for x in (r.alt, r.title, r.caption) if x)}
                    for r in found.images]
            source = f"site:{src.start_urls[0]}"
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        stream = fetcher.iter_fetch([r["url"] for r in refs], kind="image",
                                    workers=cfg.workers)
        for ref, res in zip(refs, stream, strict=True):  # each image stored as it arrives
            data = res.data
            if res.status == "unchanged":  # 304: the copy stored last time is still current
                stored = next(RAW_IMAGES.glob(f"{res.sha256[:2]}/{res.sha256}.*"), None)
                if stored is not None:
                    data = stored.read_bytes()
                else:  # validators saved, copy not (a killed run): download it again
                    res = fetcher.fetch(ref["url"], conditional=False)
                    data = res.data
            if data is None:
                counts[f"{tag}.{res.status}"] += 1
                if res.status != "stage_deadline":  # those are summed up once, at the end
                    print(f"scrape: {ref['url']}: {res.status} {res.detail}".rstrip())
                continue
            counts[f"{tag}.{res.status}"] += 1
            yield _item(data, source, res.final_url or ref["url"], now,
                        page_url=ref["page_url"], alt=ref["alt"])


def _thumb(path: str) -> np.ndarray:
    return np.asarray(open_rgb(path).resize((32, 32), Image.Resampling.BOX),
                      dtype=np.float32) / 255


def near_duplicates(rows: list[dict], root: Path, max_bits: int = 6,
                    max_rms: float = 0.025) -> dict[str, str]:
    """id -> the id of the copy it duplicates (a resized or re-encoded version). Candidates
    share a perceptual hash within `max_bits`; as flat brand graphics often share a hash
    without being alike, a candidate pair is confirmed by the colour thumbnails (RMS
    difference). In each group the largest image is kept."""
    idx = [i for i, r in enumerate(rows) if r["phash"]]
    if len(idx) < 2:
        return {}
    hashes = np.array([int(rows[i]["phash"], 16) for i in idx], dtype=np.uint64)
    as_bytes = hashes.view(np.uint8).reshape(-1, 8)
    parent = list(range(len(idx)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    thumbs: dict[int, np.ndarray] = {}
    for start in range(0, len(idx), 256):  # a block of rows against all later rows
        block = as_bytes[start : start + 256]
        dist = np.unpackbits(block[:, None, :] ^ as_bytes[None, :, :], axis=-1).sum(-1)
        for a, b in zip(*np.nonzero(dist <= max_bits), strict=True):
            a += start
            if b <= a or find(a) == find(b):
                continue
            for k in (a, b):
                if k not in thumbs:
                    thumbs[k] = _thumb(str(root / Path(rows[idx[k]]["path"]).relative_to(RAW)))
            if np.sqrt(((thumbs[a] - thumbs[b]) ** 2).mean()) <= max_rms:
                parent[find(b)] = find(a)
    groups: dict[int, list[int]] = {}
    for k in range(len(idx)):
        groups.setdefault(find(k), []).append(idx[k])
    out = {}
    for members in groups.values():
        keep = max(members, key=lambda i: (rows[i]["width"] * rows[i]["height"], -i))
        out |= {rows[i]["id"]: rows[keep]["id"] for i in members if i != keep}
    return out


def changes(old: dict[str, str], new: dict[str, str]) -> Counter:
    """source URL -> image id, last run vs this one: new, changed (same place, other bytes),
    unchanged and vanished locations."""
    return Counter({
        "since_last.new": sum(u not in old for u in new),
        "since_last.changed": sum(u in old and old[u] != i for u, i in new.items()),
        "since_last.unchanged": sum(old.get(u) == i for u, i in new.items()),
        "since_last.vanished": sum(u not in new for u in old)})


def _store(row: dict, data: bytes) -> None:
    """Write an image into the content-addressed store once (atomically: never half a file)."""
    path = Path(row["path"])
    if not path.is_file():
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)


def _prune(keep: set[str]) -> int:
    """Drop stored files no manifest row names (vanished images, a killed run's temps)."""
    gone = 0
    for f in RAW_IMAGES.rglob("*"):
        if f.is_file() and str(f) not in keep:
            f.unlink()
            gone += 1
    return gone


def _last_manifest() -> pd.DataFrame | None:
    """The last run's manifest, if there is one this version can read (reusing it only
    saves work: an older layout means every file is read again)."""
    if not RAW_MANIFEST.exists():
        return None
    try:
        return read_table(RAW_MANIFEST, "raw_manifest")
    except SchemaError:
        print(f"scrape: {RAW_MANIFEST} is from an older tinyldm; reading every file again")
        return None


def scrape(params: Params) -> dict:
    """Collect every source into the content-addressed store data/raw/images (it persists
    between runs: only new images are written, folder files unchanged since the last run
    are not even read), then write the manifest atomically and drop what vanished."""
    cfg = params.scrape
    rows: list[dict] = []
    truths: list[dict] = []
    seen: set[str] = set()
    counts: Counter = Counter()
    before = _last_manifest()
    stop_at = time.monotonic() + cfg.http.max_stage_s
    last = {} if before is None else {r["source_url"]: r for r in before.to_dict("records")}
    for i, src in enumerate(cfg.sources):
        skipped: Counter = Counter()
        if isinstance(src, SyntheticSource):
            items = _synthetic(i, src, params)
        elif isinstance(src, FolderSource):
            items = _folder(i, src, cfg.max_image_bytes, skipped, last)
        else:
            items = _web(i, src, params, counts, stop_at)
        for item in items:
            if "row" in item:
                row = {**item["row"], "near_duplicate_of": ""}
                counts["reused"] += 1
            else:
                row = _row(item["data"], item["source"], item["url"], item["fetched_at"],
                           item["page_url"], item["alt"], params.validate_.max_pixels)
            if row["id"] in seen:
                counts["duplicate"] += 1
                continue
            seen.add(row["id"])
            if "row" not in item:
                _store(row, item["data"])
            rows.append(row)
            if item["truth"] is not None:
                truths.append({"id": row["id"], **truth_row(item["truth"])})
            counts[f"fetched.{item['source'].split(':')[0]}"] += 1
        for reason, n in skipped.items():
            counts[f"skipped.{reason}"] += n
    late = sum(n for k, n in counts.items() if k.endswith(".stage_deadline"))
    if late:
        print(f"scrape: scrape.http.max_stage_s ({cfg.http.max_stage_s:g} s) ran out: {late} "
              "URLs not downloaded (stage_deadline); what came is kept. Run scrape again "
              "(unchanged images cost a 304) or raise max_stage_s")
    if before is not None:  # what a re-run found against the last one, per location
        counts.update(changes(dict(zip(before["source_url"], before["id"], strict=True)),
                              {r["source_url"]: r["id"] for r in rows}))
    dups = near_duplicates(rows, RAW)
    for row in rows:
        row["near_duplicate_of"] = dups.get(row["id"], "")
    counts["near_duplicate"] = len(dups)
    manifest = pd.DataFrame(rows, columns=SCHEMAS["raw_manifest"].names)
    write_table(manifest, RAW_MANIFEST, "raw_manifest")
    write_table(pd.DataFrame(truths, columns=SCHEMAS["ground_truth"].names), GROUND_TRUTH,
                "ground_truth")
    counts["pruned"] = _prune(set(manifest["path"]))
    return {"images": len(rows), "undecodable": int((manifest["format"] == "").sum()),
            "with_ground_truth": len(truths), **dict(counts)}
