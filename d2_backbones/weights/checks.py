"""Checks that run whenever weights are loaded or saved (by :class:`~d2_backbones.weights.Checkpointer`).

At load time, in this order:

1. :func:`check_weights_metadata` - a file written by ``python -m d2_backbones.convert`` says
   which architecture and preprocessing its weights need (``checkpoint["d2_backbones"]``).
   Keys that change the network (``MODEL.RESNETS.DEPTH``, ``MODEL.VOVNET.ESE_PLACEMENT``,
   ``MODEL.GHOSTNET.WIDTH``, FPN keys, ...) that disagree with the config stop the load with
   :class:`WeightsMismatchError`, naming each key, the file's value, the config's value and the
   overrides to set; ``INPUT.FORMAT`` / ``MODEL.PIXEL_MEAN`` / ``MODEL.PIXEL_STD`` give one
   WARNING. ``MODEL.WEIGHTS_CHECK "warn"`` turns the error into a warning (experts only).
2. :func:`check_missing_backbone` - such a file holds the whole backbone: a backbone parameter
   the file lacks (e.g. an eSE layer of ``ESE_PLACEMENT "all"`` loaded from "last" weights)
   stops the load even without a config.
3. :func:`check_shape_skips` - for any file: when more than half of the backbone tensors it
   has were skipped for another shape, the checkpoint is for another depth/width/variant.
4. :func:`compare_bottom_up` + :func:`check_bottom_up` - for any file (a detector checkpoint of
   train_net/detectron2, a ``.pkl`` after detectron2's name matching, a converted file): when the
   file holds tensors of the bottom-up network (``backbone.bottom_up.*``, ``backbone.*`` without an
   FPN), every parameter and buffer of the model's bottom-up network must be in it with the same
   shape and every bottom-up tensor of the file must be used. Otherwise one
   :class:`WeightsMismatchError` gives the counts, the first keys, the likely cause (another depth,
   another family, other ``OUT_FEATURES``) and the fix. Tensors that weights of the plain network
   lack by design (:func:`optional_kinds`: deformable-conv offsets, GC/SE plugins, running statistics
   of affine-only weights) stay initialised when the file holds none of their kind (one INFO line).
   Heads and the FPN are not checked (another class count is ordinary fine-tuning).

At save time :func:`count_non_finite` finds NaN/Inf in a model's state (one pass, see the
README for its cost), so that training never writes or tags a diverged state.

Example::

    >>> from d2_backbones.weights import load_summary
    >>> load_summary(["backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.stem.conv1.norm.running_mean",
    ...               "roi_heads.box_predictor.cls_score.weight"], params={"backbone.bottom_up.stem.conv1.weight",
    ...               "roi_heads.box_predictor.cls_score.weight"}, not_loaded={"roi_heads.box_predictor.cls_score.weight"})
    'backbone.bottom_up: 1/1 parameters, 1/1 buffers loaded; roi_heads: 0/1 parameters (initialised)'
"""
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from ..errors import dotted_get
from ..families import FAMILIES, family_reading
from .formats import METADATA_KEY, PREFIX, PREPROCESSING_KEYS, ConvertError, effective_config_values, listing
from .read import CheckpointReadError, load_file

__all__ = ["WeightsMismatchError", "check_weights_metadata", "check_missing_backbone", "check_shape_skips",
           "count_non_finite", "load_summary", "overrides_string", "family_of_backbone_name", "BottomUpLoad",
           "compare_bottom_up", "check_bottom_up", "bottom_up_units", "optional_kinds", "WEIGHTS_CHECK_POLICIES",
           "check_weights_policy"]

logger = logging.getLogger("d2_backbones")

class WeightsMismatchError(ValueError):
    """Weights made for another architecture than the model (depth, width, variant, eSE placement, ...)."""


# MODEL.WEIGHTS_CHECK (yaml) / train.weights_check (LazyConfig): "error" stops a load that does not fit, "warn"
# loads what fits and says what did not.
WEIGHTS_CHECK_POLICIES = ("error", "warn")


