"""Downloading a release artifact from the registrar, resumed with `Range` after a break.

The artifact goes to a `.part` file that survives the agent: each request asks for
`Range: bytes=N-` where N is what the file already holds, appends a 206 answer, starts over on a
200 (a server that ignores ranges) and never writes beyond the release's size. Network errors
and 5xx are retried (`ATTEMPTS` times, with growing pauses), each retry resuming where the last
one stopped; 401, 403 and 404 are not (the platform does not offer this release to this device).

The device authenticates with its own MQTT credentials (HTTP basic). urllib runs in a daemon
thread (as enrollment does), so that a registrar that never answers cannot hold up the agent's
exit; cancelling the download stops the thread at its next chunk.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import logging
import os
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from iotbiz.agent.identity import _in_daemon_thread
from iotbiz.agent.releases import UpdateError

log = logging.getLogger(__name__)

CHUNK = 1 << 16
HTTP_TIMEOUT_S = 30.0
ATTEMPTS = 6
PAUSE_S = 1.0  # before the first retry; doubles
PAUSE_MAX_S = 30.0
PROGRESS_EVERY_BYTES = 1 << 20

Progress = Callable[[int], None]


class _Retry(Exception):
    """A failure worth another attempt (network error, 5xx, a short answer)."""


async def download(
    url: str,
    part: Path,
    size: int,
    auth: tuple[str, str],
    tls: ssl.SSLContext | None,
    on_progress: Progress,
) -> None:
    """Fetch `url` into `part` until it holds `size` bytes; UpdateError when it cannot."""
    pause = PAUSE_S
    for attempt in range(1, ATTEMPTS + 1):
        cancelled = threading.Event()
        try:
            await _in_daemon_thread(_fetch, url, part, size, auth, tls, on_progress, cancelled)
            return
        except _Retry as exc:
            if attempt == ATTEMPTS:
                raise UpdateError(f"download failed after {ATTEMPTS} attempts: {exc}") from exc
            log.warning("download of %s: %s; retrying in %.0f s", url, exc, pause)
        finally:
            cancelled.set()  # cancelled, or done: the thread stops at its next chunk
        await asyncio.sleep(pause)
        pause = min(pause * 2, PAUSE_MAX_S)


def _fetch(
    url: str,
    part: Path,
    size: int,
    auth: tuple[str, str],
    tls: ssl.SSLContext | None,
    on_progress: Progress,
    cancelled: threading.Event,
) -> None:
    """One request (blocking): append to `part` what the server sends from its current end."""
    # unbuffered: every byte received is in the file (the page cache) at once, so that a
    # break or a kill leaves all of it to resume from
    with part.open("ab", buffering=0) as out:
        have = out.tell()
        if have > size:  # a file longer than the release: not ours to resume
            out.truncate(0)
            have = 0
        if have == size:
            return
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers = {"Authorization": f"Basic {token}"}
        if have:
            headers["Range"] = f"bytes={have}-"
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 - the registrar
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls)
        )
        try:
            with opener.open(request, timeout=HTTP_TIMEOUT_S) as response:
                if response.status == 200 and have:
                    log.info("download of %s: the server sent it whole, starting over", url)
                    out.truncate(0)
                    out.seek(0)
                    have = 0
                elif response.status == 206 and not _starts_at(response, have):
                    raise _Retry(f"206 for the wrong range: {response.headers['Content-Range']}")
                elif response.status not in (200, 206):
                    raise _Retry(f"HTTP {response.status}")
                if have:
                    log.info("download of %s: resuming at byte %d", url, have)
                reported = have
                while have < size:
                    if cancelled.is_set():
                        return
                    # read1: what has arrived, so that the file holds all of it at a break
                    chunk = response.read1(min(CHUNK, size - have))
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[out.write(view) or 0 :]
                    have += len(chunk)
                    if have - reported >= PROGRESS_EVERY_BYTES:
                        out.flush()
                        on_progress(have)
                        reported = have
                out.flush()
                os.fsync(out.fileno())
                if have < size:
                    raise _Retry(f"connection closed at byte {have} of {size}")
                on_progress(have)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416:  # what we hold is not a prefix the server knows: start over
                out.truncate(0)
                raise _Retry("416 range not satisfiable, starting over") from exc
            if exc.code in (401, 403, 404):
                raise UpdateError(f"download refused: HTTP {exc.code}") from exc
            raise _Retry(f"HTTP {exc.code}") from exc
        except (OSError, http.client.HTTPException, ValueError) as exc:
            out.flush()
            os.fsync(out.fileno())
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc


def _starts_at(response: http.client.HTTPResponse, offset: int) -> bool:
    content_range = response.headers.get("Content-Range", "")
    return content_range.startswith(f"bytes {offset}-")
