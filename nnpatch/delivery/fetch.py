"""Fetching a release's files: local paths as they are, HTTP and HTTPS with resume.

Why urllib3: it is small (pure Python, no dependencies of its own), well
kept (it is the transport under ``requests`` and pip), verifies TLS with the
system's CA store, pools connections, and hands back the raw body as a
stream without buffering or decoding it, which is what a resumable
download with byte ranges needs. It is an optional dependency
(``pip install 'nnpatch[net]'``), imported only when a URL is fetched:
updates from local paths need nothing new.

A download goes into a *partial file* beside the model. When the
connection drops, stalls or answers 5xx, the download goes on with an HTTP
``Range: bytes=N-`` request from where the partial file ends, a few times
with a growing pause; a partial file left by an earlier, interrupted run is
continued the same way. Never more bytes than the manifest's size are
written. The finished file must have the BLAKE3 the manifest gives; when a
resumed file does not, it is fetched once more from byte 0 (a byte flipped
in transit, or a server whose file changed under a resume), and only a
whole fresh download that still does not match is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from .._json import read_bounded
from ..errors import IntegrityError, MissingDependencyError, NnpatchIOError
from ..hashing import digests_equal, hash_fd
from ..sidefile import open_beside, same_file

CHUNK = 1 << 16
#: Redirects followed for one request.
MAX_REDIRECTS = 5
#: HTTP statuses worth another try: the server or a proxy in front of it is busy or broken for now.
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def redirect_allowed(origin: str, target: str) -> bool:
    """Whether a response from ``origin`` may send the download on to ``target``: only to http(s),
    and never from https:// down to plain http:// (a man in the middle could then answer)."""
    was, now = urlsplit(origin).scheme.lower(), urlsplit(target).scheme.lower()
    return now == "https" or (now == "http" and was == "http")


def resolve(base: str, name: str) -> str:
    """``name`` (a plain file name) in the folder ``base`` (a directory, or a URL ending in /)."""
    if is_url(base):
        return urljoin(base if base.endswith("/") else base + "/", name)
    return os.path.join(base, name)


def parent(location: str) -> str:
    """The folder a file is in: a URL up to its last ``/``, or a path's directory."""
    if is_url(location):
        return urljoin(location, ".")
    return os.path.dirname(location) or "."


def _shown(url: str) -> str:
    """A URL without credentials or query, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


@dataclass
class FetchOptions:
    """How patient a fetch is. ``retries``: further tries of one file after the first;
    ``backoff``: the first pause in seconds, doubled after each try.

    A server that drips (a byte every few seconds never trips the read timeout) is cut by two
    rules (SECURITY.md, "Release feeds"): every ``rate_window`` seconds of a transfer must bring
    ``min_rate`` bytes per second (else the transfer is cut and resumed, as a stall is); and the
    whole fetch of one file, every try and pause included, must end by its deadline: ``deadline``
    seconds when given, else ``grace`` seconds plus the bytes received at ``min_rate``, so a link
    that keeps the minimum rate always finishes. The defaults (1 KiB/s: 8 kbit/s, below any
    phone data link) pass a slow phone link and end a drip within about ``grace`` seconds."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 5
    backoff: float = 0.5
    min_rate: float = 1024.0
    rate_window: float = 10.0
    grace: float = 30.0
    deadline: float | None = None
    #: extra request headers (a token, a signed-URL cookie): sent to the first URL's origin only,
    #: never on to another host a redirect names
    headers: tuple[tuple[str, str], ...] = ()
    #: PEM bundle of the CAs to trust for https:// instead of the system's
    ca_file: str | None = None


@dataclass
class Download:
    """What one download took: ``received`` bytes over the network, of which ``resumed_from``
    were already in the partial file when it started, and the number of requests made."""

    path: str
    size: int
    received: int = 0
    resumed_from: int = 0
    requests: int = 0
    restarts: int = 0


#: The options a :class:`Fetcher` made without any uses (looked up when it is made).
DEFAULT_OPTIONS = FetchOptions()