def check_weights_policy(value: Any, key: str = "MODEL.WEIGHTS_CHECK") -> str:
    """``value`` if it is one of :data:`WEIGHTS_CHECK_POLICIES`; else a ``ConfigError`` naming ``key``. The trainers
    call it in their setup (before anything is built), the :class:`~d2_backbones.weights.Checkpointer` when built.

    >>> check_weights_policy("skip", "train.weights_check")
    Traceback (most recent call last):
      ...
    d2_backbones.errors.ConfigError: train.weights_check='skip' is not one of 'error', 'warn': 'error' stops a load whose weights do not fit the backbone, 'warn' loads what fits with a warning. Fix: set it to 'error' (default) or 'warn'.
    """
    from ..errors import ConfigError

    if value not in WEIGHTS_CHECK_POLICIES:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, WEIGHTS_CHECK_POLICIES))}: 'error' "
                          f"stops a load whose weights do not fit the backbone, 'warn' loads what fits with a "
                          f"warning. Fix: set it to 'error' (default) or 'warn'.")
    return str(value)


def family_of_backbone_name(name: str) -> Optional[str]:
    """The family (``FAMILIES`` name) whose config a ``MODEL.BACKBONE.NAME`` reads (its ``also_built_by``:
    detectron2's ResNet builders count as ``"resnet"``); None for others (their config is not compared with
    the weights' metadata; the structural checks still run)."""
    fam = family_reading(name)
    return fam.name if fam is not None else None


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-3 * max(1.0, abs(float(b)))
    return a == b


def _yaml_value(v) -> str:
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    return str(v)


_PLAIN = re.compile(r"^[A-Za-z][\w.-]*$")  # strings yacs reads back as the same string without quotes
_LITERALS = ("True", "False", "None")


def overrides_string(values: Mapping[str, Any]) -> str:
    """``KEY VALUE`` pairs to paste on a train_net command line; lists and strings quoted for the shell.

    >>> overrides_string({"MODEL.RESNETS.DEPTH": 18, "INPUT.FORMAT": "RGB", "MODEL.PIXEL_STD": [58.395, 57.12, 57.375]})
    'MODEL.RESNETS.DEPTH 18 INPUT.FORMAT RGB MODEL.PIXEL_STD "[58.395, 57.12, 57.375]"'
    """
    out = []
    for k, v in values.items():
        text = _yaml_value(v)
        if isinstance(v, (bool, int, float)) or (isinstance(v, str) and _PLAIN.match(v) and v not in _LITERALS):
            out.append(f"{k} {v if isinstance(v, str) else text}")
        else:
            out.append(f'{k} "{text}"')
    return " ".join(out)


