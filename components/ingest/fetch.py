"""A polite HTTP client for the scrape stage: images and HTML pages, one `Fetcher` per run.

Politeness is the point: robots.txt is obeyed per hop, every host gets a minimum interval
between request starts and a cap on parallel requests, retries back off and honour
Retry-After, and a body is never held beyond the byte cap. Every outcome is a
`FetchResult` whose `status` is "fetched", "unchanged" or a failure reason the stage
counts; network trouble never escapes as an exception.

robots.txt policy (RFC 9309, conservative where the RFC lets us choose):
- 2xx: parsed (Protego: longest match wins, wildcards understood); its Crawl-delay raises
  the host's delay (capped at `max_retry_after_s`);
- 4xx other than 429 (404 included): no rules, everything allowed;
- 429, 5xx, timeout, connection failure, redirect trouble or an oversized file: the whole
  host is disallowed for the rest of this run: we cannot know what the owner asked for.

Conditional GET (images only: a page answered 304 would leave the crawler without links)
through `Validators` (validators.py). Every connection goes only to an address checked
as it opens (web.PinnedTransport); nothing new starts after `stop_at` (the stage's
deadline) and no body is read past it or past `max_download_s`.

Over 400 lines on purpose: `Fetcher` holds the per-host politeness state (gates, robots
rules) that every request path shares; its checks of URLs, addresses and bodies live
apart, in web.py.
"""

from __future__ import annotations

import itertools
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from protego import Protego

from components.contracts import UserError, progress, sha256_bytes
from components.ingest.validators import Validators
from components.ingest.web import (
    BodyTooLarge,
    PinnedTransport,
    PrivateAddress,
    address_problem,
    conditional_headers,
    decoders,
    drop_fragment,
    host_key,
    image_problem,
    inflate,
    looks_like_html,
    origin,
    retry_after_s,
    url_problem,
)

DEFAULT_USER_AGENT = "tinyldm/0.1 (brand-image collector; +https://github.com/tinyldm)"
ROBOTS_TOKEN = "tinyldm"  # the product token robots.txt groups are matched against
KINDS = ("image", "page")
OK_STATUSES = ("fetched", "unchanged")
FAILURES = ("timeout", "http_status", "too_large", "not_an_image", "not_html", "robots",
            "connection", "redirects", "bad_scheme", "bad_url", "private_address",
            "download_deadline", "stage_deadline")
REDIRECT_CODES = (301, 302, 303, 307, 308)
ROBOTS_MAX_BYTES = 512_000  # RFC 9309 asks crawlers to read at least 500 KiB
CHUNK = 64 * 1024


@dataclass
class FetchResult:
    url: str  # as requested
    final_url: str  # after redirects
    status: str  # "fetched", "unchanged" or one of FAILURES
    data: bytes | None = None
    sha256: str = ""  # of data, or the cached digest when unchanged
    http_status: int | None = None
    content_type: str = ""
    detail: str = ""  # one line for the report
    attempts: int = 0  # requests sent for the last hop (retries show up here)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


def count_statuses(results: Iterable[FetchResult]) -> Counter[str]:
    """The stage metrics want one number per outcome, failures by reason."""
    return Counter(r.status for r in results)


def parse_robots(body: bytes) -> Protego:
    return Protego.parse(body.decode("utf-8", errors="replace"))


class _HostGate:
    """Per-host politeness: at most `concurrency` requests in flight and `delay` seconds
    between request starts. Start slots are reserved under a lock, so threads queue
    fairly instead of all waking at once."""

    def __init__(self, delay: float, concurrency: int) -> None:
        self.delay = delay
        self._sem = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._next_start = 0.0

    def slow_down(self, delay: float) -> None:
        with self._lock:
            self.delay = max(self.delay, delay)

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._sem:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next_start)
                self._next_start = start + self.delay
            if start > now:
                time.sleep(start - now)
            yield


@dataclass
class _Robots:
    rules: Protego | None  # None: no rules apply
    allow_all: bool
    detail: str = ""

    def allows(self, url: str) -> bool:
        if self.rules is None:
            return self.allow_all
        return self.rules.can_fetch(url, ROBOTS_TOKEN)


@dataclass
class _Reply:
    """What one request produced; `failure` set means no usable response."""

    url: str
    code: int | None = None
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    body: bytes | None = None
    failure: str = ""
    detail: str = ""
    attempts: int = 0


