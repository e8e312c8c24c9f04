"""Strict JSON for every parser of untrusted JSON in nnpatch (safetensors headers, indexes, manifests);
JSON over 1 MiB (patch, journal and safetensors headers) read a piece at a time (:class:`Pieces`), so
that memory stays within SECURITY.md's bound whatever the input."""

from __future__ import annotations

import codecs
import json
import os

import numpy as np

from .errors import NnpatchIOError


def reject_duplicates(pairs):
    """``object_pairs_hook`` that refuses duplicate keys (json.loads keeps the last one silently)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def reject_constant(name):
    """``parse_constant`` that refuses NaN and Infinity, which RFC 8259 does not define."""
    raise ValueError(f"{name} is not allowed")


#: The longest string any JSON nnpatch reads may hold, decoded, in UTF-8 bytes (SECURITY.md, "Limits"):
#: names, paths, digests and metadata fit with room to spare, and it keeps a parse within a phone's memory.
#: The one exemption is a DSSE envelope's ``payload`` (the whole manifest, base64; spec/MANIFEST.md).
MAX_JSON_STRING = 1 << 20

_SCAN_PIECE = 1 << 18  # a dozen arrays of 8 bytes a byte each: about 20 MB at the peak
_FEW_QUOTES = 4096  # a piece with more quotes than this drops its short strings before the loop
#: Strings walked one by one in text that has backslashes outside strings (so is no JSON) before the
#: scan gives up and calls it invalid: small texts get the exact answer native/src/json.c gives, and
#: 64 MiB of such junk costs no more than valid JSON does.
_WALK_LIMIT = 1 << 16


def loads_strict(raw: bytes, *, max_string: int | None = MAX_JSON_STRING):
    """UTF-8 JSON without duplicate keys, no string over ``max_string`` bytes (None: the caller
    checked); every failure is a ValueError for the caller to name."""
    if max_string is not None:
        check_strings(raw, max_string)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(str(e)) from e
    return loads_text(text, max_string=None)


def loads_text(text: str, *, max_string: int | None = MAX_JSON_STRING):
    """Decoded JSON text under the rules of loads_strict: no duplicate keys, no NaN or Infinity,
    no lone surrogate (``"\\ud800"``: valid JSON syntax, but not Unicode text), no string longer
    than ``max_string`` (None: the caller checked the bytes already)."""
    if max_string is not None:
        check_strings(text.encode("utf-8", "surrogatepass"), max_string)
    try:
        obj = json.loads(text, object_pairs_hook=reject_duplicates, parse_constant=reject_constant)
    except RecursionError as e:
        raise ValueError(str(e) or type(e).__name__) from e
    if "\\u" in text:  # only an escape can smuggle in a lone surrogate, which no UTF-8 text holds
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError("a string holds a lone surrogate (\\uD800-\\uDFFF escape), which is not "
                             "Unicode text") from e
    return obj


class _Scan:
    """One linear pass over JSON bytes, in pieces of a MiB (a few MB of memory whatever the input):
    where its strings lie, and, outside them, the bracket nesting and the number of values. No
    regular expression: backtracking over a long string is what made a 53 MB header cost gigabytes.

    Strings are what the pattern ``"(?:[^"\\\\]|\\\\.)*"`` finds, scanning left to right (native/src/json.c's
    shape() does the same, byte by byte): a quote outside a string opens one, whatever precedes it;
    inside, the first quote not escaped (an even run of backslashes before it) closes it; a quote
    with no closing quote after it opens nothing, and neither does any later one."""

    def __init__(self, raw, *, mark: bool = False) -> None:
        self.deepest = self.values = 0
        self.long: list[tuple[int, int]] = []  # (start, end) of the strings' bytes longer than ``threshold``
        self.raw = raw
        self._depth = 0
        self._walked = 0
        # with ``mark``: the commas between the outermost container's children, and where it closes
        self._mark = mark
        self._commas: list[np.ndarray] = []
        self.end = -1  # offset of the outermost container's closing bracket (-1: none)

    @property
    def commas(self) -> np.ndarray:
        """Offsets of the commas that separate the outermost container's children (``mark``)."""
        out = np.concatenate(self._commas) if self._commas else np.zeros(0, dtype=np.int32)
        return out[out < self.end] if self.end >= 0 else out

    def _count_outside(self, outside, where) -> None:
        if not len(outside):
            return
        opens = (outside == 91) | (outside == 123)
        closes = (outside == 93) | (outside == 125)
        step = opens.astype(np.int32) - closes
        level = np.cumsum(step, dtype=np.int64) + self._depth
        self.deepest = max(self.deepest, int(level.max()))
        self._depth = int(level[-1])
        self.values += int(opens.sum()) + int(np.count_nonzero(outside == 44))
        if self._mark:
            at_one = level == 1
            commas = where[at_one & (outside == 44)]
            if len(commas):  # int32 where offsets fit: 4,194,304 children cost 16 MB, not 32
                self._commas.append(commas.astype(np.int32 if len(self.raw) < 1 << 31 else np.int64))
            if self.end < 0:
                shut = np.flatnonzero(closes & (level <= 0))
                if len(shut):
                    self.end = int(where[shut[0]])

    def run(self, threshold: int) -> _Scan:
        data = np.frombuffer(self.raw, dtype=np.uint8)
        in_string = False
        opened = -1  # offset of the open string's first byte
        backslashes = 0  # backslashes that end the previous piece
        for at in range(0, len(data), _SCAN_PIECE):
            part = data[at : at + _SCAN_PIECE]
            n = len(part)
            idx = np.arange(n, dtype=np.int64)
            # for each byte, the run of backslashes right before it (carried over from the previous piece)
            last = np.maximum.accumulate(np.where(part == 92, -1, idx))
            before = np.empty(n, dtype=np.int64)
            before[0] = backslashes
            before[1:] = idx[:-1] - last[:-1]
            before[1:][last[:-1] < 0] += backslashes
            backslashes = int(n - 1 - last[-1]) + (backslashes if last[-1] < 0 else 0)
            quotes = np.flatnonzero(part == 34)
            plain = before[quotes] % 2 == 0  # a quote that can close a string
            toggles = self._toggles(quotes, plain, in_string, at)
            # inside[i]: byte i lies inside a string (its quotes count as inside, which changes no count)
            flips = np.zeros(n, dtype=np.int8)
            flips[toggles] = 1
            inside = (np.cumsum(flips, dtype=np.int64) + (1 if in_string else 0)) % 2 == 1
            inside[toggles] = True
            out_at = np.flatnonzero(~inside)
            self._count_outside(part[out_at], out_at + at)
            del out_at
            toggles += at
            visit = toggles.tolist() if len(toggles) <= _FEW_QUOTES else self._long_only(toggles, in_string,
                                                                                          threshold)
            for q in visit:
                if in_string:
                    if q - opened > threshold:
                        self.long.append((opened, q))
                    in_string = False
                else:
                    opened = q + 1
                    in_string = True
            del idx, last, before, flips, inside
        if in_string:
            # no closing quote: the quote that opened it is no string (nor is any after it), so what
            # follows it is counted as outside strings; it is invalid JSON, but never parse a giant one
            if len(data) - opened > threshold:
                self.long.append((opened, len(data)))
            for at in range(opened, len(data), _SCAN_PIECE):
                piece = data[at : at + _SCAN_PIECE]
                self._count_outside(piece, np.arange(at, at + len(piece), dtype=np.int64))
        return self

    def _toggles(self, quotes, plain, in_string: bool, at: int):
        """The quotes of a piece that open or close a string, in order. Fast path: the plain quotes
        alternate (valid JSON: nothing but a plain quote follows a string's end); when a quote after
        an odd run of backslashes lies outside a string (only invalid JSON has a backslash there),
        the piece is walked string by string, as the pattern does."""
        candidates = quotes[plain]
        flips = np.zeros(len(quotes) + 1, dtype=np.int64)
        pos = np.searchsorted(quotes, candidates)
        flips[pos] = 1
        inside_after = (np.cumsum(flips[:-1]) + (1 if in_string else 0)) % 2 == 1  # state after each quote
        # an escaped-looking quote is fine inside a string (state after it unchanged and inside)
        if not np.any(~plain & ~inside_after):
            return candidates.copy()
        # the walk: outside, the next quote opens; inside, the next plain quote closes
        next_plain = np.full(len(quotes) + 1, len(quotes), dtype=np.int64)
        p = np.flatnonzero(plain)
        next_plain[:-1] = len(quotes)
        order = np.searchsorted(p, np.arange(len(quotes)))
        ok = order < len(p)
        next_plain[:-1][ok] = p[order[ok]]
        out = []
        i, inside = 0, in_string
        while i < len(quotes):
            self._walked += 1
            if self._walked > _WALK_LIMIT:
                raise ValueError(f"a backslash outside a string (near byte {at + int(quotes[i])}), which no JSON "
                                 "holds")
            if not inside:
                out.append(quotes[i])
                inside = True
                i += 1
            else:
                j = int(next_plain[i])
                if j >= len(quotes):
                    break
                out.append(quotes[j])
                inside = False
                i = j + 1
        return np.array(out, dtype=np.int64)

    @staticmethod
    def _long_only(quotes, in_string: bool, threshold: int) -> list[int]:
        """The quotes of a piece with many strings, less the pairs that open and close a short
        string inside it, so that the loop above visits a few (vectorised: 10 Mi escaped quotes
        make many quotes, and this keeps the pass linear and fast)."""
        first = 1 if in_string else 0  # quotes[first::2] open strings, quotes[first+1::2] close them
        opens = quotes[first::2]
        closes = quotes[first + 1 :: 2]
        k = len(closes)
        short = (closes - opens[:k]) - 1 <= threshold
        keep = np.ones(len(quotes), dtype=bool)
        keep[first : first + 2 * k : 2][short] = False
        keep[first + 1 : first + 1 + 2 * k : 2][short] = False
        return quotes[keep].tolist()


