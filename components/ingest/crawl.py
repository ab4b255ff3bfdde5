"""A small breadth-first site crawler that collects image references, not images.

Pages are fetched through a `Fetcher`, so robots.txt, rate limits and byte caps apply to
the crawl exactly as to the image downloads; the caller downloads the returned refs'
URLs with `Fetcher.fetch_many`. Each BFS level is fetched in parallel, which keeps the
order breadth-first while the per-host caps keep it polite.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import httpx
from bs4 import BeautifulSoup, Tag

from components.contracts import UserError
from components.ingest.fetch import Fetcher
from components.ingest.web import check_url, drop_fragment, url_problem

# links whose path says "not a page": following them would download a file only to
# reject it as not_html
ASSET_SUFFIXES = frozenset(
    ".png .jpg .jpeg .gif .webp .avif .svg .bmp .ico .tif .tiff .pdf .zip .gz .tgz .rar .7z "
    ".mp3 .mp4 .m4v .mov .avi .webm .ogg .wav .css .js .json .xml .woff .woff2 .ttf .eot "
    ".exe .dmg .iso .doc .docx .xls .xlsx .ppt .pptx".split())
OG_IMAGE = ("og:image", "og:image:url", "og:image:secure_url")
_DESCRIPTOR = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)([wxh])$", re.IGNORECASE)


@dataclass(frozen=True)
class ImageRef:
    url: str
    page_url: str
    alt: str = ""
    title: str = ""
    caption: str = ""  # the enclosing <figure>'s <figcaption> text


@dataclass
class CrawlResult:
    images: list[ImageRef] = field(default_factory=list)  # deduped by URL, first page wins
    pages: dict[str, str] = field(default_factory=dict)  # page URL -> fetch status
    reasons: Counter[str] = field(default_factory=Counter)  # status -> pages
    images_over_cap: int = 0  # references past max_images_per_page, dropped

    @property
    def pages_fetched(self) -> int:
        return self.reasons.get("fetched", 0)


# ------------------------------------------------------------------ srcset
def parse_srcset(value: str) -> list[tuple[str, str, float]]:
    """(url, unit, size) per candidate, unit "w" or "x" (a bare URL means 1x).

    Follows the WHATWG splitting rules: a URL is a run of non-space characters, so
    commas inside URLs survive; descriptors run to the next comma outside parentheses.
    """
    out: list[tuple[str, str, float]] = []
    pos, n = 0, len(value)
    while pos < n:
        while pos < n and (value[pos].isspace() or value[pos] == ","):
            pos += 1
        start = pos
        while pos < n and not value[pos].isspace():
            pos += 1
        url = value[start:pos]
        descriptors = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            depth, start = 0, pos
            while pos < n and (value[pos] != "," or depth):
                depth += {"(": 1, ")": -1}.get(value[pos], 0)
                pos += 1
            descriptors = value[start:pos]
        if url:
            out.append((url, *_descriptor(descriptors)))
    return out


def _descriptor(text: str) -> tuple[str, float]:
    unit, size = "x", 1.0
    for token in text.split():
        m = _DESCRIPTOR.match(token)
        if m and m.group(2).lower() in "wx":
            unit, size = m.group(2).lower(), float(m.group(1))
    return unit, size


def largest_candidate(candidates: list[tuple[str, str, float]]) -> str | None:
    """Widest by `w`; only when no candidate has a width, highest density by `x`."""
    widths = [c for c in candidates if c[1] == "w"]
    pool = widths or candidates
    return max(pool, key=lambda c: c[2])[0] if pool else None


# ------------------------------------------------------------------ URLs
def resolve(base: str, ref: str | None) -> str | None:
    """An absolute http(s) URL without fragment, or None for data:, javascript: etc."""
    ref = (ref or "").strip()
    if not ref or ref.startswith("#") or ref.lower().startswith("data:"):
        return None
    try:
        url = drop_fragment(str(httpx.URL(base).join(ref)))
    except (httpx.InvalidURL, ValueError, TypeError):
        return None
    return None if url_problem(url) else url


def host_allowed(url: str, domains: list[str]) -> bool:
    host = httpx.URL(url).host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in domains)


def is_asset(url: str) -> bool:
    return PurePosixPath(httpx.URL(url).path).suffix.lower() in ASSET_SUFFIXES


def _dedupe(items: list) -> list:
    seen: set = set()
    out = []
    for item in items:
        key = getattr(item, "url", item)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


# ------------------------------------------------------------------ HTML
def _text(tag: Tag | None) -> str:
    return " ".join(tag.get_text(" ", strip=True).split()) if tag else ""


def _attr(tag: Tag, name: str) -> str:
    value = tag.get(name)
    if isinstance(value, list):
        value = " ".join(value)
    return (value or "").strip()


def _caption(img: Tag) -> str:
    figure = img.find_parent("figure")
    if figure is None:
        return ""
    return _text(figure.find("figcaption", recursive=False) or figure.find("figcaption"))


def _img_url(img: Tag, base: str) -> str | None:
    """The best source for one <img>: the largest candidate of its srcset and of its
    <picture>'s <source>s, else src (lazy-loading data-* attributes count too)."""
    candidates: list[tuple[str, str, float]] = []
    picture = img.find_parent("picture")
    if picture is not None:
        for source in picture.find_all("source"):
            candidates += parse_srcset(_attr(source, "srcset") or _attr(source, "data-srcset"))
    candidates += parse_srcset(_attr(img, "srcset") or _attr(img, "data-srcset"))
    resolved = [(u, unit, size) for c_url, unit, size in candidates
                if (u := resolve(base, c_url))]
    best = largest_candidate(resolved)
    if best:
        return best
    for name in ("src", "data-src"):
        url = resolve(base, _attr(img, name))
        if url:
            return url
    return None


