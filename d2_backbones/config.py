"""Config keys of d2_backbones, added to a detectron2 config by :func:`add_config`.

:func:`add_config` only *adds* missing keys to the cfg it is given (calling it twice is
harmless, existing values are never changed, detectron2's global defaults are never
touched). :func:`get_cfg` is ``detectron2.config.get_cfg()`` plus these keys.

This module knows no family by name: each family's section (its keys, their defaults and a
comment with the options) lives in the family's own module and is named by its
:class:`~d2_backbones.families.Family` record (``add_config_keys``). The sections below belong to no
family: the FPN (``MODEL.FPN.*`` beyond detectron2's ``IN_FEATURES``, ``OUT_CHANNELS``, ``NORM``,
``FUSE_TYPE``), training and evaluation. Keys detectron2 already has are reused where the meaning is
the same (``MODEL.BACKBONE.FREEZE_AT``, ...). Every key is documented once: the shared ones in
``docs/configuration.md``, a family's on its page ``docs/<family>.md`` (a test keeps them in sync).
"""
import copy
import difflib
import functools
import re
from typing import Callable, Dict, List, Optional

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg as _d2_get_cfg

from .errors import RegistryKeyError, dotted_get, is_int
from .families import FAMILIES, on_register
from .yaml_safety import install_safe_yaml

__all__ = ["add_config", "get_cfg", "our_keys", "cfg_get", "install_config_hints"]


def _fpn_keys(_C: CN) -> None:
    _C.MODEL.FPN = CN()
    # Extra FPN levels above the last input feature. Options: "maxpool" (P6 = max-pool of the top
    # output; Faster/Mask R-CNN), "p6p7" (P6, P7 by stride-2 3x3 convs; RetinaNet/FCOS),
    # "p6" (P6 conv only), "none".
    _C.MODEL.FPN.TOP_BLOCK = "maxpool"
    # Input of the P6 conv for "p6"/"p6p7" (mmdet `add_extra_convs`). Options: "on_input" (the
    # backbone's last FPN input, e.g. res5; detectron2 RetinaNet), "on_lateral" (the last lateral
    # conv's output), "on_output" (the top FPN output, e.g. P5; FCOS).
    _C.MODEL.FPN.TOP_BLOCK_SOURCE = "on_input"
    # ReLU on P6 before the P7 conv. True = detectron2; False = mmdet RetinaNet
    # (`relu_before_extra_convs=False`). Options: True, False.
    _C.MODEL.FPN.TOP_BLOCK_RELU = True
    # Extra levels of TOP_BLOCK "maxpool", each a stride-2 max-pool of the previous one (1 = P6 only,
    # detectron2's LastLevelMaxPool). MMDetection's FPN with add_extra_convs=False and num_outs =
    # len(IN_FEATURES) + TOP_BLOCK_LEVELS, e.g. 2 for P3-P7 from C3-C5. Other top blocks: leave 1.
    _C.MODEL.FPN.TOP_BLOCK_LEVELS = 1


