"""What the fetcher checks before and after a request: URLs it may ask for, Retry-After,
whether a body is an image or a page; decoding a compressed body within the byte cap."""

from __future__ import annotations

import datetime as dt
import email.utils
import io
import ipaddress
import socket
import zlib

import httpcore
import httpx
from PIL import Image

from components.contracts import UserError


def url_problem(url: str) -> tuple[str, str] | None:
    """(reason, detail) when a URL can never be fetched, so no request is spent on it."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        return "bad_url", f"unparseable URL: {e}"
    if not u.scheme:
        return "bad_url", "not an absolute URL"
    if u.scheme not in ("http", "https"):
        return "bad_scheme", f"scheme {u.scheme or '(none)'!r}: only http and https are fetched"
    if not u.host:
        return "bad_url", "URL has no host"
    return None


def check_url(url: str, where: str) -> str:
    """For URLs the user wrote in config: a bad one is theirs to fix, so it raises."""
    problem = url_problem(url)
    if problem:
        raise UserError(f"{where}: {url!r} is not fetchable ({problem[1]}); "
                        "use a full http(s):// URL")
    return url


def host_key(url: str) -> str:
    """Rate limits apply to what one server sees: host and port, not scheme."""
    u = httpx.URL(url)
    return f"{u.host.lower()}:{u.port or (443 if u.scheme == 'https' else 80)}"


def origin(url: str) -> str:
    """robots.txt belongs to scheme + host + port (RFC 9309 section 2.3)."""
    u = httpx.URL(url)
    return f"{u.scheme}://{u.netloc.decode('ascii').lower()}"


def drop_fragment(url: str) -> str:
    return str(httpx.URL(url).copy_with(fragment=None))


def retry_after_s(value: str | None, cap: float, now: dt.datetime | None = None) -> float | None:
    """Seconds a server asked us to wait (delta-seconds or an HTTP date), cut to `cap`;
    None when absent or unreadable so the caller falls back to its own backoff."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), cap)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return min(max((when - now).total_seconds(), 0.0), cap)


def image_problem(data: bytes, max_pixels: int | None = None) -> str | None:
    """Why `data` is not a usable image, or None.

    verify() catches corrupt structure but not truncation, so a fresh open also load()s
    the pixels, but only when the declared size is within `max_pixels` (validate.max_pixels;
    default Pillow's limit): a decompression bomb is never decoded. Checked explicitly,
    not via warnings.catch_warnings, which is not thread-safe (fetch_many verifies in
    threads).
    """
    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as im:
            if limit and im.width * im.height > limit:
                return (f"{im.width}x{im.height} pixels exceeds the decompression-bomb limit "
                        f"({limit} pixels, validate.max_pixels)")
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Image.DecompressionBombError as e:
        return str(e)
    except Image.UnidentifiedImageError:
        return "not in any image format Pillow can read"
    except Exception as e:  # noqa: BLE001 - any decoder failure means "not an image"
        return f"does not decode as an image ({type(e).__name__}: {e})"[:200]
    return None


def looks_like_html(content_type: str, data: bytes) -> bool:
    """Trust a text/html type; otherwise sniff, since servers often send no or a wrong type."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype in ("text/html", "application/xhtml+xml"):
        return True
    if ctype and not ctype.startswith("text/") and ctype != "application/octet-stream":
        return False
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--"))


class BodyTooLarge(Exception):
    """The decoded body would pass the byte cap."""


def decoders(content_encoding: str) -> list | None:
    """zlib decoders undoing a Content-Encoding chain (applied in order, so undone last
    first); None for an encoding other than gzip, deflate or identity."""
    out = []
    for code in reversed([c.strip().lower() for c in content_encoding.split(",")]):
        if code in ("", "identity"):
            continue
        if code not in ("gzip", "x-gzip", "deflate"):
            return None
        out.append(zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in code else zlib.MAX_WBITS))
    return out


def inflate(chain: list, data: bytes, room: int) -> bytes:
    """`data` through the decoders, never holding more than `room` + 1 decoded bytes at any
    stage (a gzip bomb, or gzip of gzip, is stopped as it streams); BodyTooLarge past it."""
    for d in chain:
        data = d.decompress(data, room + 1)
        if len(data) > room:
            raise BodyTooLarge
    if len(data) > room:  # identity: the raw bytes themselves
        raise BodyTooLarge
    return data


def conditional_headers(entry: dict[str, str] | None) -> dict[str, str]:
    """If-None-Match / If-Modified-Since from a cached response's validators."""
    out = {}
    if entry and entry.get("etag"):
        out["If-None-Match"] = entry["etag"]
    if entry and entry.get("last_modified"):
        out["If-Modified-Since"] = entry["last_modified"]
    return out


def _allowed(host: str, ip: ipaddress._BaseAddress, allow: list[str]) -> bool:
    for entry in allow:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:  # a host name
            if host.lower() == entry.lower():
                return True
    return False


class PrivateAddress(Exception):
    """A host resolved to an address that is not public and not allowed."""


def checked_addresses(host: str, allow: list[str]) -> list[str]:
    """Every address `host` resolves to, in resolver order, once each; PrivateAddress
    when one is not public (loopback, private, link-local such as cloud metadata, ...)
    and neither the host nor a network holding it is in `allow`
    (scrape.http.allow_private). socket.gaierror when the name does not resolve."""
    out: list[str] = []
    for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP):
        addr = str(info[4][0])
        ip = ipaddress.ip_address(addr.split("%")[0])
        if not ip.is_global and not _allowed(host, ip, allow):
            raise PrivateAddress(f"{host} resolves to {ip}, not a public address; "
                                 "list it in scrape.http.allow_private to fetch from it")
        if addr not in out:
            out.append(addr)
    return out


def address_problem(url: str, allow: list[str]) -> tuple[str, str] | None:
    """("private_address", detail) for a URL whose host `checked_addresses` refuses,
    checked before every request and redirect hop so the refusal has its own status; a
    host that does not resolve is left to fail as a connection error. The connection
    itself goes only to addresses checked again as it opens (`PinnedTransport`)."""
    try:
        checked_addresses(httpx.URL(url).host, allow)
    except PrivateAddress as e:
        return "private_address", str(e)
    except (socket.gaierror, UnicodeError, OSError):
        return None
    return None


class _PinnedBackend(httpcore.SyncBackend):
    """Resolves a host once per connection, checks every address, and connects to a
    checked one: a DNS answer that changes after the check (rebinding) cannot turn the
    connection inward. TLS still verifies the host name (httpcore passes it as SNI)."""

    def __init__(self, allow: list[str]) -> None:
        self.allow = list(allow)

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        try:
            addresses = checked_addresses(host, self.allow)
        except (socket.gaierror, UnicodeError) as e:
            raise httpcore.ConnectError(f"{host}: {e}") from e
        error: Exception = httpcore.ConnectError(f"{host} resolves to no address")
        for addr in addresses:
            try:
                return super().connect_tcp(addr, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                error = e
        raise error


class PinnedTransport(httpx.HTTPTransport):
    """httpx's transport with `_PinnedBackend` under its connection pool (no proxy: a
    proxy would resolve the names itself, unchecked)."""

    def __init__(self, allow: list[str], limits: httpx.Limits) -> None:  # noqa: D107
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, network_backend=_PinnedBackend(allow))