def parse_page(html: bytes | str, page_url: str) -> tuple[list[ImageRef], list[str]]:
    """Image references and outgoing links of one page, absolute and deduped."""
    soup = BeautifulSoup(html, "html.parser")
    base_tag = soup.find("base", href=True)
    base = (resolve(page_url, _attr(base_tag, "href")) if base_tag else None) or page_url
    images: list[ImageRef] = []
    for img in soup.find_all("img"):
        url = _img_url(img, base)
        if url:
            images.append(ImageRef(url, page_url, _attr(img, "alt"), _attr(img, "title"),
                                   _caption(img)))
    og_alt = next((_attr(m, "content") for m in soup.find_all("meta")
                   if _attr(m, "property").lower() == "og:image:alt"), "")
    for meta in soup.find_all("meta"):
        if _attr(meta, "property").lower() in OG_IMAGE:
            url = resolve(base, _attr(meta, "content"))
            if url:
                images.append(ImageRef(url, page_url, alt=og_alt))
    links = [u for a in soup.find_all(["a", "area"], href=True)
             if (u := resolve(base, _attr(a, "href")))]
    return _dedupe(images), _dedupe(links)


# ------------------------------------------------------------------ crawl
def _domains(start_urls: list[str], allowed_domains: list[str]) -> list[str]:
    """Config values: a wrong one is the user's to fix, so these raise UserError."""
    for i, url in enumerate(start_urls):
        check_url(url, f"site start_urls[{i}]")
    out = []
    for d in allowed_domains or [httpx.URL(u).host for u in start_urls]:
        d = d.strip().lower().strip(".")
        if not d or "/" in d or ":" in d:
            raise UserError(f"site allowed_domains: {d!r} is not a host name; write it like "
                            "'example.com' (subdomains are included)")
        out.append(d)
    outside = [u for u in start_urls if not host_allowed(u, out)]
    if outside:
        raise UserError(f"site start_urls {outside} lie outside allowed_domains {out}; add "
                        "their hosts to allowed_domains")
    return out


def crawl(fetcher: Fetcher, start_urls: list[str], allowed_domains: list[str],
          max_pages: int, max_depth: int, workers: int = 4,
          max_images_per_page: int = 200) -> CrawlResult:
    """Breadth-first over in-domain HTML links. `max_pages` caps page fetch attempts
    (robots refusals included, so a crawl's size is known up front) and
    `max_images_per_page` the references taken from one page (the first ones, in page
    order); `max_depth` 0 means the start pages only. No page URL is fetched twice; a
    redirect target counts as seen from the next level on."""
    domains = _domains(start_urls, allowed_domains)
    result = CrawlResult()
    seen_pages: set[str] = set()
    seen_images: set[str] = set()
    level = _dedupe([drop_fragment(u) for u in start_urls])
    seen_pages.update(level)
    for depth in range(max_depth + 1):
        level = level[: max(0, max_pages - len(result.pages))]
        if not level:
            break
        next_level: list[str] = []
        for res in fetcher.fetch_many(level, kind="page", workers=workers):
            result.pages[res.url] = res.status
            result.reasons[res.status] += 1
            seen_pages.add(res.final_url)
            if res.status != "fetched" or res.data is None:
                continue
            images, links = parse_page(res.data, res.final_url)
            result.images_over_cap += max(0, len(images) - max_images_per_page)
            for ref in images[:max_images_per_page]:
                if ref.url not in seen_images:
                    seen_images.add(ref.url)
                    result.images.append(ref)
            if depth == max_depth:
                continue
            for link in links:
                if link not in seen_pages and host_allowed(link, domains) \
                        and not is_asset(link):
                    seen_pages.add(link)
                    next_level.append(link)
        level = next_level
    return result
