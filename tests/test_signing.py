"""Signed patches: keygen, sign at diff time or later, verify and refuse."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import nnpatch
from nnpatch.cli import cli
from nnpatch.errors import IntegrityError, PatchFormatError
from nnpatch.patchfile import FLAG_SIGNED, SIGNATURE_BLOCK_SIZE, parse_patch
from nnpatch.signing import generate_keypair, sign_patch, verify_signature

from .conftest import read

pytest.importorskip("cryptography")


@pytest.fixture
def keys(tmp_path):
    generate_keypair(str(tmp_path / "k.pem"), str(tmp_path / "k.pub.pem"))
    generate_keypair(str(tmp_path / "o.pem"), str(tmp_path / "o.pub.pem"))
    return tmp_path


def test_sign_at_diff_time_equals_signing_later(tmp_path, pair, keys):
    base, target = pair()
    nnpatch.diff(base, target, tmp_path / "a.nnpatch", sign_key=keys / "k.pem")
    nnpatch.diff(base, target, tmp_path / "b.nnpatch")
    unsigned = read(tmp_path / "b.nnpatch")
    sign_patch(str(tmp_path / "b.nnpatch"), str(keys / "k.pem"))
    signed = read(tmp_path / "a.nnpatch")
    assert read(tmp_path / "b.nnpatch") == signed  # Ed25519 is deterministic
    assert len(signed) == len(unsigned) + SIGNATURE_BLOCK_SIZE
    assert parse_patch(signed).flags & FLAG_SIGNED
    with nnpatch.read_patch(tmp_path / "a.nnpatch") as p:
        verify_signature(p, str(keys / "k.pub.pem"))
    out = tmp_path / "out.safetensors"
    nnpatch.apply(base, tmp_path / "a.nnpatch", out)
    assert read(out) == read(target)


def test_refusals(tmp_path, pair, keys):
    base, target = pair()
    nnpatch.diff(base, target, tmp_path / "s.nnpatch", sign_key=keys / "k.pem")
    nnpatch.diff(base, target, tmp_path / "u.nnpatch")
    with nnpatch.read_patch(tmp_path / "s.nnpatch") as p, pytest.raises(IntegrityError, match="expected key"):
        verify_signature(p, str(keys / "o.pub.pem"))
    with nnpatch.read_patch(tmp_path / "u.nnpatch") as p, pytest.raises(IntegrityError, match="not signed"):
        verify_signature(p, str(keys / "k.pub.pem"))
    data = bytearray(read(tmp_path / "s.nnpatch"))
    data[-1] ^= 1  # the signature itself
    (tmp_path / "bad.nnpatch").write_bytes(bytes(data))
    with nnpatch.read_patch(tmp_path / "bad.nnpatch") as p, pytest.raises(IntegrityError, match="does not verify"):
        verify_signature(p, str(keys / "k.pub.pem"))
    data = read(tmp_path / "s.nnpatch")[:-1]  # a truncated signature block breaks the trailer
    with pytest.raises(PatchFormatError):
        parse_patch(data)


def test_cli(tmp_path, pair):
    runner = CliRunner()
    base, target = pair()
    r = runner.invoke(cli, ["keygen", "-o", str(tmp_path / "key")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600
    r = runner.invoke(cli, ["keygen", "-o", str(tmp_path / "key")])
    assert r.exit_code == 2 and "already exists" in r.stderr
    patch = str(tmp_path / "p.nnpatch")
    assert runner.invoke(cli, ["diff", base, target, "-o", patch, "--no-stat"]).exit_code == 0
    r = runner.invoke(cli, ["verify", patch, "--key", str(tmp_path / "key.pub.pem")])
    assert r.exit_code == 4 and r.stderr.startswith("Error: ") and "not signed" in r.stderr  # as apply --key
    assert runner.invoke(cli, ["sign", patch, "--key", str(tmp_path / "key.pem")]).exit_code == 0
    r = runner.invoke(cli, ["verify", patch, "--key", str(tmp_path / "key.pub.pem")])
    assert r.exit_code == 0 and "signature: OK" in r.stdout
    r = runner.invoke(cli, ["sign", patch, "--key", str(tmp_path / "key.pub.pem")])
    assert r.exit_code == 3 and r.stderr.startswith("Error: ")


def test_apply_with_key(tmp_path, pair, keys):
    base, target = pair()
    runner = CliRunner()
    signed, unsigned = str(tmp_path / "s.nnpatch"), str(tmp_path / "u.nnpatch")
    nnpatch.diff(base, target, signed, sign_key=keys / "k.pem")
    nnpatch.diff(base, target, unsigned)
    out = tmp_path / "out.safetensors"
    r = runner.invoke(cli, ["apply", base, signed, "-o", str(out), "--key", str(keys / "k.pub.pem")])
    assert r.exit_code == 0, r.output
    assert read(out) == read(target)
    out.unlink()
    for patch, pub, why in ((unsigned, "k", "not signed"), (signed, "o", "expected key")):
        r = runner.invoke(cli, ["apply", base, patch, "-o", str(out), "--key", str(keys / f"{pub}.pub.pem")])
        assert r.exit_code == 4 and why in r.stderr and not out.exists()
    with pytest.raises(IntegrityError):
        nnpatch.apply(base, unsigned, out, key=keys / "k.pub.pem")
    model = tmp_path / "model.safetensors"
    model.write_bytes(read(base))
    r = runner.invoke(cli, ["apply", "--in-place", str(model), unsigned, "--key", str(keys / "k.pub.pem")])
    assert r.exit_code == 4 and read(model) == read(base)


def test_signed_patch_from_stdin(tmp_path, pair, keys):
    import subprocess
    import sys

    base, target = pair()
    signed = tmp_path / "s.nnpatch"
    nnpatch.diff(base, target, signed, sign_key=keys / "k.pem")
    out = tmp_path / "out.safetensors"
    p = subprocess.run([sys.executable, "-m", "nnpatch", "apply", base, "-", "-o", str(out), "--key",
                        str(keys / "k.pub.pem")], input=read(signed), capture_output=True)
    assert p.returncode == 0, p.stderr
    assert read(out) == read(target)


def test_a_trusted_key_is_read_once_from_a_file_pem_text_or_bytes(tmp_path, pair, keys):
    from nnpatch.signing import TrustedKey, authenticator, key_id

    pem = (keys / "k.pub.pem").read_bytes()
    loaded = [TrustedKey.from_file(keys / "k.pub.pem"), TrustedKey.from_pem(pem), TrustedKey.from_pem(pem.decode()),
              TrustedKey.from_file(keys / "k.pem")]  # a private key file names its public key
    assert len({k.key_id for k in loaded}) == 1 and all(k.raw == loaded[0].raw for k in loaded)
    assert loaded[0].key_id == key_id(loaded[0].raw) and TrustedKey.of(loaded[0]) is loaded[0]
    with pytest.raises(PatchFormatError, match="not a PEM Ed25519 public key"):
        TrustedKey.from_pem(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    base, target = pair()
    nnpatch.diff(base, target, tmp_path / "s.nnpatch", sign_key=keys / "k.pem")
    for k in loaded:
        with nnpatch.read_patch(tmp_path / "s.nnpatch", authenticate=authenticator(k)) as p:
            assert verify_signature(p, k) == k.key_id
    other = TrustedKey.from_file(keys / "o.pub.pem")
    with pytest.raises(IntegrityError, match="expected key"):
        nnpatch.read_patch(tmp_path / "s.nnpatch", authenticate=authenticator(other))
    assert not other.verifies(b"\0" * 64, b"message") and not other.signed(loaded[0].raw)
