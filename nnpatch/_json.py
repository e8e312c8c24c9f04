"""Strict JSON for every parser of untrusted JSON in nnpatch (safetensors headers, indexes, manifests)."""

from __future__ import annotations

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

_SCAN_PIECE = 1 << 20
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

    def __init__(self, raw) -> None:
        self.deepest = self.values = 0
        self.long: list[tuple[int, int]] = []  # (start, end) of the strings' bytes longer than ``threshold``
        self.raw = raw
        self._depth = 0
        self._walked = 0

    def _count_outside(self, outside) -> None:
        if not len(outside):
            return
        opens = (outside == 91) | (outside == 123)
        step = opens.astype(np.int32) - ((outside == 93) | (outside == 125))
        level = np.cumsum(step, dtype=np.int64) + self._depth
        self.deepest = max(self.deepest, int(level.max()))
        self._depth = int(level[-1])
        self.values += int(opens.sum()) + int(np.count_nonzero(outside == 44))

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
            self._count_outside(part[~inside])
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
                self._count_outside(data[at : at + _SCAN_PIECE])
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


def load_object(raw: bytes, *, limit: int, what: str, max_string: int = MAX_JSON_STRING) -> dict:
    """``raw`` as one JSON object: at most ``limit`` bytes, strict JSON (:func:`loads_strict`), and
    an object at the top. The one rule for every small JSON document nnpatch reads whole (release
    manifests and their envelopes, the update state, shard indexes). Every failure is a
    ValueError whose message names ``what``, for the caller to raise as its own error. ``max_string``:
    the longest string allowed (a DSSE envelope's payload is the one that may be longer)."""
    if len(raw) > limit:
        raise ValueError(f"{what} of {len(raw)} bytes exceeds the {limit} limit")
    try:
        obj = loads_strict(raw, max_string=max_string)
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
