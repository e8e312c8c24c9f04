"""nnpatch._json.Pieces (JSON over 1 MiB read a piece at a time, SECURITY.md "Memory") gives the
answers of loads_strict: the same verdict on every document, valid or broken, and the same values
where it builds them. Pieces of 64 bytes here, so that every run boundary, long child and long
member path is taken on small documents."""

from __future__ import annotations

import json
import random

import pytest

from nnpatch import _json


class _Every:
    def __contains__(self, key) -> bool:
        return True


def _built(value):
    if isinstance(value, _json.LazyArray):
        return [_built(v) for v in value]
    if isinstance(value, dict):
        return {k: _built(v) for k, v in value.items()}
    return value


def _both(raw: bytes):
    try:
        expected = ("ok", _json.loads_strict(raw))
    except ValueError:
        expected = ("refused", None)
    try:
        doc = _json.Pieces(raw)
        doc.check()
        got = ("ok", doc.value(*doc.top(), keep=_Every(), lazy=_Every(), checked=True))
    except ValueError:
        got = ("refused", None)
    return expected, got


def _document(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 2 or r < 0.35:
        return rng.choice([0, 1.5, "s", "é😀", True, None, "x" * rng.randint(0, 100), -3, "\\u00e9"])
    if r < 0.65:
        return [_document(rng, depth + 1) for _ in range(rng.randint(0, 12))]
    return {f"k{rng.randint(0, 30)}": _document(rng, depth + 1) for _ in range(rng.randint(0, 12))}


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(_json, "PIECE", 64)


def test_same_verdicts_as_loads_strict(small_pieces):
    rng = random.Random(28)
    for _ in range(400):
        shallow = rng.random() < 0.3
        doc = ({"a": rng.choice([1, "s", {}]), "b": [{"k": rng.choice([1, "xx", {"z": None}])}
                                                      for _ in range(rng.randint(0, 40))]}
               if shallow else {"a": _document(rng), "b": [_document(rng) for _ in range(rng.randint(0, 20))]})
        raw = json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1])).encode()
        if rng.random() < 0.5:  # one byte deleted, doubled or inserted
            k = rng.randrange(len(raw))
            op = rng.choice(["del", "dup", "ins"])
            raw = (raw[:k] + raw[k + 1:] if op == "del" else raw[:k] + raw[k:k + 1] + raw[k:] if op == "dup"
                   else raw[:k] + rng.choice([b",", b"]", b"}", b"{", b"[", b'"', b":", b" ", b"\\", b"NaN"]) + raw[k:])
        try:
            raw.decode()
        except UnicodeDecodeError:
            continue
        expected, got = _both(raw)
        assert expected[0] == got[0], raw
        if expected[0] == "ok" and shallow:
            assert _built(got[1]) == expected[1], raw


@pytest.mark.parametrize("raw", [
    b'{"a":[' + b",".join(b'{"k%d":0}' % i for i in range(100)) + b"]," + b",".join(
        b'"k%d":%d' % (i, i) for i in range(200)) + b',"k5":1}',  # a duplicate key in another run
    b'{"a":[1,2,3,],"b":' + b"0," * 100 + b"0}",  # a trailing comma
    b'{"a":' + b'"' + b"a" * 200 + b'"' + b',"b":NaN}',
    b'{"a":[' + b'"\\ud800",' * 30 + b"0]}",  # lone surrogates
    b'{"a":' + b"[" * 10 + b"]" * 9 + b"}",
    b'{"a":1} {"b":2}' + b" " * 100,
])
def test_refusals_across_runs(small_pieces, raw):
    expected, got = _both(raw)
    assert expected[0] == got[0] == "refused"


def test_long_member_keys_are_read_exactly(small_pieces):
    raw = (b'{"x-\\"q\\"":' + b"[" + b"1," * 200 + b"1]," + b'"a\\\\":{"b":' + b'"' + b"z" * 300 + b'"}}')
    expected, got = _both(raw)
    assert expected[0] == "ok" and got[0] == "ok"
    assert _built(got[1])['a\\'] == expected[1]['a\\']


def test_utf8_error_names_the_byte():
    raw = b"a" * 300_000 + "é".encode()[:1] + b"b" * 10
    assert _json.utf8_error(raw).start == 300_000
    assert _json.utf8_error(b"ok \xf0\x9f\x98\x80") is None
    assert _json.utf8_error(b"ab\xc3").start == 2
