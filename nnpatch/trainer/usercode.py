"""The user's code behind ``--model`` and ``--data``: finding it, calling it, and reporting its failures.

A SPEC is ``module.path:name`` or ``path/to/file.py:name``.  A module path is
looked up from the working directory first (as ``python -m`` does), so
``--model mymodel:build`` works from the folder that holds ``mymodel.py``; a
file's own folder goes on the import path too, so that it can import its
neighbours.  ``name`` is called with no arguments when it is callable and not
already an ``nn.Module``.

Two kinds of failure, two exit codes:

* the SPEC names nothing (no colon, no such file or module, no such name):
  :class:`~nnpatch.errors.UsageError`, exit 2;
* the code it names raises (on import, on the call, while reading a batch, in
  the model's forward) or gives something else than the contract asks:
  :class:`~nnpatch.errors.UserCodeError`, exit 6.  The message is one line: the
  SPEC, the exception's type and first line, and the innermost line of the
  user's own code that raised it; ``nnpatch --debug`` shows the traceback.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import NnpatchError, UsageError, UserCodeError

__all__ = ["load_spec", "describe", "user_code"]

_FORMS = "module.path:callable or path/to/file.py:callable"


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message (at file:line)``, the line being the innermost frame of
    code that is neither Python's, an installed package's nor nnpatch's (omitted if there is none)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    where = _user_frame(exc)
    return f"{type(exc).__name__}{': ' + text if text else ''}{f' (at {where})' if where else ''}"


def _not_users() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs.add(str(Path(__file__).resolve().parent.parent))  # nnpatch itself
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)


def _user_frame(exc: BaseException) -> str | None:
    skip = _not_users()
    found = None
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not name.startswith("<") and not os.path.realpath(name).startswith(skip):
            found = (name, tb.tb_lineno)
        tb = tb.tb_next
    if found is None:
        return None
    name, line = found
    try:
        rel = os.path.relpath(name)
        name = rel if not rel.startswith("..") else name
    except ValueError:  # another drive (Windows)
        pass
    return f"{name}:{line}"


@contextmanager
def user_code(what: str) -> Iterator[None]:
    """Turn an exception raised inside (``what`` names the code) into one :class:`UserCodeError` line."""
    try:
        yield
    except NnpatchError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code: any failure is reported the same way
        raise UserCodeError(f"{what} raised {describe(exc)}") from exc


def _on_import_path(folder: str) -> None:
    folder = os.path.realpath(folder)
    here = os.path.realpath(os.getcwd())
    present = {os.path.realpath(p) if p else here for p in sys.path}
    if folder not in present:
        sys.path.insert(0, folder)
    importlib.invalidate_caches()


def _is_file_spec(mod_part: str) -> bool:
    return mod_part.endswith(".py") or os.sep in mod_part or "/" in mod_part


def load_spec(spec: str, what: str) -> Any:
    """The object ``spec`` names (``what``: the option, e.g. ``--model``), called if it is a plain callable."""
    mod_part, _, name = spec.rpartition(":")
    if not mod_part or not name or not name.isidentifier():
        raise UsageError(f"{what} {spec!r}: expected {_FORMS}")
    label = f"{what} {spec}"
    if _is_file_spec(mod_part):
        path = Path(mod_part)
        if not path.is_file():
            raise UsageError(f"{label}: no such file {mod_part}")
        _on_import_path(str(path.resolve().parent))
        with user_code(f"{label}: importing {mod_part}"):
            module = _import_file(path)
    else:
        _on_import_path(os.getcwd())
        try:
            module = importlib.import_module(mod_part)
        except ModuleNotFoundError as exc:
            if exc.name and (mod_part == exc.name or mod_part.startswith(exc.name + ".")):
                first = mod_part.split(".")[0]
                raise UsageError(
                    f"{label}: no module named {exc.name!r} in the working directory ({os.getcwd()}) or on the "
                    f"import path; run from the folder that holds {first}.py, add that folder to PYTHONPATH, "
                    f"or name the file: path/to/{mod_part.split('.')[-1]}.py:{name}") from None
            raise UserCodeError(f"{label}: importing {mod_part} raised {describe(exc)}") from exc
        except NnpatchError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UserCodeError(f"{label}: importing {mod_part} raised {describe(exc)}") from exc
    if not hasattr(module, name):
        raise UsageError(f"{label}: {mod_part} has no attribute {name!r}")
    obj = getattr(module, name)
    if callable(obj) and not isinstance(obj, nn.Module):
        with user_code(f"{label}: calling {name}()"):
            obj = obj()
    return obj


def _import_file(path: Path) -> Any:
    """``path`` run afresh as a module of its own (a name that cannot clash with another module of the
    same stem)."""
    mod_name = f"_nnpatch_spec_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec_obj = importlib.util.spec_from_file_location(mod_name, path)
    if spec_obj is None or spec_obj.loader is None:
        raise UsageError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[mod_name] = module
    try:
        spec_obj.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return module
