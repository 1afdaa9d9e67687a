"""Error types and message helpers shared by every family.

Every configuration mistake the package can detect is raised as a
:class:`ConfigError` whose message names the config key, the value received,
the valid values and the fix, e.g.::

    MODEL.RESNETS.DEPTH=42 is not supported. Valid values: 18, 34, 50, 101, 152.
    Fix: set MODEL.RESNETS.DEPTH to one of them.

The checks run while the model is built (inside the registered backbone
builders), so a wrong config fails in seconds, before any data is loaded.

The family classes take plain keyword arguments and know nothing of config keys: their
errors name an argument through :func:`arg_key` (``arg_key("depth")`` -> ``"depth"``). A
builder that reads a cfg runs the constructor inside :func:`argument_keys` with its
argument -> config-key table, and the same errors then name the config keys::

    with argument_keys({"depth": "MODEL.RESNETS.DEPTH"}):
        build_resnet(depth=42)   # ConfigError: MODEL.RESNETS.DEPTH=42 is not supported. ...
"""
import contextlib
import contextvars
import difflib
import numbers
from collections.abc import Mapping as _MappingABC
from collections.abc import Sequence as _SequenceABC
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence

__all__ = ["ConfigError", "RegistryKeyError", "nearest_first", "config_error", "format_values", "check_out_features",
           "check_freeze_at", "check_bools", "arg_key", "argument_keys", "is_int", "is_number", "dotted_get"]


_ARG_KEYS: contextvars.ContextVar = contextvars.ContextVar("d2_backbones_arg_keys", default={})


def is_int(value) -> bool:
    """An integer config value (``True``/``False`` are not: yacs and Python configs pass bools as ints)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real config value that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def arg_key(name: str) -> str:
    """The name an error message uses for argument ``name``: its config key inside
    :func:`argument_keys`, else the argument name itself."""
    return _ARG_KEYS.get().get(name, name)


@contextlib.contextmanager
def argument_keys(keys: Mapping[str, str]) -> Iterator[None]:
    """Within the block, :func:`arg_key` maps argument names to ``keys`` (config keys); nests."""
    token = _ARG_KEYS.set({**_ARG_KEYS.get(), **keys})
    try:
        yield
    finally:
        _ARG_KEYS.reset(token)


class ConfigError(ValueError):
    """A configuration value is invalid. The message says which key and how to fix it."""


class RegistryKeyError(KeyError):
    """A ``KeyError`` whose ``str()`` is the readable message, not its ``repr``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def nearest_first(name: str, candidates: Iterable[str]) -> List[str]:
    """Return ``candidates`` sorted by similarity to ``name`` (most similar first).

    Example::

        >>> nearest_first("V-39", ["V-99-eSE", "V-39-eSE", "V-19-eSE"])
        ['V-39-eSE', 'V-99-eSE', 'V-19-eSE']
    """
    cands = list(dict.fromkeys(str(c) for c in candidates))
    low = str(name).lower()

    def score(c: str) -> float:
        return difflib.SequenceMatcher(None, low, c.lower()).ratio()

    return sorted(cands, key=lambda c: (-score(c), cands.index(c)))


def format_values(values: Iterable) -> str:
    """Render valid values for a message: strings quoted, others as-is."""
    return ", ".join(repr(v) if isinstance(v, str) else str(v) for v in values)


def config_error(
    key: str,
    value,
    valid: Optional[Sequence] = None,
    fix: Optional[str] = None,
    problem: Optional[str] = None,
    nearest: bool = False,
) -> ConfigError:
    """Build a :class:`ConfigError` with the package's standard wording.

    Args:
        key: full config key, e.g. ``"MODEL.RESNETS.DEPTH"``.
        value: the value received.
        valid: the valid values (listed nearest-first to ``value`` if ``nearest``).
        fix: what the user should do. Defaults to "set KEY to one of them".
        problem: replaces the default "is not supported" clause.
    """
    msg = f"{key}={value!r} {problem or 'is not supported'}."
    if valid is not None:
        vals = list(valid)
        if nearest and isinstance(value, str):
            vals = nearest_first(value, vals)
        msg += f" Valid values: {format_values(vals)}."
    if fix is None and valid is not None:
        fix = f"set {key} to one of them"
    if fix:
        msg += f" Fix: {fix}."
    return ConfigError(msg)


def check_bools(**values) -> None:
    """Each keyword argument must be a bool; the error names it through :func:`arg_key` (its config key
    inside :func:`argument_keys`). yacs only type-checks merges, so ``cfg.X = "yes"`` in Python reaches us."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise config_error(arg_key(name), value, [True, False])


def check_out_features(out_features, valid: Sequence[str], key: str, family: str, hint: str = "") -> List[str]:
    """Validate a backbone's ``out_features`` against the names it can produce; returns them as a list.

    Errors: not a list, empty, a name the family does not produce (valid names listed), a name listed twice.
    """
    if isinstance(out_features, str) or not isinstance(out_features, Iterable):  # lists, tuples, omegaconf lists
        raise config_error(key, out_features, problem="must be a list of feature names",
                           fix=f"write it as a list, e.g. {list(valid[1:])}")
    out = list(out_features)
    valid = list(valid)
    if not out:
        raise config_error(key, out, valid, problem="is empty", fix=f"list features from {valid}")
    for f in out:
        if f not in valid:
            raise config_error(key, out, valid, problem=f"contains {f!r}, which {family} does not produce",
                               fix=f"use names from {valid}{hint}")
    if len(set(out)) != len(out):
        raise config_error(key, out, problem="lists a feature twice", fix="list each feature once")
    return out


def check_freeze_at(freeze_at, top: int, stage_names: Sequence[str], key: str, family: str,
                    stem_note: str = "") -> int:
    """Validate ``freeze_at`` in ``0..top`` (stem + built stages); ``stage_names[i]`` is unit ``i + 1``."""
    if isinstance(freeze_at, bool) or not isinstance(freeze_at, int) or not 0 <= freeze_at <= top:
        raise config_error(
            key, freeze_at, list(range(top + 1)), problem=f"is out of range for this {family}",
            fix=f"use 0 (nothing), 1 (stem{stem_note}), ..., {top} (stem and every built stage up to "
                f"{stage_names[top - 1]})")
    return freeze_at


def dotted_get(cfg, dotted: str, default: Any = None) -> Any:
    """``cfg.a.b.c`` for ``"a.b.c"``, or ``default`` when a part is missing (or a node on the way is not a
    container). One reader for every config the package sees: a yacs ``CfgNode``, an omegaconf ``DictConfig``
    (a Python config; interpolations resolve as on attribute access) and plain dicts; an integer part indexes a
    list (``"dataloader.train.mapper.augmentations.0.max_size"``).

    Example::

        >>> dotted_get({"train": {"amp": {"enabled": True}}}, "train.amp.enabled")
        True
        >>> dotted_get({"train": {}}, "train.amp.enabled", "unset")
        'unset'
        >>> dotted_get({"augs": [{"max_size": 128}]}, "augs.0.max_size")
        128
    """
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, _MappingABC):  # CfgNode (a dict), DictConfig, dict
            if part not in node:
                return default
            node = node[part]
        elif isinstance(node, _SequenceABC) and not isinstance(node, (str, bytes)) and part.lstrip("-").isdigit():
            index = int(part)
            if not -len(node) <= index < len(node):
                return default
            node = node[index]
        else:
            return default
    return node
