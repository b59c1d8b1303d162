"""Loading a run configuration: TOML file + `--section.key=value` overrides, strict about typos.

Precedence is CLI > file > defaults. Validation (`qatdist.config.checks`) runs here, before any
process group starts, and every error names the offending key.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tomllib
import types
import typing
from pathlib import Path

from qatdist.config.checks import validate
from qatdist.config.sections import DEFAULT_CONFIG, Config, ConfigError


def _field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value, expected):
    """Return `value` as `expected` (int, float, str, bool, list[...]) or raise ConfigError."""
    if isinstance(value, CliValue):
        value = str(value) if expected is str else value.parse()
    origin = typing.get_origin(expected)
    if origin in (list, types.GenericAlias) or expected is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item_type.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {expected.__name__}, got {value!r}")


class CliValue(str):
    """A value typed on the command line, read according to the key's type when coerced: as
    is for string keys (`--runtime.cores=0` is the string "0"), as a TOML literal otherwise
    (`--train.lr=0.1`, `--data.allow_pipe=true`, `--quant.fp32_module_names=['fc']`)."""

    def parse(self):
        try:
            return tomllib.loads(f"v = {self}")["v"]
        except tomllib.TOMLDecodeError:
            return str(self)


def parse_overrides(args: list[str]) -> tuple[str | None, dict[str, dict]]:
    """Split argv into (--config path, {section: {key: value}}) or raise ConfigError."""
    config_path = None
    overrides: dict[str, dict] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{name}: missing value")
            value = args[i + 1]
            i += 1
        if name == "config":
            config_path = value
        else:
            section, dot, key = name.partition(".")
            if not dot or not key:
                raise ConfigError(f"--{name}: expected --section.key=value")
            overrides.setdefault(section, {})[key] = CliValue(value)
        i += 1
    return config_path, overrides


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def from_dict(raw: dict) -> Config:
    """Build a Config from nested dicts; unknown sections/keys and wrong types raise."""
    sections = _field_types(Config)
    built = {}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}]; known: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table, got {values!r}")
        cls = sections[section]
        fields = _field_types(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"unknown config key {section}.{key}; known in [{section}]: "
                    + ", ".join(fields)
                )
            kwargs[key] = _coerce(f"{section}.{key}", value, fields[key])
        built[section] = cls(**kwargs)
    return Config(**built)


def load(config_path: str | None = None, overrides: dict | None = None) -> Config:
    """Defaults < TOML file (configs/default.toml when none is given) < overrides; validated."""
    path = Path(config_path) if config_path else DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            file_values = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None
    cfg = from_dict(_merge(file_values, overrides or {}))
    validate(cfg)
    return cfg


def load_from_argv(argv: list[str]) -> Config:
    config_path, overrides = parse_overrides(argv)
    return load(config_path, overrides)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that `load` reads back to an equal Config."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def help_text() -> str:
    """Every config key with its type, default and help, for `--help`."""
    out = []
    for section_field in dataclasses.fields(Config):
        cls = section_field.default_factory
        out.append(f"[{section_field.name}]")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            hint = _field_types(cls)[f.name]
            type_name = (
                getattr(hint, "__name__", str(hint))
                if typing.get_origin(hint) is None
                else str(hint)
            )
            out.append(f"  --{section_field.name}.{f.name}  ({type_name}, default {default!r})")
            out.append(f"      {f.metadata['help']}")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover - convenience: print the resolved config
    print(to_toml(load_from_argv(sys.argv[1:])))
