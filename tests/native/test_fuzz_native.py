"""A short bounded libFuzzer run of each native harness (native/fuzz/), seeded with the
spec's vectors: `make fuzz-native` runs them for FUZZ_SECONDS (10 minutes) in all; here
each gets NNP_FUZZ_TEST_SECONDS (10 s), so a regression the fuzzer finds at once fails
`make test`. A finding fails the test with the sanitizer's report and the input's path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import BUILD, ROOT, make, require_tool

SECONDS = int(os.environ.get("NNP_FUZZ_TEST_SECONDS", "10"))
HARNESSES = ["check", "apply", "journal", "json", "feed"]


@pytest.fixture(scope="session")
def fuzz_build():
    require_tool("clang")
    ok, log = make("native-fuzz")
    if not ok:
        pytest.fail(f"`make native-fuzz` failed:\n{log[-6000:]}", pytrace=False)
    return BUILD / "native-fuzz"


@pytest.fixture(scope="session")
def seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz-seeds")
    subprocess.run([sys.executable, str(ROOT / "native" / "fuzz" / "seeds.py"), str(out)], check=True,
                   capture_output=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("harness", HARNESSES)
def test_fuzz_bounded(fuzz_build, seeds, harness, tmp_path):
    binary = fuzz_build / f"fuzz_{harness}"
    assert binary.is_file(), f"{binary} was not built"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    r = subprocess.run([str(binary), f"-max_total_time={SECONDS}", "-timeout=20", "-rss_limit_mb=2048",
                        "-max_len=65536", f"-artifact_prefix={artifacts}/", "-print_final_stats=1",
                        str(corpus), str(seeds / harness)],
                       capture_output=True, text=True, timeout=SECONDS + 120,
                       env=dict(os.environ, NNP_FUZZ_ROOT=str(ROOT)))
    execs = [line.split()[-1] for line in r.stderr.splitlines() if line.startswith("stat::number_of_executed_units")]
    print(f"fuzz_{harness}: {execs[-1] if execs else '?'} executions in {SECONDS}s")
    found = sorted(p.name for p in artifacts.iterdir())
    assert r.returncode == 0 and not found, (
        f"fuzz_{harness} found something (rc {r.returncode}); inputs {found} in {artifacts}:\n{r.stderr[-8000:]}")
    assert execs and int(execs[-1]) > 0, r.stderr[-4000:]
