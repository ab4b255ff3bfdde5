"""The fetcher and crawler against a real local HTTP server that misbehaves on purpose.

Every request the server sees is logged, so tests can assert what was never requested
(robots-disallowed paths) and what a response cost (304 without body, early stop of an
oversized stream).
"""

from __future__ import annotations

import gzip
import io
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from components.contracts import UserError
from components.ingest.crawl import crawl, parse_page, parse_srcset
from components.ingest.fetch import Fetcher, count_statuses
from components.ingest.web import retry_after_s

BIG_TOTAL = 32 * 1024 * 1024  # what /big.png would send if nobody stopped reading
CAP = 200_000  # the fetcher's byte cap in these tests
ETAG = '"v1"'
LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"


def _image(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    """Noise, so JPEGs are big enough that cutting one in half really truncates it."""
    rnd = random.Random(seed)
    im = Image.frombytes("RGB", size, rnd.randbytes(size[0] * size[1] * 3))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


IMAGES = {
    "/img/logo.png": _image("PNG", (32, 32), 1), "/img/og.png": _image("PNG", (40, 20), 2),
    "/img/hero.jpg": _image("JPEG", (64, 48), 3), "/img/s.png": _image("PNG", (10, 10), 4),
    "/img/m.png": _image("PNG", (40, 40), 5), "/img/l.png": _image("PNG", (80, 80), 6),
    "/img/p1.jpg": _image("JPEG", (30, 30), 7), "/img/p2.jpg": _image("JPEG", (60, 60), 8),
    "/img/deep.png": _image("PNG", (12, 12), 9), "/private/x.png": _image("PNG", (8, 8), 10),
    "/private/hidden.png": _image("PNG", (8, 8), 11), "/etag.png": _image("PNG", (16, 16), 12),
    "/sleepy.png": _image("PNG", (8, 8), 13),
}
TRUNCATED_JPEG = _image("JPEG", (128, 128), 14)
TRUNCATED_JPEG = TRUNCATED_JPEG[: len(TRUNCATED_JPEG) // 2]

PAGES = {
    "/index.html": """<!doctype html><html><head><title>Home</title>
<meta property="og:image" content="/img/og.png"><meta property="og:image:alt" content="Share card">
</head><body>
<a href="/about.html">About</a> <a href="gallery.html#top">Gallery</a>
<a href="/private/secret.html">secret</a> <a href="http://elsewhere.invalid/x.html">off</a>
<a href="mailto:hi@example.com">mail</a> <a href="/img/logo.png">the logo file</a>
<img src="/img/logo.png" alt="Brand logo" title="Our logo">
<figure><img src="img/hero.jpg" alt="Hero"><figcaption>Summer   launch
 poster</figcaption></figure>
<img src="data:image/png;base64,iVBORw0KGgo=" alt="inline">
</body></html>""",
    "/gallery.html": """<html><body>
<img src="/img/s.png" srcset="/img/s.png 100w, /img/l.png 800w, /img/m.png 400w" alt="Banner">
<picture><source srcset="/img/p1.jpg 1x, /img/p2.jpg 2x" type="image/jpeg">
<img src="/img/p1.jpg" alt="Pic"></picture>
<img src="/img/logo.png" alt="same logo again">
<a href="/index.html">home</a> <a href="/deep.html">deep</a> <a href="/about.html#x">about</a>
</body></html>""",
    "/about.html": """<html><body><a href="/index.html">home</a> <a href="/gallery.html">g</a>
<a href="/missing.html">broken</a> <img src="/private/hidden.png" alt="hidden">
</body></html>""",
    "/deep.html": """<html><body><img src="/img/deep.png" alt="deep"></body></html>""",
    "/private/secret.html": "<html><body>never to be seen</body></html>",
    "/many.html": "<html><body>" + "".join(f'<img src="/img/n{i}.png">' for i in range(9))
                  + "</body></html>",
    "/huge.html": "<html><body>" + "<p>filler</p>" * 4000 + "</body></html>",  # 52 kB
}


class Site:
    """Server-side state: the request log and the counters the flaky endpoints need."""

    def __init__(self, robots: str) -> None:
        self.robots = robots  # "ok", "404" or "503"
        self.lock = threading.Lock()
        self.log: list[tuple[str, float, dict[str, str]]] = []
        self.hits: Counter[str] = Counter()
        self.inflight = 0
        self.max_inflight = 0
        self.big_sent = 0
        self.big_done = threading.Event()
        self.bodies: Counter[str] = Counter()  # 200 bodies sent, per path
        self.base = ""

    def paths(self) -> list[str]:
        return [p for p, _t, _h in self.log]

    def times(self, path: str) -> list[float]:
        return [t for p, t, _h in self.log if p == path]


class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes = b"", ctype: str = "text/html",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        site: Site = self.server.site  # type: ignore[attr-defined]
        path = self.path.split("?")[0]
        with site.lock:
            site.log.append((path, time.monotonic(), dict(self.headers)))
            site.hits[path] += 1
            hit = site.hits[path]
            site.inflight += 1
            site.max_inflight = max(site.max_inflight, site.inflight)
        try:
            self._route(site, path, hit)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with site.lock:
                site.inflight -= 1

    def _route(self, site: Site, path: str, hit: int) -> None:
        if path == "/robots.txt":
            if site.robots == "ok":
                return self._send(200, b"User-agent: *\nDisallow: /private/\n", "text/plain")
            return self._send(int(site.robots), b"", "text/plain")
        if path in PAGES:
            return self._send(200, PAGES[path].encode())
        if path == "/etag.png":
            if self.headers.get("If-None-Match") == ETAG:
                return self._send(304, headers={"ETag": ETAG})
            with site.lock:
                site.bodies[path] += 1
            return self._send(200, IMAGES[path], "image/png",
                              {"ETag": ETAG, "Last-Modified": LAST_MODIFIED})
        if path == "/sleepy.png":
            time.sleep(0.3)
        if path in IMAGES:
            ctype = "image/jpeg" if path.endswith(".jpg") else "image/png"
            return self._send(200, IMAGES[path], ctype)
        if path == "/flaky.png":
            if hit == 1:
                return self._send(500, b"oops")
            return self._send(200, IMAGES["/img/logo.png"], "image/png")
        if path == "/busy.png":
            if hit == 1:
                return self._send(429, b"slow down", headers={"Retry-After": "1"})
            return self._send(200, IMAGES["/img/logo.png"], "image/png")
        if path == "/slow.png":
            time.sleep(1.0)
            return self._send(200, IMAGES["/img/logo.png"], "image/png")
        if path in ("/loop/a", "/loop/b"):
            other = "/loop/b" if path == "/loop/a" else "/loop/a"
            return self._send(302, headers={"Location": other})
        if path.startswith("/chain/"):
            return self._send(302, headers={"Location": f"/chain/{int(path[7:]) + 1}"})
        if path == "/to-private":
            return self._send(302, headers={"Location": "/private/x.png"})
        if path == "/to-127":  # a hop from the name to the loopback address itself
            port = self.server.server_address[1]
            return self._send(302, headers={"Location": f"http://127.0.0.1:{port}/img/l.png"})
        if path == "/to-ftp":
            return self._send(302, headers={"Location": "ftp://127.0.0.1/x.png"})
        if path == "/big.png":
            return self._big(site)
        if path == "/big-declared.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "50000000")
            self.end_headers()
            self.wfile.write(b"\x89PNG" + b"\0" * 1000)
            return None
        if path in ("/bomb.png", "/zipped.png"):  # gzip of gzip: 64 MB of zeros / an image
            inner = IMAGES["/img/logo.png"] if path == "/zipped.png" else b"\0" * (64 << 20)
            body = gzip.compress(gzip.compress(inner, 1), 1)
            return self._send(200, body, "image/png", {"Content-Encoding": "gzip, gzip"})
        if path == "/trickle.png":  # a byte every 0.1 s, no length, (almost) never ending
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(600):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)
            return None
        if path == "/fake.png":
            return self._send(200, b"<html><body>Not Found</body></html>", "image/png")
        if path == "/truncated.jpg":
            return self._send(200, TRUNCATED_JPEG, "image/jpeg")
        if path == "/an-image-as-page":
            return self._send(200, IMAGES["/img/logo.png"], "image/png")
        if path == "/dead":
            self.close_connection = True  # hang up without a status line
            return None
        return self._send(404, b"not here")

    def _big(self, site: Site) -> None:
        """No Content-Length, so only the byte count read tells the client to stop."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        block = IMAGES["/img/l.png"] * (65536 // len(IMAGES["/img/l.png"]) + 1)
        block = block[:65536]
        try:
            while site.big_sent < BIG_TOTAL:
                self.wfile.write(block)
                site.big_sent += len(block)
        finally:
            site.big_done.set()


@contextmanager
def serve(robots: str = "ok") -> Iterator[Site]:
    site = Site(robots)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.site = site  # type: ignore[attr-defined]
    site.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield site
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def site() -> Iterator[Site]:
    with serve() as s:
        yield s


@pytest.fixture
def make_fetcher(tmp_path) -> Iterator[Callable[..., Fetcher]]:
    """Fast settings so the whole file stays quick; every fetcher is closed at teardown."""
    made: list[Fetcher] = []

    def make(**kw) -> Fetcher:
        settings = {"timeout_s": 0.5, "retries": 2, "backoff_s": 0.05, "max_bytes": CAP,
                    "per_host_delay_s": 0.0, "per_host_concurrency": 4, "max_redirects": 4,
                    "max_retry_after_s": 5.0, "allow_private": ["127.0.0.1"], **kw}
        made.append(Fetcher(**settings))
        return made[-1]

    yield make
    for f in made:
        f.close()


# ------------------------------------------------------------------ fetcher
EXPECTED = {
    "/img/logo.png": "fetched", "/missing.png": "http_status", "/flaky.png": "fetched",
    "/busy.png": "fetched", "/slow.png": "timeout", "/loop/a": "redirects",
    "/chain/0": "redirects", "/big.png": "too_large", "/big-declared.png": "too_large",
    "/fake.png": "not_an_image", "/truncated.jpg": "not_an_image", "/private/x.png": "robots",
    "/to-private": "robots", "/to-ftp": "bad_scheme", "/dead": "connection",
    "/etag.png": "fetched", "/bomb.png": "too_large", "/zipped.png": "fetched",
}


def test_each_failure_is_counted_under_its_reason(site, make_fetcher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything the fetcher wrote by accident would land here
    cache = tmp_path / "http-cache.json"
    fetcher = make_fetcher(cache_file=cache)
    urls = [site.base + p for p in EXPECTED] + ["ftp://127.0.0.1/x.png", "file:///etc/passwd",
                                                 "not a url"]
    t0 = time.monotonic()
    results = fetcher.fetch_many(urls, workers=6)
    elapsed = time.monotonic() - t0

    assert [r.url for r in results] == urls  # same order as asked
    got = {r.url.removeprefix(site.base): r.status for r in results}
    assert got == {**EXPECTED, "ftp://127.0.0.1/x.png": "bad_scheme",
                   "file:///etc/passwd": "bad_scheme", "not a url": "bad_url"}
    assert count_statuses(results) == Counter(got.values())
    by = {r.url.removeprefix(site.base): r for r in results}
    for r in results:  # failures carry no bytes and say why in one line
        assert (r.data is not None) == (r.status == "fetched")
        assert r.status == "fetched" or (r.detail and "\n" not in r.detail)
    assert by["/missing.png"].http_status == 404 and by["/missing.png"].attempts == 1
    assert by["/img/logo.png"].sha256 and by["/img/logo.png"].data == IMAGES["/img/logo.png"]

    # 500 then 200, 429 then 200: fetched on the second try; the 429 waited Retry-After
    assert by["/flaky.png"].attempts == 2 and by["/busy.png"].attempts == 2
    busy = site.times("/busy.png")
    assert len(busy) == 2 and 0.9 <= busy[1] - busy[0] < 3.0
    assert site.hits["/slow.png"] == 3  # retried, then given up as a timeout
    assert site.hits["/dead"] == 3 and site.hits["/missing.png"] == 1
    assert site.hits["/loop/a"] == 1 and site.hits["/loop/b"] == 1  # the loop is detected
    assert site.hits["/chain/4"] == 1 and site.hits["/chain/5"] == 0  # max_redirects 4

    # the oversized stream was cut: data None and the server could not send it all
    assert by["/big.png"].data is None and by["/big-declared.png"].data is None
    assert site.big_done.wait(5)
    assert site.big_sent < BIG_TOTAL
    assert "Content-Length" in by["/big-declared.png"].detail

    # robots: neither the direct URL nor the redirect target was ever requested
    assert not [p for p in site.paths() if p.startswith("/private/")]
    assert site.hits["/robots.txt"] == 1  # one robots.txt per host, however many threads
    assert all("tinyldm" in h.get("User-Agent", "") for _p, _t, h in site.log)
    assert elapsed < 15

    fetcher.close()  # writes the cache; nothing else may appear (no partial downloads)
    assert sorted(p.name for p in tmp_path.rglob("*")) == [cache.name]


def test_conditional_get_gives_unchanged_without_a_body(site, make_fetcher, tmp_path):
    cache = tmp_path / "cache" / "http.json"
    url = site.base + "/etag.png"
    with make_fetcher(cache_file=cache) as f:
        first = f.fetch(url)
    assert first.status == "fetched" and first.data == IMAGES["/etag.png"]
    saved = json.loads(cache.read_text())
    assert saved["entries"][url] == {"etag": ETAG, "last_modified": LAST_MODIFIED,
                                     "sha256": first.sha256}

    with make_fetcher(cache_file=cache) as f:
        second = f.fetch(url)
    assert second.status == "unchanged" and second.http_status == 304
    assert second.data is None and second.sha256 == first.sha256
    assert site.bodies["/etag.png"] == 1  # the second request transferred no body
    last = [h for p, _t, h in site.log if p == "/etag.png"][-1]
    assert last.get("If-None-Match") == ETAG
    assert last.get("If-Modified-Since") == LAST_MODIFIED
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cache", "http.json"]


def test_cache_is_saved_while_fetching_and_an_unconditional_fetch_downloads(
        site, make_fetcher, tmp_path):
    """A killed crawl keeps its validators (saved every save_every_s, here at once), and a
    caller that lost its copy can still get the body back."""
    cache = tmp_path / "http.json"
    f = make_fetcher(cache_file=cache, save_every_s=0)
    url = site.base + "/etag.png"
    assert f.fetch(url).status == "fetched"
    assert url in json.loads(cache.read_text())["entries"]  # before close()
    assert f.fetch(url).status == "unchanged"
    again = f.fetch(url, conditional=False)
    assert again.status == "fetched" and again.data == IMAGES["/etag.png"]


def test_pages_must_be_html(site, make_fetcher):
    f = make_fetcher()
    page, image = f.fetch_many([site.base + "/index.html", site.base + "/an-image-as-page"],
                               kind="page")
    assert page.status == "fetched" and b"<img" in (page.data or b"")
    assert image.status == "not_html" and image.data is None


def test_per_host_delay_and_concurrency_cap(site, make_fetcher):
    f = make_fetcher(per_host_delay_s=0.15, per_host_concurrency=1)
    urls = [f"{site.base}/img/{n}" for n in ("logo.png", "og.png", "s.png", "m.png")]
    assert {r.status for r in f.fetch_many(urls, workers=4)} == {"fetched"}
    starts = sorted(t for _p, t, _h in site.log)  # robots.txt counts as a request too
    assert len(starts) == 5
    assert min(b - a for a, b in zip(starts, starts[1:], strict=False)) >= 0.13

    g = make_fetcher(per_host_concurrency=2)
    site.max_inflight = 0
    urls = [f"{site.base}/sleepy.png?n={i}" for i in range(6)]
    assert {r.status for r in g.fetch_many(urls, workers=6)} == {"fetched"}
    assert site.max_inflight == 2


def test_robots_unavailable_disallows_the_host(make_fetcher):
    with serve(robots="503") as s:
        f = make_fetcher(retries=1)
        results = f.fetch_many([s.base + "/img/logo.png", s.base + "/index.html"], workers=2)
        assert [r.status for r in results] == ["robots", "robots"]
        assert "robots.txt unavailable" in results[0].detail
        assert set(s.paths()) == {"/robots.txt"}  # retried once, then nothing else


def test_robots_404_allows_everything(make_fetcher):
    with serve(robots="404") as s:
        r = make_fetcher().fetch(s.base + "/private/x.png")
        assert r.status == "fetched"
        assert s.paths() == ["/robots.txt", "/private/x.png"]


def test_user_errors_and_retry_after_parsing():
    with pytest.raises(UserError, match="user_agent"):
        Fetcher(user_agent="python-requests/2.0")
    with pytest.raises(UserError, match="timeout_s"):
        Fetcher(timeout_s=0)
    assert retry_after_s("7", cap=5) == 5 and retry_after_s("2", cap=5) == 2
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", cap=5) == 0  # in the past
    assert retry_after_s("soon", cap=5) is None and retry_after_s(None, cap=5) is None


# ------------------------------------------------------------------ crawler
def test_parse_page_resolves_and_picks_the_largest():
    html = """<html><head><base href="https://cdn.example/a/">
    <meta property="og:image" content="og.png#frag"></head><body>
    <img srcset="one.png 1x, two.png 2x, onehalf.png 1.5x" src="fallback.png">
    <img srcset="small.png 300w, big.png 1200w, x3.png 3x">
    <img src="data:image/gif;base64,R0lGOD" alt="inline">
    <img data-src="lazy.png"> <img src="one.png#again">
    <img srcset="https://cdn.example/i/a,b.png 500w, https://cdn.example/i/c.png 100w">
    <a href="../page.html#top">p</a> <a href="javascript:void(0)">js</a> <a href="#x">x</a>
    <a href="../page.html">again</a></body></html>"""
    images, links = parse_page(html, "https://brand.example/index.html")
    assert [i.url for i in images] == [
        "https://cdn.example/a/two.png", "https://cdn.example/a/big.png",
        "https://cdn.example/a/lazy.png", "https://cdn.example/a/one.png",
        "https://cdn.example/i/a,b.png", "https://cdn.example/a/og.png"]
    assert all(i.page_url == "https://brand.example/index.html" for i in images)
    assert links == ["https://cdn.example/page.html"]
    assert parse_srcset("a.png, b.png 2x") == [("a.png", "x", 1.0), ("b.png", "x", 2.0)]


def test_crawl_finds_images_and_obeys_robots_depth_and_page_cap(site, make_fetcher):
    f = make_fetcher()
    result = crawl(f, [site.base + "/index.html"], ["127.0.0.1"], max_pages=20, max_depth=2)
    page = {p.removeprefix(site.base): s for p, s in result.pages.items()}
    assert page == {"/index.html": "fetched", "/about.html": "fetched",
                    "/gallery.html": "fetched", "/private/secret.html": "robots",
                    "/missing.html": "http_status", "/deep.html": "fetched"}
    assert result.reasons == Counter({"fetched": 4, "robots": 1, "http_status": 1})
    # every page at most once; the off-site link, the mailto and the image link not at all
    html_hits = [p for p in site.paths() if p.endswith(".html")]
    assert sorted(html_hits) == sorted(set(html_hits))
    assert "/img/logo.png" not in site.paths()

    refs = {r.url.removeprefix(site.base): r for r in result.images}
    assert list(refs) == ["/img/logo.png", "/img/hero.jpg", "/img/og.png",
                          "/private/hidden.png", "/img/l.png", "/img/p2.jpg", "/img/deep.png"]
    assert refs["/img/logo.png"].alt == "Brand logo"  # first page wins over the gallery's
    assert refs["/img/logo.png"].title == "Our logo"
    assert refs["/img/hero.jpg"].caption == "Summer launch poster"
    assert refs["/img/og.png"].alt == "Share card"
    assert refs["/img/l.png"].alt == "Banner"  # srcset: the 800w candidate
    assert refs["/img/p2.jpg"].alt == "Pic"  # picture/source: the 2x candidate
    assert refs["/img/deep.png"].page_url == site.base + "/deep.html"

    downloads = f.fetch_many([r.url for r in result.images])
    assert count_statuses(downloads) == Counter({"fetched": 6, "robots": 1})
    assert not [p for p in site.paths() if p.startswith("/private/")]

    shallow = crawl(make_fetcher(), [site.base + "/index.html"], [], max_pages=20,
                    max_depth=1)
    assert "/deep.html" not in {p.removeprefix(site.base) for p in shallow.pages}
    capped = crawl(make_fetcher(), [site.base + "/index.html"], [], max_pages=2, max_depth=3)
    assert len(capped.pages) == 2


def test_crawl_config_errors_are_user_errors(make_fetcher):
    f = make_fetcher()
    with pytest.raises(UserError, match="start_urls"):
        crawl(f, ["ftp://brand.example/"], [], max_pages=5, max_depth=1)
    with pytest.raises(UserError, match="allowed_domains"):
        crawl(f, ["https://brand.example/"], ["other.example"], max_pages=5, max_depth=1)
    with pytest.raises(UserError, match="host name"):
        crawl(f, ["https://brand.example/"], ["https://brand.example"], max_pages=5,
              max_depth=1)


# ------------------------------------------------------------------ the scrape stage
def test_scrape_collects_a_site_and_a_url_list_and_reruns_incrementally(site, workdir):
    """Through the stage: a crawled site and a CSV URL list land in the manifest with their
    page, alt / caption metadata; failures are counted per source and reason; a second
    scrape downloads no unchanged ETag image again."""
    from components.config import load_params
    from components.contracts import RAW_MANIFEST, read_table
    from components.ingest.scrape import scrape

    (workdir / "list.csv").write_text(
        "url,caption\n"
        f"{site.base}/etag.png,the etag one\n{site.base}/fake.png,html pretending\n"
        f"{site.base}/private/x.png,disallowed\n{site.base}/img/logo.png,dup of the site's\n")
    params = load_params(overrides=[
        f"scrape.sources=[{{kind: site, start_urls: ['{site.base}/index.html'], max_pages: 10,"
        f" max_depth: 2}}, {{kind: urls, path: list.csv}}]",
        "scrape.http.per_host_delay_s=0", "scrape.http.timeout_s=2", "scrape.http.retries=1",
        "scrape.http.backoff_s=0.05", "scrape.http.allow_private=[127.0.0.1]"])
    m = scrape(params)
    raw = read_table(RAW_MANIFEST, "raw_manifest")
    by_url = raw.set_index("source_url")
    assert by_url.loc[f"{site.base}/img/hero.jpg", "alt_text"] == "Hero | Summer launch poster"
    assert by_url.loc[f"{site.base}/img/hero.jpg", "page_url"] == f"{site.base}/index.html"
    assert by_url.loc[f"{site.base}/etag.png", "alt_text"] == "the etag one"
    assert f"{site.base}/img/l.png" in by_url.index  # srcset: the largest candidate
    assert m["site0.fetched"] >= 6 and m["site0.robots"] == 1  # /private/hidden.png
    assert m["urls1.not_an_image"] == 1 and m["urls1.robots"] == 1
    assert m["duplicate"] >= 1  # the logo listed twice is stored once
    assert not any("/private/" in p for p in site.paths())
    assert site.bodies["/etag.png"] == 1

    again = scrape(params)
    assert again["urls1.unchanged"] == 1 and site.bodies["/etag.png"] == 1  # 304, no body
    assert len(read_table(RAW_MANIFEST, "raw_manifest")) == len(raw)

    # a run killed after saving validators but before storing the image: the 304 has no
    # copy behind it, so the image is downloaded again rather than lost
    etag_row = raw.set_index("source_url").loc[f"{site.base}/etag.png"]
    (workdir / etag_row["path"]).unlink()
    (workdir / RAW_MANIFEST).unlink()
    third = scrape(params)
    assert third["urls1.fetched"] == again["urls1.fetched"] + 1 and site.bodies["/etag.png"] == 2
    assert (workdir / etag_row["path"]).exists()


def test_a_body_that_never_ends_stops_at_the_deadline(site: Site, make_fetcher) -> None:
    """A byte every 0.1 s: each read returns in time, so only the whole-download deadline
    (max_download_s) stops it; the fetcher is free again right after."""
    f = make_fetcher(max_download_s=1.5, retries=0)
    t0 = time.monotonic()
    r = f.fetch(f"{site.base}/trickle.png")
    assert r.status == "download_deadline" and "still arriving after 1.5 s" in r.detail
    assert r.attempts == 1  # not retried: the same server would trickle again
    assert time.monotonic() - t0 < 4
    assert f.fetch(f"{site.base}/img/logo.png").status == "fetched"


def test_the_stage_deadline_cuts_a_download_and_starts_nothing_after(site: Site,
                                                                      make_fetcher) -> None:
    """stop_at (the stage's max_stage_s) ends a body in flight, under its own reason, and
    no URL is asked for after it."""
    f = make_fetcher(stop_at=time.monotonic() + 1.0)
    assert f.fetch(f"{site.base}/img/logo.png").status == "fetched"
    r = f.fetch(f"{site.base}/trickle.png")
    assert r.status == "stage_deadline" and "max_stage_s" in r.detail
    asked = len(site.log)
    late = f.fetch(f"{site.base}/img/hero.jpg")
    assert late.status == "stage_deadline" and late.detail.startswith("not tried")
    assert len(site.log) == asked


def test_a_scrape_past_its_deadline_keeps_what_came(site, workdir, capsys) -> None:
    """The scrape stage with a URL that never ends: the images before it are stored and in
    the manifest, it and the rest are counted as stage_deadline, one line says why."""
    from components.config import load_params
    from components.contracts import RAW_MANIFEST, read_table
    from components.ingest.scrape import scrape

    urls = ["/img/logo.png", "/img/hero.jpg", "/trickle.png", "/img/m.png", "/img/l.png"]
    (workdir / "list.txt").write_text("".join(f"{site.base}{u}\n" for u in urls))
    params = load_params(overrides=[
        "scrape.sources=[{kind: urls, path: list.txt}]", "scrape.http.workers=1",
        "scrape.http.per_host_delay_s=0", "scrape.http.max_stage_s=1.5",
        "scrape.http.allow_private=[127.0.0.1]"])
    m = scrape(params)
    assert m["urls0.fetched"] == 2 and m["urls0.stage_deadline"] == 3
    raw = read_table(RAW_MANIFEST, "raw_manifest")
    assert sorted(raw["source_url"]) == sorted(site.base + u for u in urls[:2])
    assert "/img/m.png" not in site.paths()
    said = [ln for ln in capsys.readouterr().out.splitlines() if "max_stage_s" in ln]
    assert len(said) == 1 and "3 URLs not downloaded" in said[0]


def test_pages_and_their_image_lists_are_bounded(site: Site, make_fetcher) -> None:
    """An HTML page over max_page_bytes is too_large (images keep their own cap); a page's
    image references past max_images_per_page are dropped and counted."""
    f = make_fetcher(max_page_bytes=20_000)
    assert f.fetch(f"{site.base}/huge.html", kind="page").status == "too_large"
    assert make_fetcher().fetch(f"{site.base}/huge.html", kind="page").status == "fetched"
    found = crawl(make_fetcher(), [f"{site.base}/many.html"], [], max_pages=1, max_depth=0,
                  max_images_per_page=4)
    assert [r.url.removeprefix(site.base) for r in found.images] == [
        f"/img/n{i}.png" for i in range(4)]
    assert found.images_over_cap == 5


def test_a_name_that_turns_private_after_the_check_is_not_connected_to(
        site: Site, make_fetcher, monkeypatch) -> None:
    """DNS rebinding: the name answers a public address to the check before the request,
    then the loopback address. The connection goes only to an address checked as it
    opens, so the local server is never asked."""
    import socket

    real = socket.getaddrinfo
    answers = iter(["93.184.215.14"])  # the first answer is public, every later one not

    def rebinding(host, *args, **kw):
        if host == "rebind.example":
            return real(next(answers, "127.0.0.1"), *args, **kw)
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = site.base.rsplit(":", 1)[1]
    r = make_fetcher(allow_private=[], obey_robots=False, retries=0).fetch(
        f"http://rebind.example:{port}/img/logo.png")
    assert r.status == "private_address" and "rebind.example resolves to 127.0.0.1" in r.detail
    assert site.log == []


def test_an_image_over_validate_max_pixels_is_never_decoded(site: Site, make_fetcher) -> None:
    """The fetcher's bomb limit is validate.max_pixels (the scrape stage passes it), not
    Pillow's own 89 million."""
    url = f"{site.base}/img/logo.png"
    with Image.open(io.BytesIO(IMAGES["/img/logo.png"])) as im:
        pixels = im.width * im.height
    small = make_fetcher(max_pixels=pixels - 1).fetch(url)
    assert small.status == "not_an_image"
    assert f"exceeds the decompression-bomb limit ({pixels - 1} pixels" in small.detail
    assert make_fetcher(max_pixels=pixels).fetch(url).status == "fetched"


def test_downloads_run_a_bounded_window_ahead_of_the_consumer(site: Site,
                                                               make_fetcher) -> None:
    """iter_fetch keeps at most 2 x workers downloads submitted (their bodies in memory),
    not every URL at once; the rest start as results are taken."""
    f = make_fetcher()
    urls = [f"{site.base}/img/logo.png?{i}" for i in range(40)]
    it = f.iter_fetch(urls, workers=2)
    assert next(it).status == "fetched"
    time.sleep(0.5)  # time enough for an unbounded pool to fetch them all
    assert site.hits["/img/logo.png"] <= 5  # 4 ahead + the one taken
    assert [r.status for r in it] == ["fetched"] * 39


def test_non_public_addresses_are_refused_unless_allowed(site: Site, make_fetcher) -> None:
    """Loopback (in any spelling), link-local cloud metadata and the like are refused
    before any request, on every redirect hop too, unless scrape.http.allow_private
    lists the host or a network holding its address."""
    port = site.base.rsplit(":", 1)[1]
    closed = make_fetcher(allow_private=[], retries=0)
    for url in [f"{site.base}/img/logo.png", f"http://0x7f000001:{port}/img/logo.png",
                f"http://[::1]:{port}/img/logo.png", "http://169.254.169.254/latest/meta-data",
                "http://10.1.2.3/x.png"]:
        r = closed.fetch(url)
        assert r.status == "private_address", (url, r.status)
        assert "scrape.http.allow_private" in r.detail
    hits = sum(site.hits.values())
    assert hits == 0  # nothing was asked of the local server, not even robots.txt
    by_net = make_fetcher(allow_private=["127.0.0.0/8"])
    assert by_net.fetch(f"{site.base}/img/logo.png").status == "fetched"
    by_name = make_fetcher(allow_private=["localhost"], obey_robots=False)
    assert by_name.fetch(f"http://localhost:{port}/img/logo.png").status == "fetched"
    hop = by_name.fetch(f"http://localhost:{port}/to-127")
    assert hop.status == "private_address" and "127.0.0.1 resolves to 127.0.0.1" in hop.detail