class _Transient(Exception):
    """A failure worth another try (cut connection, stall, 5xx)."""


class _Pace:
    """The two rules against a dripping server for one file's fetch (see :class:`FetchOptions`)."""

    def __init__(self, url: str, options: FetchOptions, clock: Callable[[], float]) -> None:
        self.url, self.o, self.clock = url, options, clock
        self.start = clock()
        self.received = 0
        self.window_start = self.start
        self.window_bytes = 0

    def new_transfer(self) -> None:
        self.check_deadline()
        self.window_start = self.clock()
        self.window_bytes = 0

    def got(self, n: int) -> None:
        self.received += n
        self.window_bytes += n
        now = self.clock()
        self.check_deadline(now)
        if now - self.window_start >= self.o.rate_window:
            rate = self.window_bytes / (now - self.window_start)
            if rate < self.o.min_rate:
                raise _Transient(f"{_shown(self.url)}: {rate:.0f} bytes/s, below the minimum rate of "
                                 f"{self.o.min_rate:.0f} bytes/s")
            self.window_start, self.window_bytes = now, 0

    def check_deadline(self, now: float | None = None) -> None:
        elapsed = (self.clock() if now is None else now) - self.start
        o = self.o
        limit = o.deadline if o.deadline is not None else o.grace + self.received / o.min_rate
        if elapsed > limit:
            how = (f"the {o.deadline:g} s deadline" if o.deadline is not None else
                   f"the deadline ({o.grace:g} s plus the bytes received at {o.min_rate:.0f} bytes/s)")
            raise NnpatchIOError(f"{_shown(self.url)}: gave up after {elapsed:.0f} s, past {how}, with "
                                 f"{self.received} bytes received")