#: Nesting and values (opening brackets and commas) of a document :func:`load_object` reads, as
#: native/src/manifest.c's np_load_object: a release manifest lists a few bases (15 values each), a
#: shard index one value per tensor; 524,288 values keep the parse within SECURITY.md's memory bound.
MAX_DOCUMENT_DEPTH = 16
MAX_DOCUMENT_VALUES = 1 << 19


def load_object(raw: bytes, *, limit: int, what: str, max_string: int = MAX_JSON_STRING) -> dict:
    """``raw`` as one JSON object: at most ``limit`` bytes, strict JSON (:func:`loads_strict`),
    nested at most MAX_DOCUMENT_DEPTH deep with at most MAX_DOCUMENT_VALUES values, and an object at
    the top. The one rule for every small JSON document nnpatch reads whole (release manifests and
    their envelopes, the update state, shard indexes). Every failure is a ValueError whose message
    names ``what``, for the caller to raise as its own error. ``max_string``: the longest string
    allowed (a DSSE envelope's payload is the one that may be longer)."""
    if len(raw) > limit:
        raise ValueError(f"{what} of {len(raw)} bytes exceeds the {limit} limit")
    try:
        depth, values = json_shape(raw, max_string=max_string)
        if depth > MAX_DOCUMENT_DEPTH:
            raise ValueError(f"nesting deeper than {MAX_DOCUMENT_DEPTH} levels")
        if values > MAX_DOCUMENT_VALUES:
            raise ValueError(f"more than {MAX_DOCUMENT_VALUES} values")
        obj = loads_strict(raw, max_string=None)
    except ValueError as e:
        raise ValueError(f"invalid {what} JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"invalid {what}: not a JSON object")
    return obj


def check_strings(raw, max_string: int) -> None:
    """Refuse JSON bytes holding a string longer than ``max_string`` bytes once decoded (UTF-8),
    before anything is built from them."""
    _check_long(raw, _Scan(raw).run(max_string).long, max_string)


def _check_long(raw, long: list[tuple[int, int]], max_string: int) -> None:
    """A string's decoded length is at most its stored length and at least a sixth of it
    (``\\u0000``): only strings stored longer than the cap are decoded, alone, and only when they
    are stored in at most six times the cap."""
    for start, end in long:
        if end - start > 6 * max_string + 12:
            raise ValueError(f"a string of {end - start} bytes at byte {start} (the limit is {max_string} bytes)")
        try:
            decoded = len(json.loads(b'"' + bytes(raw[start:end]) + b'"').encode("utf-8", "surrogatepass"))
        except (ValueError, RecursionError):
            decoded = end - start  # not a valid string: counted as stored
        if decoded > max_string:
            raise ValueError(f"a string of {decoded} bytes at byte {start} (the limit is {max_string} bytes)")


def json_shape(raw: bytes, *, max_string: int | None = None) -> tuple[int, int]:
    """(deepest bracket nesting, number of values) of UTF-8 JSON outside its strings, found
    before parsing so that hostile JSON can exhaust neither the parser's recursion nor memory.
    Values are counted as opening brackets and commas; the scan runs in pieces, so it needs a
    few MB whatever the input's size. With ``max_string``, a longer string is a ValueError
    (the same pass: see :func:`check_strings`)."""
    scan = _Scan(raw).run(max_string if max_string is not None else 1 << 62)
    if max_string is not None:
        _check_long(raw, scan.long, max_string)
    return scan.deepest, scan.values


def read_bounded(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most ``limit + 1`` bytes of a file, so a caller can refuse one that is too large without reading it."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise NnpatchIOError(f"{path}: cannot read: {e.strerror or e}") from e


# --- JSON too big to build whole ---------------------------------------------------------------------

#: JSON of at most this many bytes is parsed by one ``json.loads``: whatever it holds, its objects take a
#: few tens of MB. Longer JSON (a patch header of up to 64 MiB, a journal header) is parsed piece by
#: piece (:class:`Pieces`), so that a 4,194,304-value header never exists as Python objects all at once.
WHOLE = 1 << 20
#: The most JSON bytes one ``json.loads`` of :class:`Pieces` reads (one child, if it is longer: a
#: string, which the string cap bounds, or a container, which is walked in turn).
PIECE = 256 << 10
_SPACE = b" \t\r\n"


class Skipped:
    """A value longer than :data:`PIECE` that nobody asked for: checked as strictly as the rest, then
    dropped. Any reader check that wants a string, number, list or object refuses it as the wrong type."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def __repr__(self) -> str:
        return f"<{self.nbytes} bytes of JSON>"


def utf8_error(raw) -> UnicodeDecodeError | None:
    """The first UTF-8 error of ``raw``, its ``start`` counted from the beginning of ``raw``, or None;
    decoded a MiB at a time, never whole (64 MiB of text with one emoji is a 256 MB ``str``)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(raw)
    for at in range(0, len(view), _SCAN_PIECE):
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(view[at : at + _SCAN_PIECE], final=at + _SCAN_PIECE >= len(view))
        except UnicodeDecodeError as e:
            e.start += at - pending
            e.end += at - pending
            return e
    if not len(view):
        return None
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        e.start += len(view) - len(e.object)
        return e
    return None


class Pieces:
    """UTF-8 JSON (checked as such by the caller) parsed a piece at a time under the rules of
    :func:`loads_strict`: the same values, and the same refusals (syntax, duplicate keys in any object,
    NaN and Infinity, lone surrogates, strings over ``max_string``), but never more than :data:`PIECE`
    bytes of it built at once. The caller walks what it needs (:meth:`members`, :meth:`elements`) and
    takes small values whole (:meth:`value`); the rest is checked and dropped.

    The pre-scan (:class:`_Scan`, one linear pass) gives the nesting, the value count and the long
    strings, as :func:`json_shape` does, and the commas between the top container's children. A
    container's children are found by the same scan over its bytes, so a child nested ``d`` deep is
    scanned at most ``d`` times, and the nesting is capped before anything else."""

    def __init__(self, raw, *, max_string: int = MAX_JSON_STRING) -> None:
        raw = memoryview(raw)  # bytes, or a view of a mapped file: nothing here copies more than a piece
        self.raw = raw
        scan = _Scan(raw, mark=True).run(max_string)
        _check_long(raw, scan.long, max_string)
        self.depth, self.values = scan.deepest, scan.values
        self._top = scan
        self.arrays: list[LazyArray] = []  # those made so far

    # -- the top value --------------------------------------------------------------------------------

    def top(self) -> tuple[int, int]:
        """(start, end) of the top value, a container: nothing but whitespace around it."""
        raw, scan = self.raw, self._top
        lo = self._skip(0, len(raw))
        if lo == len(raw) or raw[lo] not in b"{[":
            raise ValueError(f"Expecting value (byte {lo})")
        if scan.end < 0:
            raise ValueError(f"the {'object' if raw[lo] == 123 else 'array'} opened at byte {lo} is never closed")
        extra = self._skip(scan.end + 1, len(raw))
        if extra < len(raw):
            raise ValueError(f"Extra data (byte {extra})")
        return lo, scan.end + 1

    def _skip(self, lo: int, hi: int) -> int:
        """The first byte from ``lo`` on that is no JSON whitespace (``hi`` if none), looked at 4 KiB at a time."""
        while lo < hi:
            part = bytes(self.raw[lo : min(hi, lo + 4096)])
            rest = part.lstrip(_SPACE)
            if rest:
                return lo + len(part) - len(rest)
            lo += len(part)
        return hi

    def _skip_back(self, lo: int, hi: int) -> int:
        """One past the last byte before ``hi`` that is no JSON whitespace (``lo`` if none)."""
        while hi > lo:
            part = bytes(self.raw[max(lo, hi - 4096) : hi])
            rest = part.rstrip(_SPACE)
            if rest:
                return hi - len(part) + len(rest)
            hi -= len(part)
        return lo

    # -- walking containers ---------------------------------------------------------------------------

    def _children(self, lo: int, hi: int) -> np.ndarray | None:
        """The offsets of the commas between the children of the container ``raw[lo:hi]`` (its brackets
        at ``lo`` and ``hi - 1``); None for an empty container."""
        raw = self.raw
        if (raw[lo], raw[hi - 1]) not in ((123, 125), (91, 93)):
            raise ValueError(f"the container at byte {lo} does not close with its own bracket (byte {hi - 1})")
        if hi - 1 == self._top.end:
            commas = self._top.commas
        else:
            scan = _Scan(memoryview(raw)[lo:hi], mark=True).run(1 << 62)
            if scan.end != hi - 1 - lo:
                raise ValueError(f"the container at byte {lo} closes at byte {lo + scan.end}, not {hi - 1}")
            commas = scan.commas if hi < 1 << 31 else scan.commas.astype(np.int64)
            commas += lo
        if not len(commas) and self._skip(lo + 1, hi - 1) == hi - 1:
            return None
        return commas

    _BLOCK = 1 << 16  # children grouped at a time (a few MB of index arrays, whatever their number)

    @classmethod
    def _groups(cls, lo: int, hi: int, commas):
        """(start, end, sizes) for runs of consecutive children of ``raw[lo:hi]`` that begin within the
        same PIECE bytes (so at most twice PIECE together), a child longer than PIECE a run alone;
        sizes: each child's length."""
        if commas is None:
            return
        n = len(commas) + 1
        for at in range(0, n, cls._BLOCK):
            k = min(n, at + cls._BLOCK)
            starts = np.empty(k - at, dtype=np.int64)
            ends = np.empty(k - at, dtype=np.int64)
            starts[0] = lo + 1 if at == 0 else int(commas[at - 1]) + 1
            starts[1:] = commas[at : k - 1] + 1
            ends[:-1] = commas[at : k - 1]
            ends[-1] = hi - 1 if k == n else int(commas[k - 1])
            sizes = ends - starts
            big = sizes > PIECE
            bucket = (starts - starts[0]) // PIECE
            cut = np.ones(k - at, dtype=bool)
            cut[1:] = (bucket[1:] != bucket[:-1]) | big[1:] | big[:-1]
            firsts = np.flatnonzero(cut)
            lasts = np.append(firsts[1:], k - at) - 1
            for f, last in zip(firsts.tolist(), lasts.tolist()):
                yield int(starts[f]), int(ends[last]), sizes[f : last + 1]

    def _load(self, lo: int, hi: int, wrap: str = ""):
        text = str(self.raw[lo:hi], "utf-8")
        if wrap:
            text = wrap[0] + text + wrap[1]
        try:
            return loads_text(text, max_string=None)
        except ValueError as e:
            raise ValueError(f"{e} (in the {hi - lo} bytes from byte {lo})") from e

    def count(self, lo: int, hi: int) -> int:
        """How many children the container ``raw[lo:hi]`` has (its commas counted, nothing parsed)."""
        commas = self._children(lo, hi)
        return 0 if commas is None else len(commas) + 1

    def elements(self, lo: int, hi: int, *, keep=None, commas=False):
        """Each element of the array ``raw[lo:hi]``, in order, as :meth:`value` gives it (``commas``:
        what :meth:`_children` gave for it, when the caller has it)."""
        if self.raw[lo] != 91:
            raise ValueError(f"byte {lo}: expected an array")
        for a, b, sizes in self._groups(lo, hi, self._children(lo, hi) if commas is False else commas):
            if sizes[0] > PIECE:
                yield self.value(a, b, keep=keep)
                continue
            items = self._load(a, b, "[]")
            if len(items) != len(sizes):
                raise ValueError(f"Expecting value (an empty element in the bytes from byte {a})")
            yield from items

    def members(self, lo: int, hi: int, *, keep=None, checked: bool = False):
        """(key, value, bytes) for each member of the object ``raw[lo:hi]``, in order: a value as
        :meth:`value` gives it, or, where ``keep`` is a set, as its span (start, end) when its key is in
        ``keep`` and it is longer than PIECE; bytes: the member's length in the JSON. A key given twice
        is refused once the last member is read (json.loads would have refused it before)."""
        if self.raw[lo] != 123:
            raise ValueError(f"byte {lo}: expected an object")
        commas = self._children(lo, hi)
        hashes = []
        for a, b, sizes in self._groups(lo, hi, commas):
            if sizes[0] > PIECE:
                key, vlo, vhi = self._big_member(a, b)
                hashes.append(np.array([hash(key)], dtype=np.int64))
                if keep is not None and key in keep:
                    yield key, (vlo, vhi), b - a
                else:
                    yield key, Skipped(vhi - vlo) if checked else self.value(vlo, vhi), b - a
                continue
            obj = self._load(a, b, "{}")
            if len(obj) != len(sizes):
                raise ValueError(f"Expecting property name (an empty member in the bytes from byte {a})")
            hashes.append(np.fromiter((hash(k) for k in obj), dtype=np.int64, count=len(obj)))
            for (key, value), size in zip(obj.items(), sizes.tolist()):
                yield key, value, size
        self._unique(np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.int64), lo, hi, commas)

    def _big_member(self, lo: int, hi: int) -> tuple[str, int, int]:
        """A member longer than PIECE: its key (the string that starts it) and its value's span."""
        raw = self.raw
        k = self._skip(lo, hi)
        if k == hi or raw[k] != 34:
            raise ValueError(f"Expecting property name enclosed in double quotes (byte {k})")
        q = k + 1
        while True:  # the key's closing quote: the first not escaped
            q = self._find_quote(q, hi)
            if q < 0:
                raise ValueError(f"Unterminated string starting at byte {k}")
            run = 0
            while raw[q - 1 - run] == 92:
                run += 1
            if run % 2 == 0:
                break
            q += 1
        key = self._load(k, q + 1)
        c = self._skip(q + 1, hi)
        if c == hi or raw[c] != 58:
            raise ValueError(f"Expecting ':' delimiter (byte {c})")
        return key, c + 1, hi

    def _find_quote(self, lo: int, hi: int) -> int:
        while lo < hi:
            part = bytes(self.raw[lo : min(hi, lo + 65536)])
            at = part.find(b'"')
            if at >= 0:
                return lo + at
            lo += len(part)
        return -1

    def _unique(self, hashes: np.ndarray, lo: int, hi: int, commas) -> None:
        """No key twice among an object's members (read in runs: json.loads checked each run's own
        keys). Equal hashes are rare; the keys behind them are compared exactly."""
        h = np.sort(hashes)
        same = h[1:][h[1:] == h[:-1]]
        if not len(same):
            return
        suspects = set(same.tolist())
        seen = set()
        for a, b, sizes in self._groups(lo, hi, commas):
            for key in [self._big_member(a, b)[0]] if sizes[0] > PIECE else self._load(a, b, "{}"):
                if hash(key) in suspects:
                    if key in seen:
                        raise ValueError(f"duplicate key {key!r}")
                    seen.add(key)

    def value(self, lo: int, hi: int, *, keep=None, lazy=frozenset(), checked: bool = False):
        """The value stored in ``raw[lo:hi]`` (whitespace around it allowed). One of at most PIECE bytes
        is built; a longer one is a string (built: the string cap bounds it), an array (each element
        checked, then a :class:`Skipped`) or an object (its members checked, then a :class:`Skipped`).
        With ``keep`` (a set of keys), a long object is built instead, with only the members ``keep``
        names (each as this gives it, with the same arguments), and a long array under one of the keys
        ``lazy`` names becomes a :class:`LazyArray`. ``checked``: the document was read by :meth:`check`,
        so what is not kept is not read again."""
        if hi - lo <= PIECE:
            return self._load(lo, hi)
        a, b = self._strip(lo, hi)
        if a == b or self.raw[a] not in b"{[":
            return self._load(lo, hi)
        if self.raw[a] == 91 or keep is None:
            if not checked:
                for _ in (self.elements(a, b) if self.raw[a] == 91 else self.members(a, b)):
                    pass
            return Skipped(b - a)
        kept = {}
        for key, v, _ in self.members(a, b, keep=keep, checked=checked):
            if key not in keep:
                continue
            if not isinstance(v, tuple):
                kept[key] = v
            elif key in lazy:
                kept[key] = self.lazy(*v, keep=keep)
            else:
                kept[key] = self.value(*v, keep=keep, lazy=lazy, checked=checked)
        return kept

    def span(self, lo: int, hi: int) -> bytes:
        """The bytes of the value in ``raw[lo:hi]``, without the whitespace around it."""
        return bytes(self.raw[slice(*self._strip(lo, hi))])

    def check(self) -> None:
        """Read the whole document once, building nothing: every refusal of :func:`loads_strict`, in
        the order of the bytes, before the caller looks at any value."""
        self.value(*self.top())

    def lazy(self, lo: int, hi: int, *, keep=None) -> LazyArray | Skipped:
        """The array ``raw[lo:hi]`` (whitespace around it allowed), read one element at a time when
        iterated, or, if it is no array, what :meth:`value` gives."""
        a, b = self._strip(lo, hi)
        if a == b or self.raw[a] != 91:
            return self.value(lo, hi, keep=keep)
        return LazyArray(self, a, b, keep)

    def _strip(self, lo: int, hi: int) -> tuple[int, int]:
        lo = self._skip(lo, hi)
        return lo, self._skip_back(lo, hi)


class _EveryKey:
    def __contains__(self, key) -> bool:
        return True


#: ``keep`` for :meth:`Pieces.members` that gives every long member as its span.
EVERY_KEY = _EveryKey()


class LazyArray:
    """A long array of a :class:`Pieces` document (already checked): its length known from its
    commas, its elements built one piece at a time while it is iterated (each as :meth:`Pieces.value`
    gives it, with ``keep``), so that the caller holds what it makes of them and nothing more."""

    def __init__(self, pieces: Pieces, lo: int, hi: int, keep) -> None:
        self._pieces, self._lo, self._hi, self._keep = pieces, lo, hi, keep
        self._commas = pieces._children(lo, hi)  # kept: scanning a 64 MiB array twice costs seconds
        self.read = False  # every element was read (so checked)
        pieces.arrays.append(self)

    def __len__(self) -> int:
        return 0 if self._commas is None else len(self._commas) + 1

    def __iter__(self):
        yield from self._pieces.elements(self._lo, self._hi, keep=self._keep, commas=self._commas)
        self.read = True