def _train_keys(_C: CN) -> None:
    _C.SOLVER = CN()
    # How many periodic checkpoints (model_XXXXXXX.pth) train_net.py keeps; 0 = all (detectron2's behaviour).
    _C.SOLVER.MAX_TO_KEEP = 0
    _C.TEST = CN()
    # Metric for keeping the best checkpoint (model_best.pth) at every evaluation, e.g. "bbox/AP";
    # "" = off. Needs TEST.EVAL_PERIOD > 0.
    _C.TEST.BEST_CHECKPOINT_METRIC = ""
    # Whether a higher ("max") or lower ("min") BEST_CHECKPOINT_METRIC is better. Options: "max", "min".
    _C.TEST.BEST_CHECKPOINT_MODE = "max"
    # Evaluate with d2_backbones.optimize_for_inference: norms folded into the convolutions and
    # channels_last (same outputs within float32 rounding, faster). Used by train_net.py's evaluations
    # (--eval-only and TEST.EVAL_PERIOD; the trained model itself is left untouched).
    # d2_backbones.OptimizedPredictor always optimizes. Options: True, False.
    _C.TEST.OPTIMIZE_FOR_INFERENCE = False
    # Where the backbone + FPN run for inference (the predictors and train_net's evaluations; implies
    # OPTIMIZE_FOR_INFERENCE): "torch" (PyTorch), "onnxruntime" or "openvino" (exported at startup;
    # pip install d2_backbones[deploy]). See docs/runtime.md. Options: "torch", "onnxruntime", "openvino".
    _C.TEST.RUNTIME = "torch"
    # Numeric precision of inference: "fp32" (exact), "bf16" (bfloat16 backbone + FPN and head
    # convolutions/matmuls; CPUs with AVX512-BF16 or AMX; torch or openvino), "int8" (backbone + FPN
    # quantized, onnxruntime or openvino, after python -m d2_backbones.calibrate). Options: "fp32", "bf16", "int8".
    _C.TEST.PRECISION = "fp32"
    # Weights that do not fit the backbone when loaded (a file whose bottom-up tensors do not fill the
    # whole bottom-up network, or use tensors it lacks; a converted file whose metadata names another
    # network than the config): "error" stops the load naming the cause and the keys to set; "warn"
    # (experts) loads what fits and logs a warning. Preprocessing differences (INPUT.FORMAT,
    # MODEL.PIXEL_MEAN/STD) are always a warning.
    # Options: "error", "warn".
    _C.MODEL.WEIGHTS_CHECK = "error"


# Sections that belong to no family; each family's section is its record's ``add_config_keys``.
_SECTIONS: List[Callable[[CN], None]] = [_fpn_keys, _train_keys]


@functools.lru_cache(maxsize=1)
def _template() -> CN:
    t = CN()
    t.MODEL = CN()
    for section in [f.add_config_keys for f in FAMILIES.values()] + _SECTIONS:
        section(t)
    return t


# a family registered later (a fourth family, a test's toy family) adds its keys to every later add_config
on_register(lambda family: _template.cache_clear())


def _flatten(node: CN, prefix: str = "") -> Dict[str, object]:
    out = {}
    for k, v in node.items():
        full = f"{prefix}{k}"
        if isinstance(v, CN):
            out.update(_flatten(v, full + "."))
        else:
            out[full] = v
    return out


def our_keys() -> Dict[str, object]:
    """Every key this package adds, as ``{"MODEL.RESNETS.DEEP_STEM": False, ...}`` (defaults)."""
    return _flatten(_template())


def _merge_missing(dst: CN, src: CN) -> None:
    for k, v in src.items():
        if k not in dst:
            dst[k] = copy.deepcopy(v)
        elif isinstance(v, CN) and isinstance(dst[k], CN):
            _merge_missing(dst[k], v)


def add_config(cfg: CN) -> CN:
    """Add every d2_backbones key (with its default) to ``cfg``; existing keys are left as they are.

    Idempotent, and it mutates only ``cfg``. Returns ``cfg`` for chaining.

    Example::

        >>> from detectron2.config import get_cfg
        >>> cfg = add_config(get_cfg())
        >>> cfg.MODEL.RESNETS.DEEP_STEM, cfg.MODEL.FPN.TOP_BLOCK
        (False, 'maxpool')
    """
    frozen = cfg.is_frozen()
    if frozen:
        cfg.defrost()
    _merge_missing(cfg, _template())
    if frozen:
        cfg.freeze()
    return cfg


def get_cfg() -> CN:
    """detectron2's default config plus every d2_backbones key."""
    return add_config(_d2_get_cfg())


