"""JOURNAL.md Trust step 2, at most one entry per name, checked in one pass by both implementations:
a planted journal of 200,000 entries whose last repeats the first is refused in seconds (the native
reader compared every pair before: 2 x 10^10 name comparisons), with the same line in both."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from .. import craft
from ..conftest import make_pair, read

ENTRIES = 200_000


def _planted(tmp_path):
    base, _ = make_pair(tmp_path)
    model = tmp_path / "model.safetensors"
    shutil.copyfile(base, model)
    meta = craft.journal_meta(read(model))
    entry = (b'{"base_blake3":"' + b"1" * 64 + b'","count":0,"data_at":0,"index_at":0,"name":"%s","nbytes":0,'
             b'"offset":0,"target_blake3":"' + b"2" * 64 + b'","unit":0}')
    names = [b"t%06d" % i for i in range(ENTRIES)] + [b"t000000"]
    text = craft.canonical(dict(meta, entries=[])).replace(
        b'"entries":[]', b'"entries":[' + b",".join(entry % n for n in names) + b"]", 1)
    journal = tmp_path / "model.safetensors.nnpatch-journal"
    journal.write_bytes(craft.encode_journal(meta, [], raw_header=text))
    return model, journal


def _refused_in_time(cmd, model, journal, env=None):
    before = (read(model), read(journal))
    start = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    took = time.monotonic() - start
    assert r.returncode == 3, r.stderr
    line = r.stderr.strip()
    print(f"{cmd[0]}: refused in {took:.2f} s")
    assert "\n" not in line and "entry 't000000': a second entry for the same tensor" in line, line
    assert (read(model), read(journal)) == before  # nothing written, the journal kept
    assert took < 30, took


def test_a_repeated_name_among_200000_entries_is_found_in_one_pass(native, tmp_path):
    model, journal = _planted(tmp_path)
    _refused_in_time([*native.cmd, "--recover", str(model)], model, journal, env=native.full_env())
    _refused_in_time([sys.executable, "-m", "nnpatch", "recover", str(model)], model, journal)
