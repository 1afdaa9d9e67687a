"""yaml configs are data: they are read with ``yaml.safe_load`` and a Python tag is refused, unless the user opts in.

detectron2's ``CfgNode.merge_from_file`` defaults to ``allow_unsafe=True``: a yaml value such as
``!!python/object/apply:os.system ["..."]`` (in the file or in any of its ``_BASE_`` files) runs when
the file is merged, and ``LazyConfig.load`` reads every ``.yaml`` with ``yaml.unsafe_load``. A
downloaded config (e.g. the yaml the converter writes beside converted weights) could run commands.

After ``import d2_backbones``:

* detectron2's ``CfgNode.load_yaml_with_base`` (what ``merge_from_file`` and each ``_BASE_`` go
  through) is wrapped by :func:`install_safe_yaml`: files are read with ``yaml.safe_load`` whatever
  ``allow_unsafe`` the caller passes (detectron2 passes ``True`` by default, so the argument cannot
  express consent); a tag that safe loading does not know stops the load with :class:`UnsafeYamlError`
  naming the file, the line, the tag and how to opt in;
* :func:`load_lazy_config` (``lazy_train``) reads a ``.yaml`` LazyConfig the same way (``.py``
  configs are Python code by design and load as detectron2 loads them). Reading is then safe, but a
  LazyConfig's ``_target_`` entries name callables that ``instantiate`` imports and calls: a LazyConfig
  yaml is as trusted as a ``.py`` config (a yacs yaml names no code).

Opting in, for a file you trust: ``--unsafe-yaml`` (train_net, lazy_train, export), or in code::

    with d2_backbones.allow_unsafe_yaml():
        cfg.merge_from_file("trusted_with_python_tags.yaml")

Inside it detectron2's own behaviour applies (safe load first, then ``yaml.unsafe_load`` with its
warning). The yaml files installed with detectron2 itself (its ``model_zoo/configs``, where
``Base-RetinaNet.yaml`` computes anchor sizes with ``!!python/object/apply:eval``) are part of the
installed package, as trusted as its code, and load as before.
"""
import contextlib
import os
import re
from typing import Any, Dict, Iterator, Optional

import yaml

from .errors import ConfigError

__all__ = ["UnsafeYamlError", "allow_unsafe_yaml", "unsafe_yaml_allowed", "install_safe_yaml", "load_lazy_config",
           "check_yaml_text"]

_ALLOWED = [0]  # depth of allow_unsafe_yaml(True) blocks in this process
_TAG_RE = re.compile(r"constructor for the tag '([^']*)'")
_YAML_TAG_PREFIX = "tag:yaml.org,2002:"
OPT_IN = ("If you trust this file: pass --unsafe-yaml (train_net, lazy_train, export), or load it inside "
          "`with d2_backbones.allow_unsafe_yaml():`.")


class UnsafeYamlError(ConfigError):
    """A yaml config holds a tag that safe loading refuses (a Python tag can run code when read)."""


@contextlib.contextmanager
def allow_unsafe_yaml(allow: bool = True) -> Iterator[None]:
    """Within the block, yaml configs with Python tags load as detectron2 loads them (``yaml.unsafe_load``).

    Only for files you trust: a Python tag runs code while the file is read. ``allow=False`` is a no-op
    block (so a flag can be passed straight through: ``with allow_unsafe_yaml(args.unsafe_yaml): ...``).
    """
    if allow:
        _ALLOWED[0] += 1
    try:
        yield
    finally:
        if allow:
            _ALLOWED[0] -= 1


def unsafe_yaml_allowed() -> bool:
    """Whether the caller is inside :func:`allow_unsafe_yaml`."""
    return _ALLOWED[0] > 0


def _name(filename: Any) -> str:
    return str(getattr(filename, "name", filename))


def _refusal(filename: Any, err: yaml.constructor.ConstructorError) -> UnsafeYamlError:
    found = _TAG_RE.search(str(err.problem or ""))
    mark = err.problem_mark
    where = f"{_name(filename)}, line {mark.line + 1}, column {mark.column + 1}" if mark else _name(filename)
    if not found:  # not a tag (e.g. an unhashable key): yaml's own words
        return UnsafeYamlError(f"Config file {where}: yaml.safe_load cannot read it: {err.problem}.")
    tag = found.group(1)
    if tag.startswith(_YAML_TAG_PREFIX):
        tag = "!!" + tag[len(_YAML_TAG_PREFIX):]
    if tag.startswith("!!python/"):
        why = "a Python tag, which runs code while the file is read; yaml configs are read with yaml.safe_load"
        fix = OPT_IN
    else:
        why = "a tag that yaml.safe_load does not know (configs use plain values: numbers, strings, lists, mappings)"
        fix = "Fix: write the value without the tag."
    return UnsafeYamlError(f"Config file {where}: refused the tag {tag} ({why}). {fix}")


def check_yaml_text(text: str, filename: str) -> Any:
    """``yaml.safe_load(text)``; a tag it refuses raises :class:`UnsafeYamlError` naming ``filename`` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        raise _refusal(filename, e) from None


def _trusted_dirs() -> tuple:
    import detectron2

    # realpath of the whole path: an editable detectron2 links model_zoo/configs to its checkout's configs/
    return (os.path.realpath(os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs")) + os.sep,)


def _is_trusted(filename: Any) -> bool:
    return isinstance(filename, str) and os.path.realpath(filename).startswith(_trusted_dirs())


def _safe_load_with_base(original):
    if getattr(original, "_d2b_safe", False):
        return original

    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False) -> Dict[str, Any]:
        unsafe = unsafe_yaml_allowed() or _is_trusted(filename)
        try:
            return original(cls, filename, allow_unsafe=unsafe)
        except yaml.constructor.ConstructorError as e:
            raise _refusal(filename, e) from None
        except UnsafeYamlError as e:  # raised for one of this file's _BASE_ files
            if "(a _BASE_ of " in str(e):
                raise
            raise UnsafeYamlError(str(e).replace(": ", f" (a _BASE_ of {_name(filename)}): ", 1)) from None

    load_yaml_with_base.__doc__ = original.__doc__
    load_yaml_with_base._d2b_safe = True
    return load_yaml_with_base


def install_safe_yaml() -> None:
    """Make detectron2's ``CfgNode.load_yaml_with_base`` read with ``yaml.safe_load`` (idempotent; see module doc)."""
    from detectron2.config import CfgNode

    original = CfgNode.load_yaml_with_base.__func__
    CfgNode.load_yaml_with_base = classmethod(_safe_load_with_base(original))


def load_lazy_config(filename: str, unsafe: Optional[bool] = None):
    """``LazyConfig.load(filename)``, but a ``.yaml``/``.yml`` file is read with ``yaml.safe_load``.

    ``unsafe=True`` (``--unsafe-yaml``) or an enclosing :func:`allow_unsafe_yaml` block: detectron2's
    ``LazyConfig.load`` as is. A ``.py`` config is Python code by design and always loads as detectron2 does.
    """
    from detectron2.config import LazyConfig

    if not filename.endswith((".yaml", ".yml")) or unsafe or unsafe_yaml_allowed() or _is_trusted(filename):
        return LazyConfig.load(filename)
    from detectron2.utils.file_io import PathManager
    from omegaconf import OmegaConf

    with PathManager.open(filename) as f:
        obj = check_yaml_text(f.read(), filename)
    return OmegaConf.create(obj, flags={"allow_objects": True})  # what LazyConfig.load makes of a yaml
