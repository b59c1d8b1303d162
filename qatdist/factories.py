"""User code named in a config as 'package.module:function' (model.name, data.transform)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from qatdist.config import ConfigError


def load_factory(spec: str, key: str) -> Callable:
    """The callable `spec` names; a ConfigError naming `key` when it cannot be imported or is
    not callable (a module that fails at import is as bad a setting as a missing one)."""
    module_name, _, function_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except Exception as e:
        raise ConfigError(f"{key}: cannot load factory {spec!r}: {type(e).__name__}: {e}") from None
    if not callable(factory):
        raise ConfigError(f"{key}: {spec!r} is a {type(factory).__name__}, not callable")
    return factory