class Fetcher:
    """One connection pool for the files of one update."""

    def __init__(self, options: FetchOptions | None = None, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options or DEFAULT_OPTIONS
        self._sleep = sleep
        self._clock = clock
        self._pool = None
        self._pace: _Pace | None = None

    def _http(self):
        if self._pool is None:
            try:
                import urllib3
            except ImportError as e:
                raise MissingDependencyError("fetching over HTTP needs the 'urllib3' package: "
                                             "pip install 'nnpatch[net]'") from e
            self._urllib3 = urllib3
            tls = {"ca_certs": self.options.ca_file, "cert_reqs": "CERT_REQUIRED"} if self.options.ca_file else {}
            self._pool = urllib3.PoolManager(headers={"User-Agent": "nnpatch-update",
                                                      "Accept-Encoding": "identity"}, **tls)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.clear()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- one request ------------------------------------------------------------------------

    def _request(self, url: str, headers: dict[str, str]):
        """One GET of ``url``, following at most ``MAX_REDIRECTS`` redirects that :func:`redirect_allowed`."""
        location = url
        for _ in range(MAX_REDIRECTS + 1):
            extra = dict(self.options.headers) if _origin(location) == _origin(url) else {}
            r = self._get(location, {**extra, **headers})
            target = r.get_redirect_location()
            if not target:
                break
            _close(r)
            target = urljoin(location, target)
            if not redirect_allowed(location, target):
                raise NnpatchIOError(f"{_shown(url)}: redirected to {_shown(target)}, refused (a download may "
                                     "only be redirected to https://, or from http:// to http://)")
            location = target
        else:
            raise NnpatchIOError(f"{_shown(url)}: more than {MAX_REDIRECTS} redirects")
        if r.status in TRANSIENT_STATUS:
            _close(r)
            raise _Transient(f"{_shown(url)}: HTTP {r.status}")
        if self._pace is not None:
            self._pace.new_transfer()
        return r

    def _get(self, url: str, headers: dict[str, str]):
        pool = self._http()
        u3 = self._urllib3
        o = self.options
        try:
            # headers given to request() replace the pool's own (User-Agent, Accept-Encoding): merge them
            return pool.request("GET", url, headers={**pool.headers, **headers}, preload_content=False,
                                decode_content=False, redirect=False,
                                timeout=u3.Timeout(connect=o.connect_timeout, read=o.read_timeout),
                                retries=u3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=0))
        except u3.exceptions.MaxRetryError as e:
            raise _Transient(f"{_shown(url)}: {_reason(e.reason)}") from e
        except (u3.exceptions.HTTPError, OSError) as e:
            raise _Transient(f"{_shown(url)}: {_reason(e)}") from e

    def _read_errors(self):
        """The exceptions a body read raises when the connection drops or stalls."""
        u3 = self._urllib3
        return (u3.exceptions.HTTPError, OSError)

    def _tries(self, url: str, attempt: Callable[[], object]):
        """Call ``attempt`` until it returns, pausing after each transient failure."""
        pause = self.options.backoff
        last = None
        self._pace = pace = _Pace(url, self.options, self._clock)
        try:
            for n in range(self.options.retries + 1):
                if n:
                    self._sleep(pause)
                    pause *= 2
                    pace.check_deadline()
                try:
                    return attempt()
                except _Transient as e:
                    last = e
        finally:
            self._pace = None
        raise NnpatchIOError(f"{last} (gave up after {self.options.retries + 1} tries)")

    # --- small files (the manifest) ------------------------------------------------------------

    def read_small(self, location: str, limit: int) -> bytes:
        """At most ``limit + 1`` bytes of a file or URL (the caller refuses a longer one)."""
        if not is_url(location):
            return read_bounded(location, limit)

        def attempt() -> bytes:
            r = self._request(location, {})
            try:
                if r.status != 200:
                    raise NnpatchIOError(f"{_shown(location)}: HTTP {r.status}")
                data = bytearray()
                while len(data) <= limit:
                    try:
                        # read1: what has arrived, so that a server that drips is measured as it drips
                        chunk = r.read1(min(CHUNK, limit + 1 - len(data)))
                    except self._read_errors() as e:
                        raise _Transient(f"{_shown(location)}: {_reason(e)}") from e
                    if not chunk:
                        break
                    data += chunk
                    self._pace.got(len(chunk))
                length = r.headers.get("Content-Length")
                if len(data) <= limit and length is not None and length.isdigit() and int(length) != len(data):
                    raise _Transient(f"{_shown(location)}: got {len(data)} of {length} bytes")
                return bytes(data)
            finally:
                _close(r)

        return self._tries(location, attempt)

    # --- patches ----------------------------------------------------------------------------

    def download(self, url: str, partial: str, size: int, blake3_hex: str,
                 progress: Callable[[int], None] | None = None) -> Download:
        """Bring ``partial`` to exactly the ``size`` bytes at ``url`` whose BLAKE3 is ``blake3_hex``.

        Continues whatever ``partial`` already holds. On success the file is
        complete and proven; on a network failure it is kept, for the next
        run to continue (unless it is still empty); on a refused size or
        digest it is removed.
        """
        stats = Download(partial, size)
        # a symlink, hard link, FIFO or another user's file planted under the partial file's name is
        # discarded, never written through: the download starts afresh (sidefile)
        fd = open_beside(partial, write=True, create=True, what="partial download")
        try:
            try:  # two updaters appending to one partial file would only make garbage
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                fd = -1
                raise NnpatchIOError(f"{partial}: another update is downloading this patch") from e
            return self._download(fd, url, partial, size, blake3_hex, stats, progress)
        except IntegrityError:  # the server's file is not the manifest's: nothing in it is worth resuming
            if fd >= 0 and same_file(partial, fd):
                _unlink(partial)
            raise
        except BaseException:  # kept for the next run to continue, unless there is nothing in it
            if fd >= 0 and os.fstat(fd).st_size == 0 and same_file(partial, fd):
                _unlink(partial)
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    def _download(self, fd: int, url: str, partial: str, size: int, blake3_hex: str, stats: Download,
                  progress) -> Download:
        stats.resumed_from = os.fstat(fd).st_size
        if stats.resumed_from > size:
            os.ftruncate(fd, 0)
            stats.resumed_from = 0
        for fresh in (False, True):
            if fresh:
                os.ftruncate(fd, 0)
                stats.restarts += 1
            self._tries(url, lambda: self._fill(fd, url, size, stats, progress))
            os.fsync(fd)
            actual = hash_fd(fd)
            if digests_equal(actual, blake3_hex):
                return stats
        raise IntegrityError(f"{_shown(url)}: downloaded BLAKE3 {actual} does not match the manifest's "
                             f"{blake3_hex}", what="patch blake3", expected=blake3_hex, actual=actual)

    def _fill(self, fd: int, url: str, size: int, stats: Download, progress) -> None:
        have = os.fstat(fd).st_size
        if have >= size:
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        stats.requests += 1
        r = self._request(url, headers)
        try:
            if r.status == 206 and have:
                start, total = _content_range(r.headers.get("Content-Range"))
                if start != have or (total is not None and total != size):
                    # not the range asked for, or the file changed size under the resume: start over, and
                    # let a whole response (200, its Content-Length) say whether the file is the manifest's
                    os.ftruncate(fd, 0)
                    raise _Transient(f"{_shown(url)}: the server sent bytes {start}- of {total} where bytes "
                                     f"{have}- of {size} were asked for")
            elif r.status == 200:
                length = r.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) != size:
                    raise IntegrityError(f"{_shown(url)}: {length} bytes, the manifest says {size}",
                                         what="patch size", expected=str(size), actual=length)
                if have:  # the server ignores ranges: start over
                    os.ftruncate(fd, 0)
                    have = 0
            elif r.status == 416:  # the partial file does not fit what the server has now
                os.ftruncate(fd, 0)
                raise _Transient(f"{_shown(url)}: HTTP 416 for a resumed download")
            else:
                raise NnpatchIOError(f"{_shown(url)}: HTTP {r.status}")
            os.lseek(fd, have, os.SEEK_SET)
            while have < size:
                try:
                    # read1: what has arrived, so that a connection cut mid-chunk loses nothing already received
                    chunk = r.read1(min(CHUNK, size - have))
                except self._read_errors() as e:
                    raise _Transient(f"{_shown(url)}: {_reason(e)} after {have} of {size} bytes") from e
                if not chunk:
                    break
                _write_all(fd, chunk)  # outside the network's errors: a full disk is no reason to try again
                have += len(chunk)
                stats.received += len(chunk)
                if progress is not None:
                    progress(len(chunk))
                self._pace.got(len(chunk))
            if have < size:
                raise _Transient(f"{_shown(url)}: the connection closed after {have} of {size} bytes")
        finally:
            _close(r)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _origin(url: str) -> tuple[str, str]:
    u = urlsplit(url)
    return u.scheme.lower(), u.netloc.lower()


def _close(r) -> None:
    """Close a response and its connection: one whose body was not read to the end (an error
    page, a cut or a stalled transfer) must never go back to the pool, where the next request
    would read its leftover bytes as a response."""
    with contextlib.suppress(Exception):
        r.close()


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, complete length) of ``Content-Range: bytes A-B/N``; None where absent."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    first = span.partition("-")[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


def _reason(e: BaseException) -> str:
    """One short line for a network error (urllib3's own texts carry object reprs)."""
    name = type(e).__name__
    text = str(e)
    if "timed out" in text.lower() or "Timeout" in name:
        return "timed out"
    if "Connection refused" in text:
        return "connection refused"
    if "ProtocolError" in name or "IncompleteRead" in text or "Connection broken" in text:
        return "connection broken"
    if "NameResolution" in name or "Name or service not known" in text:
        return "cannot resolve host"
    if "SSL" in name or "CERTIFICATE" in text:
        return "TLS error"
    return text.splitlines()[0][:200] if text else name


__all__ = ["CHUNK", "DEFAULT_OPTIONS", "Download", "FetchOptions", "Fetcher", "is_url", "parent",
           "redirect_allowed", "resolve"]