def _metadata(checkpoint: Any) -> Optional[Mapping]:
    if isinstance(checkpoint, str):
        checkpoint = load_file(checkpoint)
    meta = checkpoint.get(METADATA_KEY, checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(meta, Mapping) or not isinstance(meta.get("config"), Mapping):
        return None
    return meta


def check_weights_metadata(cfg, checkpoint: Any, log: Optional[logging.Logger] = None,
                           policy: Optional[str] = None) -> List[Tuple[str, Any, Any]]:
    """Compare a converted file's metadata with ``cfg`` (see the module docstring).

    ``checkpoint`` is a path, a loaded checkpoint dict or its ``"d2_backbones"`` metadata.
    Architecture keys that differ raise :class:`WeightsMismatchError` (``policy="warn"`` or
    ``cfg.MODEL.WEIGHTS_CHECK "warn"``: a WARNING instead). Returns the preprocessing keys that
    differ, ``[(key, value the weights expect, value in cfg), ...]``, after one WARNING naming them.
    Usable from any script (the cfg has BGR caffe preprocessing, the file torchvision's)::

        check_weights_metadata(cfg, "r50_converted.pth")
        # [('INPUT.FORMAT', 'RGB', 'BGR'), ('MODEL.PIXEL_STD', [58.395, 57.12, 57.375], [1.0, 1.0, 1.0])]
    """
    meta = _metadata(checkpoint)
    if meta is None:
        return []
    log = log or logger
    if policy is None:
        policy = dotted_get(cfg, "MODEL.WEIGHTS_CHECK", KeyError)
        policy = "error" if policy is KeyError else policy
    backbone_name = dotted_get(cfg, "MODEL.BACKBONE.NAME", KeyError)
    running = family_of_backbone_name(backbone_name) if isinstance(backbone_name, str) else None
    file_family = meta.get("family")
    described = f"{meta.get('arch')}, converted from {meta.get('source_format')}"
    arch_wrong, prep_wrong = [], []
    if running is not None and file_family is not None and running != file_family:
        msg = (f"The weights hold a {file_family} backbone ({described}) but MODEL.BACKBONE.NAME={backbone_name!r} "
               f"builds a {running} backbone. Fix: use a {file_family} config (configs/ has one per family) or "
               f"weights of the {running} family.")
        if policy != "warn":
            raise WeightsMismatchError(msg)
        log.warning(msg + " (MODEL.WEIGHTS_CHECK warn: loading anyway)")
    for key, want in meta["config"].items():
        have = dotted_get(cfg, key, KeyError)
        effective = effective_config_values()
        if have is not KeyError and key in effective:
            try:
                have = effective[key](cfg, have)
            except (AttributeError, KeyError):
                pass
        if have is KeyError or _same(have, want):
            continue
        if key in PREPROCESSING_KEYS:
            prep_wrong.append((key, want, have))
        elif running is None or running != file_family:
            continue  # another family's (or an unknown builder's) keys do not describe this network
        elif key.startswith("MODEL.FPN.") and "fpn" not in str(backbone_name):
            continue
        else:
            arch_wrong.append((key, want, have))
    if arch_wrong:
        lines = "\n".join(f"  - {k}: the weights need {_yaml_value(w)}, the config has {_yaml_value(h)}"
                          for k, w, h in arch_wrong)
        msg = (f"The weights ({described}) were made for another network than the config builds:\n{lines}\n"
               f"Fix: add these overrides: {overrides_string({k: w for k, w, _ in arch_wrong})} (or merge the .yaml "
               f"the converter wrote beside the weights).")
        if policy != "warn":
            raise WeightsMismatchError(msg + " Experts: MODEL.WEIGHTS_CHECK warn loads anyway.")
        log.warning(msg + " MODEL.WEIGHTS_CHECK is 'warn': loading anyway; mismatched layers keep their "
                          "initialisation.")
    if prep_wrong:
        now = ", ".join(f"{k}={_yaml_value(h)}" for k, _, h in prep_wrong)
        log.warning(f"The weights ({described}) expect other input preprocessing than the running config ({now}). "
                    f"Set: {overrides_string({k: w for k, w, _ in prep_wrong})}")
    return prep_wrong


def _backbone_prefix(model_keys: Iterable[str]) -> str:
    keys = list(model_keys)
    return PREFIX if any(k.startswith(PREFIX) for k in keys) else "backbone."


def check_missing_backbone(model_keys: Sequence[str], missing_keys: Iterable[str], metadata: Optional[Mapping],
                           log: Optional[logging.Logger] = None, policy: str = "error") -> None:
    """A converted (non-partial) file holds the whole backbone: a backbone tensor it lacks is an architecture
    mismatch (raises :class:`WeightsMismatchError`; ``policy="warn"``: a WARNING)."""
    if not metadata or metadata.get("partial"):
        return
    prefix = _backbone_prefix(model_keys)
    lacking = [k for k in missing_keys if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
    if not lacking:
        return
    config = metadata.get("config") if isinstance(metadata.get("config"), Mapping) else {}
    arch = {k: v for k, v in config.items() if k not in PREPROCESSING_KEYS}
    msg = (f"{len(lacking)} backbone tensor(s) of the model are not in the weights, which hold a complete "
           f"{metadata.get('arch')} backbone (converted from {metadata.get('source_format')}): {listing(lacking, 4)}. "
           f"The model is another variant; those layers would stay randomly initialised. Fix: "
           f"{overrides_string(arch)}.")
    if policy == "warn":
        (log or logger).warning(msg + " (MODEL.WEIGHTS_CHECK warn: loading anyway)")
        return
    raise WeightsMismatchError(msg)


def check_shape_skips(model_keys: Sequence[str], incorrect_shapes: Sequence, metadata: Optional[Mapping] = None,
                      loaded_keys: Optional[Sequence[str]] = None, log: Optional[logging.Logger] = None,
                      policy: str = "error") -> None:
    """Raise :class:`WeightsMismatchError` when most backbone tensors were skipped for a shape mismatch.

    Counts the checkpoint's tensors that have a name in the model's backbone (``backbone.bottom_up.*``,
    or ``backbone.*`` without an FPN): if more than half of them had another shape, the checkpoint
    is for another depth/width/variant and training from it would silently start from scratch.
    """
    prefix = _backbone_prefix(model_keys)
    bb = [(k, c, m) for k, c, m in incorrect_shapes if k.startswith(prefix)]
    skipped = {k for k, *_ in bb}
    loaded = [k for k in (loaded_keys or ()) if k.startswith(prefix) and k not in skipped]
    total = len(bb) + len(loaded)
    if not bb or len(bb) * 2 <= total:
        return
    examples = "; ".join(f"{k}: checkpoint {tuple(c)} vs model {tuple(m)}" for k, c, m in bb[:3])
    msg = (f"{len(bb)} of the {total} backbone tensors in the checkpoint have other shapes than the model and were "
           f"skipped ({examples}). The checkpoint was made for another depth, width or variant than "
           f"MODEL.BACKBONE / the family config describes.")
    if metadata and isinstance(metadata.get("config"), Mapping):
        arch = {k: v for k, v in metadata["config"].items() if k not in PREPROCESSING_KEYS}
        msg += f" The file says it holds {metadata.get('arch')}: set {overrides_string(arch)}."
    else:
        nodes = ", ".join(f"{f.config_node}.*" for f in FAMILIES.values())
        msg += (f" Fix: set the family keys to the checkpoint's architecture ({nodes}), or convert it with "
                f"python -m d2_backbones.convert.")
    if policy == "warn":
        (log or logger).warning(msg + " (MODEL.WEIGHTS_CHECK warn: loading anyway)")
        return
    raise WeightsMismatchError(msg)


# Tensors a model may have that weights of the plain network lack by design: each family's ``optional_weights``
# (deformable-conv offsets, plugins) and, for affine-only files (Caffe2/MSRA .pkl), norm running statistics.
# When the file holds no tensor of a kind, the model's tensors of that kind keep their initialisation (one INFO
# line names them); when it holds some, the others count as missing.
_RUNNING_STATS = ("norm running statistics (affine-only weights such as MSRA's .pkl: mean 0, variance 1)",
                  re.compile(r"\.running_(mean|var)$"))


def optional_kinds(affine_only_norms: bool = False) -> List[Tuple[str, "re.Pattern[str]"]]:
    """``(kind, regex)`` of the tensors a file may lack by design (every family's ``optional_weights``, and the
    running statistics when ``affine_only_norms``)."""
    kinds = [k for fam in FAMILIES.values() for k in fam.optional_weights]
    return kinds + [_RUNNING_STATS] if affine_only_norms else kinds


def _ignored(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _shape(t) -> Tuple[int, ...]:
    return tuple(int(x) for x in getattr(t, "shape", ()))


@dataclass
class BottomUpLoad:
    """What a file gives the model's bottom-up network (:func:`compare_bottom_up`); keys in the model's names."""
    prefix: str                                 # "backbone.bottom_up." or "backbone."
    model: List[str]                            # the model's bottom-up parameters and buffers
    file: List[str]                             # the file's bottom-up tensors
    loaded: List[str]                           # in both, same shape
    missing: List[str]                          # the model's, not in the file (optional_kinds() apart)
    unexpected: List[str]                       # the file's, not in the model
    shapes: List[Tuple[str, Tuple[int, ...], Optional[Tuple[int, ...]]]]  # (key, file shape, model shape)
    initialised: Dict[str, List[str]] = field(default_factory=dict)  # optional_kinds() name -> keys

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.shapes)

    def short(self) -> str:
        """``backbone.bottom_up: 53/104 tensors loaded (51 missing, 0 unexpected, 0 of another shape)``"""
        return (f"{self.prefix.rstrip('.')}: {len(self.loaded)}/{len(self.model)} tensors loaded ({len(self.missing)} "
                f"missing, {len(self.unexpected)} unexpected, {len(self.shapes)} of another shape)")


def compare_bottom_up(model_state: Mapping[str, Any], file_state: Mapping[str, Any], *,
                      shape_skipped: Sequence[Tuple[str, Tuple[int, ...]]] = (),
                      affine_only_norms: bool = False) -> Optional[BottomUpLoad]:
    """Compare a file's tensors (in the model's names) with the model's bottom-up network.

    ``shape_skipped``: ``(key, shape)`` of file tensors that name matching already dropped for another shape.
    ``affine_only_norms``: the file's norms have no running statistics by construction (Caffe2/MSRA ``.pkl``:
    affine-only); for any other file running statistics the model has and the file lacks are missing tensors.
    None when the model has no backbone or the file holds no bottom-up tensor (ImageNet weights lack the FPN and
    heads; an empty file loads nothing, as the summary says).
    """
    prefix = _backbone_prefix(model_state)
    model = [k for k in model_state if k.startswith(prefix) and not _ignored(k)]
    file = [k for k in file_state if k.startswith(prefix) and not _ignored(k)]
    if not model or not (file or shape_skipped):
        return None
    in_model = set(model)
    loaded, shapes = [], []
    for k in file:
        if k in in_model:
            fs, ms = _shape(file_state[k]), _shape(model_state[k])
            (loaded if fs == ms else shapes).append(k if fs == ms else (k, fs, ms))
    shapes += [(k, tuple(fs), None) for k, fs in shape_skipped]
    missing = [k for k in model if k not in file_state]
    held = set(file) | {k for k, _ in shape_skipped}
    initialised = {}
    for name, pattern in optional_kinds(affine_only_norms):
        if not any(pattern.search(k) for k in held):
            kind = [k for k in missing if pattern.search(k)]
            if kind:
                initialised[name] = kind
                missing = [k for k in missing if not pattern.search(k)]
    return BottomUpLoad(prefix, model, file, loaded, missing, [k for k in file if k not in in_model], shapes,
                        initialised)


def bottom_up_units(model: Any, prefix: str) -> List[str]:
    """Names (relative to ``prefix``) of the model's bottom-up units: the modules of its ``named_stages()``
    (stem, each stage; GhostNet's ``blocks.N``), else its direct children."""
    node = model
    for part in prefix.rstrip(".").split("."):
        node = getattr(node, part, None)
        if node is None:
            return []
    names = {id(m): n for n, m in node.named_modules()}
    if hasattr(node, "named_stages"):
        try:
            return [names[id(m)] for _, mods in node.named_stages() for m in mods if id(m) in names]
        except Exception:  # an interface not quite followed: the children will do
            pass
    return [n for n, _ in node.named_children()]


def _unit_of(rel: str, units: Sequence[str]) -> str:
    for u in units:
        if rel == u or rel.startswith(u + "."):
            return u
    parts = rel.split(".")
    depth = max((u.count(".") + 1 for u in units if u.split(".")[0] == parts[0]), default=1)
    return ".".join(parts[:min(depth, len(parts) - 1) or 1])


def _describe_file(bare: Mapping[str, Any]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``("a ResNet R-50 backbone", {"MODEL.RESNETS.DEPTH": 50})`` for bottom-up tensors in the package's
    names, from the first family whose ``describe_weights`` recognises them; None when none can tell."""
    for fam in FAMILIES.values():
        if fam.describe_weights is None:
            continue
        try:
            described = fam.describe_weights(bare)
        except (ConvertError, KeyError, IndexError, ValueError, TypeError, AttributeError):
            described = None
        if described is not None:
            return described
    return None


def _likely_cause(r: BottomUpLoad, units: Sequence[str], file_state: Mapping[str, Any],
                  out_features_key: str) -> str:
    rel = lambda k: k[len(r.prefix):]  # noqa: E731
    file_keys = r.file + [k for k, _, m in r.shapes if m is None]
    described = _describe_file({rel(k): file_state[k] for k in r.file if k in file_state})
    holds = f" The file holds {described[0]} ({overrides_string(described[1])})." if described else ""
    shared = len(r.loaded) + sum(m is not None for *_, m in r.shapes)
    if shared <= 0.2 * min(len(r.model), len(file_keys)):
        top = lambda keys: listing(sorted({rel(k).split(".")[0] for k in keys}), 6)  # noqa: E731
        return (f"another backbone family or layout: almost no name is shared (the file's bottom-up modules: "
                f"{top(file_keys)}; the model's: {top(r.model)}).{holds}")
    for name, pattern in optional_kinds():
        if r.unexpected and all(pattern.search(k) for k in r.unexpected) and not r.missing:
            return f"the file has {name} that the model has not."
    file_units = {_unit_of(rel(k), units) for k in file_keys}
    model_units = {_unit_of(rel(k), units) for k in r.model}
    if file_units != model_units:
        only_file, only_model = sorted(file_units - model_units), sorted(model_units - file_units)
        sides = "; ".join(s for s in (f"only in the file: {listing(only_file, 6)}" if only_file else "",
                                      f"only in the model: {listing(only_model, 6)}" if only_model else "") if s)
        return (f"other output features: whole stages are on one side only ({sides}). A backbone builds the stages "
                f"up to its last output feature, so the file was made with another {out_features_key}.{holds}")

    def blocks(keys, unit):
        return {rel(k)[len(unit) + 1:].split(".")[0] for k in keys if rel(k).startswith(unit + ".")}

    differ = [(u, len(blocks(file_keys, u)), len(blocks(r.model, u))) for u in units if u in model_units]
    differ = [(u, f, m) for u, f, m in differ if f != m]
    if differ:
        shown = ", ".join(f"{u}: {f} in the file, {m} in the model" for u, f, m in differ)
        return f"another depth: the same stages with other numbers of blocks ({shown}).{holds}"
    if len(r.shapes) >= len(r.missing) + len(r.unexpected):
        return f"another width or variant: the same names with other shapes.{holds}"
    return f"another variant of the backbone (deep stem, avg-down, eSE placement, norm, ...).{holds}"


def check_bottom_up(r: Optional[BottomUpLoad], *, source: str, units: Sequence[str] = (),
                    file_state: Optional[Mapping[str, Any]] = None, policy: str = "error",
                    log: Optional[logging.Logger] = None, resuming: bool = False,
                    out_features_key: str = "OUT_FEATURES (MODEL.<FAMILY>.OUT_FEATURES, or out_features)"
                    ) -> Optional[str]:
    """The rule of the module docstring (4.) on :func:`compare_bottom_up`'s result.

    Raises :class:`WeightsMismatchError` with one message; ``policy="warn"``: one WARNING instead, and the
    returned :meth:`BottomUpLoad.short` says what did not load (None when everything did).
    """
    log = log or logger
    if r is None:
        return None
    if r.initialised:
        log.info("Not in the weights, initialised as intended: " + "; ".join(
            f"{len(keys)} {name}" for name, keys in r.initialised.items()))
    if r.complete:
        return None
    parts = []
    if r.missing:
        parts.append(f"{len(r.missing)} of the model's are not in the file (first: {listing(r.missing, 3)})")
    if r.unexpected:
        parts.append(f"{len(r.unexpected)} of the file's are not in the model (first: {listing(r.unexpected, 3)})")
    if r.shapes:
        shown = "; ".join(f"{k}: file {fs}" + (f" vs model {ms}" if ms is not None else " (skipped by name matching)")
                          for k, fs, ms in r.shapes[:2])
        parts.append(f"{len(r.shapes)} have another shape (first: {shown})")
    cause = _likely_cause(r, units, file_state or {}, out_features_key)
    where = r.prefix.rstrip(".")
    if resuming:
        fix = ("--resume loads the last checkpoint of OUTPUT_DIR, written with another config: restore that run's "
               "settings (its config.yaml in OUTPUT_DIR), or train the new config in another OUTPUT_DIR.")
    else:
        fix = ("use the config the weights were made with (a train_net run writes config.yaml beside its "
               "checkpoints), or weights made for this backbone.")
    msg = (f"{source}: the weights do not fit the model's backbone ({where}): {len(r.loaded)}/{len(r.model)} of its "
           f"parameters and buffers are in the file with the same shape; {'; '.join(parts)}. Likely cause: {cause} "
           f"Fix: {fix}")
    if policy == "warn":
        log.warning(msg + " Weights check 'warn': loading what fits; the rest keeps its initialisation.")
        return r.short()
    raise WeightsMismatchError(msg + " To load what fits anyway (the rest keeps its initialisation): "
                                     "MODEL.WEIGHTS_CHECK warn (lazy_train: train.weights_check=warn).")


def count_non_finite(state: Mapping[str, Any]) -> List[str]:
    """Names of floating-point tensors in ``state`` (a state dict) that hold NaN or Inf."""
    bad = []
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            bad.append(k)
    return bad


def _group(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "backbone" and len(parts) > 2 and parts[1] == "bottom_up":
        return "backbone.bottom_up"
    return parts[0] if len(parts) > 1 else key


def load_summary(model_keys: Sequence[str], params: Set[str], not_loaded: Set[str]) -> str:
    """One line: per top-level module (``backbone.bottom_up`` apart), parameters and buffers loaded / total.

    ``num_batches_tracked`` counters and detectron2's ``pixel_mean``/``pixel_std`` (set from the
    config) are not counted.
    """
    groups = {}
    for k in model_keys:
        if k.endswith("num_batches_tracked") or k in ("pixel_mean", "pixel_std"):
            continue
        g = groups.setdefault(_group(k), [0, 0, 0, 0])  # params loaded, params, buffers loaded, buffers
        i = 0 if k in params else 2
        g[i + 1] += 1
        g[i] += k not in not_loaded
    parts = []
    for name, (pl, pt, bl, bt) in groups.items():
        text = f"{pl}/{pt} parameters"
        if bt:
            text += f", {bl}/{bt} buffers"
        text += " loaded" if pl or bl else " (initialised)"
        parts.append(f"{name}: {text}")
    return "; ".join(parts)


def read_metadata(path: str) -> Optional[Mapping]:
    """The ``d2_backbones`` metadata of a weights file (None when it has none)."""
    try:
        return _metadata(path)
    except CheckpointReadError:
        return None
