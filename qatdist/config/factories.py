"""User code named in a config (model.name, data.transform): 'package.module:function', imported
from sys.path, or 'path/to/file.py:function', a file loaded by path (relative to the working
directory), so a model or transform of another codebase needs no PYTHONPATH.

Only the standard library is imported here: `qatdist.config.checks` uses `factory_file` before
launch.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import sysconfig
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from qatdist.config.sections import ConfigError

FORMS = "'package.module:function' or 'path/to/file.py:function'"
# Frames that are not the user's: qatdist's, the standard library's, installed packages'.
_NOT_USER_CODE = tuple(
    {Path(__file__).resolve().parents[1]}
    | {Path(sysconfig.get_path(name)).resolve() for name in ("stdlib", "purelib", "platlib")}
)


def split_spec(spec: str) -> tuple[str, str]:
    """(module or file, function) of a factory spec; ('', '') when it has no ':'. The last ':'
    splits, so a Windows drive letter stays with the path."""
    target, colon, function_name = spec.rpartition(":")
    return (target, function_name) if colon else ("", "")


def factory_file(spec: str) -> Path | None:
    """The file of a 'path/to/file.py:function' spec, None for the module form."""
    target, _ = split_spec(spec)
    return Path(target).expanduser() if target.endswith(".py") else None


def load_factory(spec: str, key: str) -> Callable:
    """The callable `spec` names; a ConfigError naming `key` when it cannot be imported or is
    not callable (a module that fails at import is as bad a setting as a missing one)."""
    target, function_name = split_spec(spec)
    if not target or not function_name:
        raise ConfigError(f"{key}: expected {FORMS}, got {spec!r}")
    file = factory_file(spec)
    try:
        module = _load_file(file, key) if file else importlib.import_module(target)
        factory = getattr(module, function_name)
    except ConfigError:
        raise
    except Exception as e:
        hint = ""
        if isinstance(e, ModuleNotFoundError) and f"{target}.".startswith(f"{e.name}."):
            # the named module itself is not on sys.path (not one it imports)
            file_form = f"path/to/{target.rpartition('.')[2]}.py:{function_name}"
            hint = f"; a file of your own can be named by its path: {file_form!r}"
        raise ConfigError(
            f"{key}: cannot load factory {spec!r}: {describe_error(e)}{hint}"
        ) from None
    if not callable(factory):
        raise ConfigError(f"{key}: {spec!r} is a {type(factory).__name__}, not callable")
    return factory


def _load_file(file: Path, key: str) -> ModuleType:
    """The module of `file`, executed once per process under a name unique to its absolute path
    and kept in sys.modules (dataclasses, pickling by reference and forked DataLoader workers
    find it there). Its folder is not put on sys.path: the file is loaded on its own."""
    path = file.resolve()
    if not path.is_file():
        raise ConfigError(f"{key}: factory file not found: {file} (resolved to {path})")
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    name = f"qatdist_user_{''.join(c if c.isalnum() else '_' for c in path.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a later attempt runs the file again rather than half a module
        raise
    return module


def describe_error(error: BaseException) -> str:
    """'TypeError: message (at file.py:12)': an exception of user code in one line, with the
    innermost frame of the user's own code (when there is one), so a config error still says
    where that code failed."""
    text = (str(error).strip().splitlines() or [""])[0]
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith("<")
        and not any(Path(frame.filename).resolve().is_relative_to(p) for p in _NOT_USER_CODE)
    ]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {text}{where}"
