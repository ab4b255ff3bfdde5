"""The fetcher's conditional-GET memory: per image URL, the validators (ETag,
Last-Modified) its server gave and the digest of the body they describe.

The file is JSON, {"version": 1, "entries": {url: {"etag", "last_modified", "sha256"}}},
keyed by the requested URL, loaded on open and written atomically every `save_every_s`
while fetching and at the end: a killed run loses at most that much revalidation. An
entry may name an image the caller has not stored yet; `Fetcher.fetch(...,
conditional=False)` is the way back from that. Thread-safe.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import httpx

from components.contracts import atomic_path

log = logging.getLogger(__name__)

VERSION = 1


def _load(path: Path | None) -> dict[str, dict[str, str]]:
    """A missing or unreadable cache only costs a full download, so it never fails a run."""
    if path is None or not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        entries = raw["entries"] if raw.get("version") == VERSION else {}
        return {str(u): {k: str(e.get(k) or "") for k in ("etag", "last_modified", "sha256")}
                for u, e in entries.items() if isinstance(e, dict) and e.get("sha256")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s: unreadable HTTP cache (%s); downloading everything again", path, e)
        return {}


class Validators:
    def __init__(self, path: Path | None, save_every_s: float = 30.0) -> None:
        self.path = Path(path) if path is not None else None
        self.save_every_s = save_every_s
        self._entries = _load(self.path)
        self._dirty = False
        self._saved_at = time.monotonic()
        self._lock = threading.Lock()

    def get(self, url: str) -> dict[str, str] | None:
        with self._lock:
            entry = self._entries.get(url)
            return dict(entry) if entry else None

    def remember(self, url: str, headers: httpx.Headers, digest: str,
                 revalidated: bool = False) -> None:
        """Keep validators only when the server gave some. A 304 may omit them, so then
        the old ones stay; a 200 without them makes the URL uncacheable."""
        etag = headers.get("etag", "")
        modified = headers.get("last-modified", "")
        with self._lock:
            old = self._entries.get(url)
            if revalidated and old:
                etag, modified = etag or old["etag"], modified or old["last_modified"]
            new = {"etag": etag, "last_modified": modified, "sha256": digest}
            if not (etag or modified):
                if old is None:
                    return
                self._entries.pop(url)
            elif new == old:
                return
            else:
                self._entries[url] = new
            self._dirty = True
            due = time.monotonic() - self._saved_at >= self.save_every_s
        if due:
            self.save()

    def save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            if not self._dirty:
                return
            text = json.dumps({"version": VERSION, "entries": self._entries}, indent=1,
                              sort_keys=True)
            with atomic_path(self.path) as tmp:
                tmp.write_text(text + "\n")
            self._dirty = False
            self._saved_at = time.monotonic()