def _positive(name: str, value: float, minimum: float = 0.0, strict: bool = True) -> None:
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise UserError(f"scrape.http.{name}: {value!r} must be {op} {minimum}; fix it in "
                        "params.yaml")


class Fetcher:
    """Owns one httpx.Client (thread-safe) and all per-host state; use it as a context
    manager so the cache file is written and connections closed."""

    def __init__(self, user_agent: str = DEFAULT_USER_AGENT, timeout_s: float = 10.0,
                 max_bytes: int = 20_000_000, per_host_delay_s: float = 0.5,
                 per_host_concurrency: int = 2, retries: int = 3, backoff_s: float = 0.5,
                 max_retry_after_s: float = 30.0, max_redirects: int = 5,
                 cache_file: Path | None = None, obey_robots: bool = True,
                 max_download_s: float | None = None, save_every_s: float = 30.0,
                 max_pixels: int | None = None, allow_private: list[str] = (),
                 max_page_bytes: int | None = None, stop_at: float | None = None) -> None:
        if ROBOTS_TOKEN not in user_agent.lower() or not any(
                m in user_agent for m in ("http://", "https://", "@")):
            raise UserError(f"scrape.http.user_agent: {user_agent!r} must name tinyldm and a "
                            "contact URL or e-mail, e.g. 'tinyldm/0.1 (+https://you.example)'")
        _positive("timeout_s", timeout_s)
        _positive("max_bytes", max_bytes)
        _positive("per_host_delay_s", per_host_delay_s, strict=False)
        _positive("per_host_concurrency", per_host_concurrency, 1, strict=False)
        _positive("retries", retries, strict=False)
        _positive("backoff_s", backoff_s, strict=False)
        _positive("max_retry_after_s", max_retry_after_s, strict=False)
        _positive("max_redirects", max_redirects, strict=False)
        self.user_agent = user_agent
        self.timeout_s = timeout_s
        self.max_bytes = int(max_bytes)
        self.max_page_bytes = int(max_page_bytes or max_bytes)  # an HTML page's cap
        self.stop_at = stop_at  # time.monotonic() after which nothing new starts
        self.max_pixels = max_pixels  # a larger declared image is never decoded
        self.allow_private = list(allow_private)  # non-public hosts/networks it may fetch
        self.per_host_delay_s = per_host_delay_s
        self.per_host_concurrency = int(per_host_concurrency)
        self.retries = int(retries)
        self.backoff_s = backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.max_redirects = int(max_redirects)
        self.obey_robots = obey_robots
        # a server trickling bytes defeats the per-read timeout; this bounds one attempt
        self.max_download_s = max_download_s or max(60.0, 6 * timeout_s)
        # (checked as bytes arrive: a download overruns it by at most one read, timeout_s)
        # a killed long crawl keeps most of its validators
        self.validators = Validators(cache_file, save_every_s)
        self._lock = threading.Lock()  # guards the dicts below
        self._gates: dict[str, _HostGate] = {}
        self._robots: dict[str, _Robots] = {}
        self._robots_locks: dict[str, threading.Lock] = {}
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s), follow_redirects=False,
            headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
            transport=PinnedTransport(self.allow_private, limits))

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.validators.save()
        finally:
            self._client.close()

    # -------------------------------------------------------------- public API
    def fetch(self, url: str, kind: str = "image", conditional: bool = True) -> FetchResult:
        """Fetch one URL; failures come back as a status, never as an exception.
        `conditional=False` downloads even when the cache holds validators for it."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if self._stage_over():
            return FetchResult(url, url, "stage_deadline", detail="not tried: the "
                               "stage's deadline (scrape.http.max_stage_s) had passed")
        entry = self.validators.get(url) if kind == "image" and conditional else None
        cap = self.max_bytes if kind == "image" else self.max_page_bytes
        reply = self._follow(url, conditional_headers(entry), cap)
        if reply.failure:
            return FetchResult(url, reply.url, reply.failure, http_status=reply.code,
                               detail=reply.detail, attempts=reply.attempts)
        base = {"url": url, "final_url": reply.url, "http_status": reply.code,
                "content_type": reply.headers.get("content-type", ""),
                "attempts": reply.attempts}
        if reply.code == 304 and entry:
            self.validators.remember(url, reply.headers, entry["sha256"], revalidated=True)
            return FetchResult(status="unchanged", sha256=entry["sha256"],
                               detail="not modified since the last run", **base)
        if reply.code is None or not 200 <= reply.code < 300 or reply.body is None:
            return FetchResult(status="http_status", detail=f"HTTP {reply.code}", **base)
        data = reply.body
        if kind == "image":
            problem = image_problem(data, self.max_pixels)
            if problem:
                return FetchResult(status="not_an_image", detail=problem, **base)
        elif not looks_like_html(base["content_type"], data):
            return FetchResult(status="not_html", detail=f"Content-Type "
                               f"{base['content_type'] or '(none)'} and no HTML markup", **base)
        digest = sha256_bytes(data)
        if kind == "image":
            self.validators.remember(url, reply.headers, digest)
        return FetchResult(status="fetched", data=data, sha256=digest,
                           detail=f"{len(data)} bytes", **base)

    def fetch_many(self, urls: list[str], kind: str = "image",
                   workers: int = 4) -> list[FetchResult]:
        """Results in the order of `urls`; per-host limits hold across all workers."""
        return list(self.iter_fetch(urls, kind, workers))

    def iter_fetch(self, urls: list[str], kind: str = "image",
                   workers: int = 4) -> Iterator[FetchResult]:
        """`fetch_many` as a stream, in order: the caller stores each image as it comes, so
        a killed run keeps what it downloaded. Stopping early cancels what has not begun."""
        if not urls:
            return
        n = max(1, min(workers, len(urls)))
        pool = ThreadPoolExecutor(max_workers=n)
        ahead = deque()  # at most 2 x workers submitted (bodies held in memory), not all
        todo = iter(urls)
        try:
            for url in itertools.islice(todo, 2 * n):
                ahead.append(pool.submit(self.fetch, url, kind))
            for _ in progress(range(len(urls)), desc=f"download {kind}s", unit="url"):
                result = ahead.popleft().result()
                for url in itertools.islice(todo, 1):
                    ahead.append(pool.submit(self.fetch, url, kind))
                yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # -------------------------------------------------------------- redirects
    def _follow(self, url: str, headers: dict[str, str], max_bytes: int,
                robots: bool = True) -> _Reply:
        """Follow redirects by hand so every hop is re-checked for scheme and robots."""
        seen: set[str] = set()
        current = url
        for _hop in range(self.max_redirects + 1):
            problem = url_problem(current) or address_problem(current, self.allow_private)
            if problem:
                return _Reply(current, failure=problem[0], detail=problem[1])
            current = drop_fragment(current)
            seen.add(current)
            if robots and self.obey_robots:
                rules = self._robots_for(current)
                if not rules.allows(current):
                    return _Reply(current, failure="robots",
                                  detail=rules.detail or "disallowed by robots.txt")
            reply = self._request(current, headers, max_bytes)
            if reply.failure or reply.code not in REDIRECT_CODES:
                return reply
            location = reply.headers.get("location")
            if not location:
                return _Reply(current, reply.code, reply.headers, failure="http_status",
                              detail=f"HTTP {reply.code} without a Location",
                              attempts=reply.attempts)
            try:
                nxt = drop_fragment(str(httpx.URL(current).join(location)))
            except httpx.InvalidURL as e:
                return _Reply(current, reply.code, failure="bad_url",
                              detail=f"bad redirect target: {e}")
            if nxt in seen:
                return _Reply(nxt, reply.code, failure="redirects",
                              detail=f"redirect loop back to {nxt}")
            current = nxt
        return _Reply(current, failure="redirects",
                      detail=f"more than {self.max_redirects} redirects")

    # -------------------------------------------------------------- retries
    def _request(self, url: str, headers: dict[str, str], max_bytes: int) -> _Reply:
        """One hop with retries on connection errors, timeouts, 429 and 5xx."""
        reply = _Reply(url)
        for attempt in range(self.retries + 1):
            reply = self._attempt(url, headers, max_bytes)
            reply.attempts = attempt + 1
            retryable = reply.failure in ("timeout", "connection") or (
                not reply.failure and reply.code is not None
                and (reply.code == 429 or reply.code >= 500))
            if not retryable or attempt == self.retries or self._stage_over():
                break
            wait = retry_after_s(reply.headers.get("retry-after"), self.max_retry_after_s)
            time.sleep(wait if wait is not None else self.backoff_s * 2 ** attempt)
        if not reply.failure and reply.code is not None and (
                reply.code == 429 or reply.code >= 500):
            reply.failure = "http_status"
            reply.detail = f"HTTP {reply.code} after {reply.attempts} attempts"
        return reply

    def _attempt(self, url: str, headers: dict[str, str], max_bytes: int) -> _Reply:
        """One request under the host's gate; the body is read only for a 2xx."""
        try:
            with self._gate(url).slot(), self._client.stream("GET", url,
                                                              headers=headers) as resp:
                reply = _Reply(url, resp.status_code, resp.headers)
                if not 200 <= resp.status_code < 300:
                    return reply
                return self._read_body(resp, reply, max_bytes)
        except httpx.TimeoutException as e:
            return _Reply(url, failure="timeout", detail=f"{type(e).__name__} after "
                          f"{self.timeout_s:g} s")
        except httpx.UnsupportedProtocol as e:
            return _Reply(url, failure="bad_scheme", detail=str(e)[:200])
        except (httpx.TransportError, httpx.DecodingError, OSError) as e:
            return _Reply(url, failure="connection", detail=f"{type(e).__name__}: {e}"[:200])
        except httpx.InvalidURL as e:
            return _Reply(url, failure="bad_url", detail=str(e)[:200])
        except PrivateAddress as e:  # the address checked as the connection opened
            return _Reply(url, failure="private_address", detail=str(e))

    def _stage_over(self) -> bool:
        return self.stop_at is not None and time.monotonic() > self.stop_at

    def _read_body(self, resp: httpx.Response, reply: _Reply, max_bytes: int) -> _Reply:
        """Stream at most `max_bytes`; leaving the `with` early drops the connection, so
        the server stops sending."""
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            reply.failure = "too_large"
            reply.detail = f"Content-Length {declared} > cap {max_bytes}"
            return reply
        chain = decoders(resp.headers.get("content-encoding", ""))
        if chain is None:
            reply.failure = "connection"
            reply.detail = f"unsupported Content-Encoding {resp.headers['content-encoding']!r}"
            return reply
        buf = bytearray()
        deadline = time.monotonic() + self.max_download_s
        if self.stop_at is not None:
            deadline = min(deadline, self.stop_at)
        # as the network delivers it (a chunk size would wait for that many bytes, so a
        # trickle never reached the deadline check), decoded here, bounded (httpx is not)
        for raw in resp.iter_raw():
            try:
                buf += inflate(chain, raw, max_bytes - len(buf))
            except BodyTooLarge:
                reply.failure = "too_large"
                reply.detail = f"body passed the cap of {max_bytes} bytes (decoded)"
                return reply
            except zlib.error as e:
                reply.failure = "connection"
                reply.detail = f"bad {resp.headers['content-encoding']} body: {e}"[:200]
                return reply
            if time.monotonic() > deadline:
                if self._stage_over():
                    reply.failure = "stage_deadline"
                    reply.detail = "cut off by the stage's deadline (scrape.http.max_stage_s)"
                else:
                    reply.failure = "download_deadline"
                    reply.detail = (f"body still arriving after {self.max_download_s:g} s "
                                    "(scrape.http.max_download_s)")
                return reply
        reply.body = bytes(buf)
        return reply

    # -------------------------------------------------------------- per-host state
    def _gate(self, url: str) -> _HostGate:
        key = host_key(url)
        with self._lock:
            gate = self._gates.get(key)
            if gate is None:
                gate = self._gates[key] = _HostGate(self.per_host_delay_s,
                                                    self.per_host_concurrency)
            return gate

    def _robots_for(self, url: str) -> _Robots:
        """One robots.txt request per origin per run, even with many threads asking."""
        key = origin(url)
        with self._lock:
            if key in self._robots:
                return self._robots[key]
            lock = self._robots_locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                if key in self._robots:
                    return self._robots[key]
            rules = self._load_robots(key)
            with self._lock:
                self._robots[key] = rules
            return rules

    def _load_robots(self, origin_url: str) -> _Robots:
        reply = self._follow(f"{origin_url}/robots.txt", {}, ROBOTS_MAX_BYTES, robots=False)
        if not reply.failure and reply.code is not None and 200 <= reply.code < 300:
            rules = parse_robots(reply.body or b"")
            delay = rules.crawl_delay(ROBOTS_TOKEN)
            if delay:
                self._gate(origin_url).slow_down(min(float(delay), self.max_retry_after_s))
            return _Robots(rules, allow_all=True, detail="disallowed by robots.txt")
        if not reply.failure and reply.code is not None and 400 <= reply.code < 500:
            return _Robots(None, allow_all=True)
        why = reply.detail or f"HTTP {reply.code}"
        return _Robots(None, allow_all=False,
                       detail=f"robots.txt unavailable ({why}); host skipped this run")