def cfg_get(cfg: CN, dotted: str):
    """Read ``cfg.<dotted>``, falling back to this package's default when the key is missing.

    Builders use it for keys another package's ``add_*_config`` may have replaced (e.g.
    vovnet-detectron2 resets the whole ``MODEL.VOVNET`` node).
    """
    value = dotted_get(cfg, dotted, _MISSING)
    if value is not _MISSING:
        return value
    defaults = our_keys()
    if dotted in defaults:
        return copy.deepcopy(defaults[dotted])
    raise KeyError(f"Config key {dotted} is missing")


_MISSING = object()
_MISSING_RE = re.compile(r"Non-existent (?:config )?key: (\S+)")


def _missing_key_hint(cfg: CN, message: str) -> Optional[str]:
    m = _MISSING_RE.search(message)
    if not m:
        return None
    key = m.group(1).rstrip("'\"")
    ours = our_keys()
    existing = list(_flatten(cfg))
    is_ours = key in ours or any(k.startswith(key + ".") for k in ours)
    has_ours = any(k in ours for k in existing)
    if is_ours and not has_ours:
        return (f"Config key {key} belongs to d2_backbones, but this config has no d2_backbones keys yet. "
                "Fix: call d2_backbones.add_config(cfg) before merge_from_file/merge_from_list "
                "(or start from d2_backbones.get_cfg()), and `import d2_backbones` so its backbones are registered.")
    close = difflib.get_close_matches(key, existing, n=3, cutoff=0.75)
    if close:
        return f"Non-existent config key: {key}. Did you mean: {', '.join(close)}?"
    return None


def _float_keys_accept_ints(self: CN, method_name: str, args: tuple) -> tuple:
    """An int given for a float key (``MODEL.GHOSTNET.WIDTH 1``, ``WIDTH: 1`` in a yaml) becomes that float;
    yacs would refuse it with ``Type mismatch (<class 'float'> vs. <class 'int'>)``."""
    def target(dotted):
        return dotted_get(self, dotted)

    if method_name == "merge_from_list" and args:
        opts = list(args[0])
        for i in range(0, len(opts) - 1, 2):
            if isinstance(target(str(opts[i])), float):
                value = CN._decode_cfg_value(opts[i + 1])
                if is_int(value):
                    opts[i + 1] = float(value)
        return (opts,) + tuple(args[1:])
    if method_name == "merge_from_other_cfg" and args and isinstance(args[0], CN):
        def walk(other: CN, mine: CN):
            for k, v in other.items():
                if isinstance(v, CN) and isinstance(mine.get(k), CN):
                    walk(v, mine[k])
                elif is_int(v) and isinstance(mine.get(k), float):
                    other[k] = float(v)
        walk(args[0], self)
    return args


def _hinted(method):
    if getattr(method, "_d2b_hinted", False):
        return method

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        args = _float_keys_accept_ints(self, method.__name__, args)
        try:
            return method(self, *args, **kwargs)
        except (KeyError, AssertionError) as e:
            hint = _missing_key_hint(self, str(e))
            if hint is None:
                raise
            new = RegistryKeyError(hint) if isinstance(e, KeyError) else AssertionError(hint)
            raise new from e

    wrapper._d2b_hinted = True
    return wrapper


def install_config_hints() -> None:
    """Make detectron2's ``CfgNode`` merges explain unknown d2_backbones keys (idempotent).

    Only merges that would fail change: an unknown key of this package says to call
    :func:`add_config`; a near-miss key suggests the closest existing key; an int given for a
    float key is taken as that float (yacs refuses it with a type mismatch). Config files are read
    with ``yaml.safe_load`` (:func:`~d2_backbones.yaml_safety.install_safe_yaml`): a Python tag is refused
    unless inside :func:`~d2_backbones.allow_unsafe_yaml`.
    """
    CN.merge_from_other_cfg = _hinted(CN.merge_from_other_cfg)
    CN.merge_from_list = _hinted(CN.merge_from_list)
    # yaml files are read with yaml.safe_load (merge_from_file and every _BASE_); see d2_backbones.yaml_safety
    install_safe_yaml()
