"""The configs that ship with the package: ``get_config_file("VoVNet/faster_rcnn_V_39_eSE_FPN_3x.yaml")``.

As in detectron2's model zoo, ``configs/`` sits at the top of the checkout (one copy in git) and
the build puts it inside the package as ``d2_backbones/configs`` (``setup.py`` maps the folder), so
wheels, sdists and checkouts all have it. Names are paths relative to ``configs/``; ``_BASE_``
files travel with their children, so the returned path merges as is::

    >>> import d2_backbones
    >>> cfg = d2_backbones.get_cfg()
    >>> cfg.merge_from_file(get_config_file("ResNet/faster_rcnn_R_50_FPN_1x.yaml"))
"""
import os
from typing import List

from .errors import ConfigError, nearest_first

__all__ = ["get_config_file", "config_dir", "list_config_files", "resolve_config_file"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_SUFFIXES = (".yaml", ".py")  # yacs yaml files and LazyConfig python files


def config_dir() -> str:
    """The folder holding the configs: ``d2_backbones/configs`` of an installed wheel, else the checkout's ``configs/``.

    (An editable install and a checkout on ``sys.path`` use the top-level folder directly.)
    """
    for d in (os.path.join(_HERE, "configs"), os.path.join(os.path.dirname(_HERE), "configs")):
        if os.path.isdir(d):
            return d
    raise FileNotFoundError(
        f"d2_backbones' configs are missing: neither {os.path.join(_HERE, 'configs')} (an installed package) nor "
        f"{os.path.join(os.path.dirname(_HERE), 'configs')} (a checkout) exists. Reinstall the package.")


def list_config_files() -> List[str]:
    """Every config name (``"ResNet/faster_rcnn_R_50_FPN_1x.yaml"``, ...), sorted; ``_BASE_`` files included."""
    root = config_dir()
    names = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        rel = os.path.relpath(d, root)
        for f in files:
            if f.endswith(_SUFFIXES):
                names.append(f if rel == "." else "/".join(rel.split(os.sep) + [f]))
    return sorted(names)


def _config_name(path: str) -> str:
    """A config name from a path as users write it: ``./configs/X``, ``configs/X``, ``/X`` -> ``X``."""
    rel = str(path).replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    rel = rel.lstrip("/")
    return rel[len("configs/"):] if rel.startswith("configs/") else rel


def get_config_file(name: str) -> str:
    """Absolute path of the shipped config ``name`` (relative to ``configs/``, e.g. ``"GhostNet/..."``).

    A leading ``configs/`` is accepted (paths as the README writes them). An unknown name raises
    :class:`~d2_backbones.ConfigError` listing the closest names.

    Example::

        >>> os.path.basename(get_config_file("VoVNet/faster_rcnn_V_39_eSE_FPN_3x.yaml"))
        'faster_rcnn_V_39_eSE_FPN_3x.yaml'
    """
    rel = _config_name(name)
    names = list_config_files()
    if rel not in names:
        closest = nearest_first(rel, names)[:5]
        raise ConfigError(
            f"No config {name!r} among the {len(names)} configs shipped with d2_backbones (in {config_dir()}). "
            f"Closest: {', '.join(closest)}. d2_backbones.model_zoo.list_config_files() lists them all.")
    return os.path.join(config_dir(), *rel.split("/"))


def resolve_config_file(path: str, yacs: bool) -> str:
    """The file a trainer's ``--config-file`` names, checked before anything is built.

    A path that exists is returned as is. A path that does not exist but names a shipped config
    (``configs/VoVNet/...yaml`` as the README writes it, run outside the checkout) resolves to the
    shipped file; anything else is a :class:`~d2_backbones.ConfigError` with the closest shipped
    names. ``yacs=True`` (``train_net``) also refuses a Python config, naming ``lazy_train``.
    (``lazy_train`` takes yaml too: the ``config.yaml`` a LazyConfig run saves.)
    """
    if not os.path.isfile(path):
        rel = _config_name(path)
        names = list_config_files()
        if rel not in names:
            closest = nearest_first(rel, names)[:5]
            raise ConfigError(
                f"Config file {path!r} does not exist (relative to {os.getcwd()}) and is no config shipped with "
                f"d2_backbones. Closest shipped configs: {', '.join(closest)} (paths relative to configs/, "
                f"accepted from any directory). Fix: correct the path.")
        path = get_config_file(rel)
    if yacs and path.endswith(".py"):
        raise ConfigError(
            f"Config file {path} is a Python (LazyConfig) config; train_net reads yaml configs. Fix: train it "
            f"with python -m d2_backbones.lazy_train --config-file {path} [key=value ...], or pass a .yaml config.")
    return path
