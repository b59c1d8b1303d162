"""`model.weights`: a published weight file into the model, as strictly as a state dict allows.

People publish weights in a few layouts: a plain state dict, or one nested under a key of a
training checkpoint (`state_dict`, `model`, `model_state_dict`, `ema`), its names prefixed by the
wrapper that held the model when it was saved (`module.` for DDP, `_orig_mod.` for
torch.compile). `load_weights` finds the state dict of the model among these, loads it strictly
and says what it did; anything else is a ConfigError that lists what the file holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from qatdist.config import ConfigError

log = logging.getLogger(__name__)

NESTING_KEYS = ("state_dict", "model", "model_state_dict", "ema")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 5  # names listed per kind of mismatch: enough to see the pattern, not a wall of keys


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where the loaded weights came from (`weights_source` in the final report)."""

    file: str  # absolute path
    sha256: str
    nesting_key: str | None  # the checkpoint key the state dict sat under; None: top level
    prefix_stripped: str | None  # e.g. "module."; None: names used as saved


@dataclasses.dataclass(frozen=True)
class _Candidate:
    nesting_key: str | None
    prefix: str | None
    state: Mapping


def load_weights(model: torch.nn.Module, path: str, key: str = "model.weights") -> WeightsSource:
    """Load the weight file `path` (torch.save'd or `.safetensors`) into `model` strictly and log
    in one line how. Returns where the weights came from. ConfigError naming `key` (the config key
    that gave `path`) when the file cannot be read or holds no state dict that fits `model`
    exactly."""
    content = _read(path, key)
    if not isinstance(content, Mapping):
        raise ConfigError(
            f"{key}: {path} holds a {type(content).__name__}, not a state dict "
            "(save `model.state_dict()` rather than the model)"
        )
    expected = model.state_dict()
    candidates = list(_candidates(content))
    # The layout whose names fit the model best; ties go to the plainest reading.
    best = max(candidates, key=lambda c: len(expected.keys() & c.state.keys()))
    if not expected.keys() & best.state.keys():
        raise ConfigError(
            f"{key}: {path} holds no state dict of this {type(model).__name__} model "
            f"at the top level or under {', '.join(map(repr, NESTING_KEYS))}; "
            f"{_top_level(content)}"
        )
    _load_strictly(model, best, path, content, key)
    source = WeightsSource(
        file=str(Path(path).resolve()),
        sha256=_sha256(Path(path)),
        nesting_key=best.nesting_key,
        prefix_stripped=best.prefix,
    )
    log.info(
        "%s: loaded %d entries from %s (sha256 %s), %s, %s",
        key,
        len(best.state),
        source.file,
        source.sha256[:12],
        f"state dict under {best.nesting_key!r}" if best.nesting_key else "a plain state dict",
        f"prefix {best.prefix!r} stripped" if best.prefix else "names as saved",
    )
    return source


def _read(path: str, key: str) -> object:
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, which would run code from the file: keep
        # only its line naming what was refused
        refused = [line for line in str(e).splitlines() if "WeightsUnpickler error" in line]
        raise ConfigError(
            f"{key}: cannot read {path}: it holds pickled objects other than tensors "
            "and plain values (a whole model?); save `model.state_dict()` instead"
            + (f" ({refused[0].strip().split('. ')[0]})" if refused else "")
        ) from None
    except Exception as e:  # a bad file must name itself, whatever the reader raised
        raise ConfigError(
            f"{key}: cannot read {path}: {type(e).__name__}: {_first_line(e)}"
        ) from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _candidates(content: Mapping):
    """Each way to read `content` as a state dict, plainest first: the top level, then each
    nesting key present; each as saved, then with the wrapper prefixes its names share removed."""
    containers = [(None, content)] + [
        (key, content[key]) for key in NESTING_KEYS if isinstance(content.get(key), Mapping)
    ]
    for key, state in containers:
        yield _Candidate(key, None, state)
        stripped, prefix = _strip_wrappers(state)
        if prefix:
            yield _Candidate(key, prefix, stripped)


def _strip_wrappers(state: Mapping) -> tuple[Mapping, str]:
    """`state` without the wrapper prefixes every name shares (repeatedly: a compiled DDP model
    saves `_orig_mod.module.`), and the prefix removed ('' when none)."""
    removed = ""
    while state:
        prefix = next(
            (p for p in WRAPPER_PREFIXES if all(str(k).startswith(p) for k in state)), None
        )
        if prefix is None:
            break
        state = _without_prefix(state, prefix)
        removed += prefix
    return state, removed


def _without_prefix(state: Mapping, prefix: str) -> OrderedDict:
    out = OrderedDict((k[len(prefix) :], v) for k, v in state.items())
    # Module versions (BatchNorm's decides whether a missing num_batches_tracked is filled in)
    # are keyed by module path: the wrapper's own entry goes, the wrapped model's become root.
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        root = prefix[:-1]
        out._metadata = OrderedDict(
            (k[len(prefix) :] if k != root else "", v)
            for k, v in metadata.items()
            if k == root or k.startswith(prefix)
        )
    return out


