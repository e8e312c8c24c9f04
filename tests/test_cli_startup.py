"""Start-up of the CLI: a command imports only what it uses.

Behaviour, not timing: after ``nnpatch --version`` or ``nnpatch hash FILE``
(in a fresh interpreter) the heavy modules are not loaded at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("numpy", "zstandard", "nnpatch.applier", "nnpatch.differ", "nnpatch.patchfile", "nnpatch.kernel", "torch")

# Runs the CLI in-process (as the console script does) and reports what got imported.
PROBE = """
import json, sys
import nnpatch.cli
heavy = {heavy!r}
code = 0
try:
    nnpatch.cli.cli(sys.argv[1:], prog_name="nnpatch")
except SystemExit as e:
    code = e.code or 0
print(json.dumps({{"code": code, "loaded": [m for m in heavy if m in sys.modules]}}), file=sys.stderr)
"""


def _run(*args, env=None):
    r = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                       env=env)
    report = json.loads(r.stderr.strip().splitlines()[-1])
    return r.stdout, report["code"], report["loaded"]


def test_version_imports_nothing_heavy():
    out, code, loaded = _run("--version")
    assert code == 0 and out.startswith("nnpatch ") and loaded == []


def test_hash_imports_nothing_heavy(tmp_path):
    f = tmp_path / "small.bin"
    f.write_bytes(b"nnpatch" * 100)
    out, code, loaded = _run("hash", str(f))
    assert code == 0 and loaded == []
    from nnpatch.hashing import hash_file

    assert out == f"{hash_file(f)}  {f}\n"


def test_import_nnpatch_is_light():
    code = f"import sys, nnpatch; print([m for m in {HEAVY!r} if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_public_names_load_on_demand():
    code = ("import nnpatch; from nnpatch import apply, diff, PatchFormatError, FORMAT_VERSION; "
            "import nnpatch.applier, nnpatch.differ; "
            "assert apply is nnpatch.applier.apply and diff is nnpatch.differ.diff; "
            "assert set(nnpatch.__all__) <= set(dir(nnpatch)); "
            "print(all(hasattr(nnpatch, n) for n in nnpatch.__all__))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "True", r.stderr
    with pytest.raises(AttributeError):
        import nnpatch

        nnpatch.no_such_name  # noqa: B018


def test_version_text_matches_the_modules():
    """The cheap --version reports what nnpatch.patchfile and nnpatch.kernel say."""
    from nnpatch import cli, kernel
    from nnpatch.patchfile import FORMAT_VERSION

    assert cli._FORMAT_VERSION == FORMAT_VERSION
    fmt = ".".join(map(str, FORMAT_VERSION))
    assert cli._version_text() == f"nnpatch {nnpatch_version()} (format {fmt}, kernel {kernel.backend})"


def nnpatch_version() -> str:
    import nnpatch

    return nnpatch.__version__


@pytest.mark.parametrize("choice", [None, "auto", "c", "numpy", " NumPy ", ""])
def test_version_kernel_matches_the_kernel_module(choice):
    """Without nnpatch.kernel loaded, --version names the backend the module would pick."""
    env = dict(os.environ)
    env.pop("NNPATCH_KERNEL", None)
    if choice is not None:
        env["NNPATCH_KERNEL"] = choice
    out, code, _ = _run("--version", env=env)
    real = subprocess.run([sys.executable, "-c", "import nnpatch.kernel as k; print(k.backend)"],
                          capture_output=True, text=True, env=env)
    if real.returncode:  # "c" on an install without the extension: both refuse
        assert code != 0
        return
    assert code == 0 and out.rstrip().endswith(f"kernel {real.stdout.strip()})")


def test_bad_kernel_choice_fails_as_the_module_does():
    env = dict(os.environ, NNPATCH_KERNEL="fortran")
    r = subprocess.run([sys.executable, "-m", "nnpatch", "--version"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "NNPATCH_KERNEL='fortran'" in r.stderr


def test_help_lists_every_command():
    from click.testing import CliRunner

    from nnpatch.cli import cli

    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    for name in ("apply", "demo", "diff", "hash", "keygen", "recover", "release", "revert", "show", "sign",
                 "textconv", "update", "verify", "train-sparse"):
        assert f"  {name} " in r.output, name


def test_one_handler_for_every_command(tmp_path):
    """Errors from lazily loaded commands still go through the group's handler: one line, exit code."""
    from click.testing import CliRunner

    from nnpatch.cli import cli

    missing = str(tmp_path / "missing")
    for args, code in ((["show", missing], 5), (["verify", missing], 5), (["hash", "--tensors", missing], 5)):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == code, (args, r.output)
        assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.output


def test_missing_trainer_leaves_train_sparse_out(monkeypatch):
    """As before the lazy group: where nnpatch.trainer does not import, there is no such command."""
    import builtins

    from click.testing import CliRunner

    from nnpatch import cli as cli_module

    real = builtins.__import__

    def no_trainer(name, globals=None, locals=None, fromlist=(), level=0):
        if name.startswith("nnpatch.trainer"):
            raise ImportError(name)
        return real(name, globals, locals, fromlist, level)

    group = cli_module.cli
    monkeypatch.setattr(group, "commands", {})
    # an install without the trainer never had the command's module: an earlier test may have loaded it
    monkeypatch.delitem(sys.modules, "nnpatch.cli.train_sparse", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_trainer)
    assert "train-sparse" not in group.list_commands(None)
    r = CliRunner().invoke(group, ["train-sparse", "--help"])
    assert r.exit_code == 2 and "No such command 'train-sparse'" in r.output


def test_the_public_api_is_listed_once():
    """``nnpatch._EXPORTS`` is the list; ``__all__`` is made from it and the TYPE_CHECKING imports
    (what type checkers see) name exactly its names, each from its module."""
    import ast

    import nnpatch

    assert nnpatch.__all__ == ["__version__", *nnpatch._EXPORTS]
    with open(nnpatch.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    block = next(n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test))
    typed = {a.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert typed == nnpatch._EXPORTS