def _load_strictly(
    model: torch.nn.Module, chosen: _Candidate, path: str, content, key: str
) -> None:
    own = model.state_dict()
    reshaped = {
        k: f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in chosen.state.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    }
    state = chosen.state
    if reshaped:  # torch refuses them in one message naming them all; they are listed below
        metadata = getattr(state, "_metadata", None)
        state = OrderedDict((k, v) for k, v in state.items() if k not in reshaped)
        if metadata is not None:
            state._metadata = metadata
    try:
        # strict=False to read what does not fit as lists rather than torch's message naming
        # every key; anything that does not fit is an error below, so the load is strict
        # (modules' own upgrades of old saved state, like BatchNorm's num_batches_tracked,
        # apply as in a strict load).
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # e.g. a value that is not a tensor
        last_line = (str(e).strip().splitlines() or [""])[-1].strip()
        raise ConfigError(f"{key}: cannot load {path}: {last_line}") from None
    missing = [k for k in result.missing_keys if k not in reshaped]
    unexpected = list(result.unexpected_keys)
    if not (reshaped or missing or unexpected):
        return
    read = f"under {chosen.nesting_key!r}" if chosen.nesting_key else "at the top level"
    if chosen.prefix:
        read += f" with prefix {chosen.prefix!r} stripped"
    problems = [
        _some(what, names)
        for what, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of another shape", list(reshaped.values())),
        )
        if names
    ]
    raise ConfigError(
        f"{key}: {path} does not fit this {type(model).__name__} model; "
        f"{_top_level(content)}; best match: the state dict {read} ({len(chosen.state)} entries, "
        f"the model has {len(own)}): {'; '.join(problems)}"
    )


def _some(what: str, names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
    return f"{len(names)} {what} ({shown})"


def _top_level(content: Mapping) -> str:
    keys = [str(k) for k in content]
    shown = ", ".join(keys[: 2 * _SHOWN]) + (", ..." if len(keys) > 2 * _SHOWN else "")
    return f"top-level keys ({len(keys)}): {shown}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class BackboneWeightsSource(WeightsSource):
    """Weights of a classifier loaded into a segmentation model's backbone only."""

    loaded_into: str  # the model's module the weights went to, e.g. "backbone"
    name_mapping: str  # how the file's names were read, e.g. "features.N -> backbone.N"
    unused_keys: tuple[str, ...]  # the file's entries with no place in the backbone (its head)


# How a classifier's parameter names map into a torchvision segmentation backbone: the
# MobileNetV3 backbone is the classifier's `features` (IntermediateLayerGetter keeps the
# children's names), the ResNet backbone the classifier without avgpool and fc.
_BACKBONE_PREFIXES = ("features.", "backbone.", "")


def load_backbone_weights(
    model: torch.nn.Module, path: str, key: str = "model.weights"
) -> BackboneWeightsSource:
    """Load an ImageNet classifier's weight file `path` into `model.backbone` (a torchvision
    segmentation model's), logging the file's entries left unused (its classifier head).
    Every backbone entry must come from the file with its shape: anything the backbone lacks
    is a ConfigError naming `key` and listing the missing entries."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, torch.nn.Module):
        raise ConfigError(
            f"{key}: {type(model).__name__} has no `backbone` module to load {path} into"
        )
    content = _read(path, key)
    if not isinstance(content, Mapping):
        raise ConfigError(f"{key}: {path} holds a {type(content).__name__}, not a state dict")
    own = backbone.state_dict()
    best = None
    for candidate in _candidates(content):
        for prefix in _BACKBONE_PREFIXES:
            mapped = {
                k[len(prefix) :]: v
                for k, v in candidate.state.items()
                if str(k).startswith(prefix)
                and k[len(prefix) :] in own
                and isinstance(v, torch.Tensor)
                and v.shape == own[k[len(prefix) :]].shape
            }
            if best is None or len(mapped) > len(best[2]):
                best = (candidate, prefix, mapped)
    candidate, prefix, mapped = best
    missing = [k for k in own if k not in mapped]
    if missing:
        raise ConfigError(
            f"{key}: {path} does not fill the backbone of this {type(model).__name__} model "
            f"({len(mapped)} of {len(own)} entries found, best read with prefix "
            f"{prefix or 'none'!r}); {_top_level(content)}; {_some('missing', missing)}"
        )
    state = OrderedDict((k, mapped[k]) for k in own)
    state._metadata = getattr(own, "_metadata", None)  # BatchNorm's version: as the model's
    backbone.load_state_dict(state, strict=True)
    used = {prefix + k for k in mapped}
    unused = tuple(k for k in candidate.state if k not in used)
    mapping = f"{prefix}<name> -> backbone.<name>" if prefix else "<name> -> backbone.<name>"
    log.info(
        "%s: loaded the backbone (%d entries) from %s, names read as %s; %s",
        key,
        len(mapped),
        path,
        mapping,
        _some("file entries unused", list(unused)) if unused else "every file entry used",
    )
    return BackboneWeightsSource(
        file=str(Path(path).resolve()),
        sha256=_sha256(Path(path)),
        nesting_key=candidate.nesting_key,
        prefix_stripped=candidate.prefix,
        loaded_into="backbone",
        name_mapping=mapping,
        unused_keys=unused,
    )


def load_segmentation_weights(
    model: torch.nn.Module, path: str, key: str = "model.weights"
) -> WeightsSource:
    """A torchvision segmentation model's `model.weights`: a whole segmenter's file (one that
    names any entry outside the backbone) loaded strictly (`load_weights`), else a classifier's
    loaded into the backbone (`load_backbone_weights`)."""
    content = _read(path, key)
    heads = {k for k in model.state_dict() if not k.startswith("backbone.")}
    if isinstance(content, Mapping) and any(heads & set(c.state) for c in _candidates(content)):
        return load_weights(model, path, key)
    return load_backbone_weights(model, path, key)
