"""Any timm model that supports ``features_only`` as a detectron2 backbone (the ``timm`` family).

``MODEL.BACKBONE.NAME: build_d2b_timm_fpn_backbone`` and ``MODEL.TIMM.NAME: <any timm model name>``;
everything else has defaults that work for any such model. The network is timm's own
``timm.create_model(name, features_only=True, out_indices=...)``; this module adds what detectron2 and
the package's contract need around it, reading everything from timm's ``feature_info``:

* **Features.** A feature at stride 2 is ``"stem"``, at stride 4/8/16/32 ``"stage2".."stage5"`` (log2 of
  the stride), as in the other families; at a stride where timm lists several features (ViT's blocks,
  all at stride 16) the last one is taken. Channels and strides come from ``feature_info``;
  ``output_shape()`` is exact and every output is ``ceil(H / stride)`` high.
* **Freezing units.** One forward pass on a small input at build records, with forward hooks, the order
  in which the modules holding parameters first run and where each feature is produced. ``"stem"`` is
  everything that runs before the module producing the first stride >= 4 feature; then one unit per
  stage: the modules running after the previous feature up to its own. ``freeze(k)`` sets
  ``requires_grad=False`` on the first ``k`` units and makes only their BatchNorms detectron2
  ``FrozenBatchNorm2d`` (timm's ``BatchNormAct2d`` keeps its activation: :class:`FrozenBatchNormAct2d`).
* **Norms.** ``norm=""`` or ``"BN"`` keeps timm's norms; ``"FrozenBN"``, ``"SyncBN"``/``"nnSyncBN"``,
  ``"naiveSyncBN"``, ``"GN"`` convert every BatchNorm in place, keeping activations fused into a norm
  (timm's ``BatchNormAct2d``) and the parameter names (weights load either way). Other norms (LayerNorm
  of ConvNeXt/Swin/ViT) are left as they are.
* **Input sizes.** timm's dynamic-size options are passed where the model takes them
  (``dynamic_img_size``, ``dynamic_img_pad``, ``strict_img_size=False``). The build then tries the
  model on an odd input size; a model that needs multiples of some size (patch or window sizes) gets its
  input zero-padded to the smallest multiple that works and its outputs cropped back; a model that runs
  only at one fixed size (CoaT, CoAtNet, models with a global relative-position table) is refused at
  build with the reason.
* ``with_cp``: gradient checkpointing per block (the largest modules inside one unit) with
  :func:`~d2_backbones.layers.checkpoint_keep_bn_stats`: same outputs, gradients and BatchNorm statistics.
* Re-parameterisable models (MobileOne, RepViT, FastViT, RepVGG, ...) are re-parameterised by
  ``d2_backbones.optimize_for_inference`` through :meth:`TimmBackbone.prepare_for_inference` (timm's
  ``reparameterize_model``), which also folds every BatchNorm that is the only user of a convolution's
  output into that convolution.

timm is an optional dependency (``pip install 'd2_backbones[timm]'``): without it ``import d2_backbones``
works, the family and its config keys exist, and building raises an ``ImportError`` saying
``pip install timm``. Weights: ``python -m d2_backbones.convert SRC DST --format timm --arch <timm name>``
(see ``docs/timm.md``).

Example::

    >>> net = TimmBackbone("resnet18", norm="BN")
    >>> {k: (v.channels, v.stride) for k, v in net.output_shape().items()}
    {'stage2': (64, 4), 'stage3': (128, 8), 'stage4': (256, 16), 'stage5': (512, 32)}
    >>> [n for n, _ in net.named_stages()]
    ['stem', 'stage2', 'stage3', 'stage4', 'stage5']
"""
import collections
import difflib
import logging
import math
import os
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from detectron2.config import CfgNode as CN
from detectron2.layers import FrozenBatchNorm2d, get_norm
from detectron2.modeling.backbone import Backbone

from .errors import arg_key, check_bools, check_freeze_at, check_out_features, config_error
from .families import BACKBONE_KEYS, Family, register_family
from .layers import CheckedNorm, NormEvalMixin, checkpoint_keep_bn_stats
from .weights.formats import ConvertError, Converted, WeightFormat

try:  # the real timm package (imports are absolute); optional
    import timm as _timm
except ImportError:  # pragma: no cover - exercised in a subprocess by tests/test_timm.py
    _timm = None

__all__ = ["TimmBackbone", "FrozenBatchNormAct2d", "TIMM_FEATURES", "TIMM_NORMS", "pixel_config",
           "convert_timm_state_dict", "add_timm_config"]

logger = logging.getLogger("d2_backbones")

TIMM_FEATURES = ("stem", "stage2", "stage3", "stage4", "stage5")
_STRIDES = {2: "stem", 4: "stage2", 8: "stage3", 16: "stage4", 32: "stage5"}
TIMM_NORMS = ("", "BN", "FrozenBN", "SyncBN", "nnSyncBN", "naiveSyncBN", "GN")
DEFAULT_MODEL = "resnet18"
# timm's options for variable input sizes, tried in this order; a model whose constructor does not take one
# raises TypeError before building anything, and the next set is tried.
_SIZE_OPTIONS = ({"dynamic_img_size": True, "dynamic_img_pad": True}, {"dynamic_img_size": True},
                 {"strict_img_size": False}, {})
_PROBE = (65, 99)  # odd, non-square: what the build tries the model on (outputs must be ceil(size / stride))
_PAD_CANDIDATES = (1, 32, 64)  # then multiples of the model's default input size (window-based models)


def _require_timm(name) -> Any:
    if _timm is None:
        raise ImportError(f"{arg_key('name')}={name!r} needs the timm package, which is not installed. "
                          f"Fix: pip install timm (or pip install 'd2_backbones[timm]').")
    return _timm


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """detectron2's ``FrozenBatchNorm2d`` followed by the dropout and activation of the timm
    ``BatchNormAct2d`` it replaces (``drop``, ``act`` children without parameters), so the state-dict names
    stay ``weight, bias, running_mean, running_var`` and ``optimize_for_inference`` folds it like any
    FrozenBN. Written out (no ``super()``) so TorchScript compiles it."""

    def __init__(self, num_features: int, eps: float = 1e-5, act: Optional[nn.Module] = None,
                 drop: Optional[nn.Module] = None):
        super().__init__(num_features, eps)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        x = x * scale.reshape(1, -1, 1, 1).to(x.dtype) + bias.reshape(1, -1, 1, 1).to(x.dtype)
        return self.act(self.drop(x))


_ACT_CLASSES: Dict[type, type] = {}


def _norm_then_act(base: type) -> type:
    """A subclass of norm class ``base`` that applies ``drop`` and ``act`` children after the norm (the
    layout of timm's ``BatchNormAct2d``; parameter names unchanged)."""
    if base not in _ACT_CLASSES:
        def forward(self, x):
            return self.act(self.drop(base.forward(self, x)))

        _ACT_CLASSES[base] = type(f"{base.__name__}Act", (base,), {"forward": forward, "__module__": __name__})
    return _ACT_CLASSES[base]


def _frozen(m: nn.Module) -> nn.Module:
    """``m`` (a BatchNorm, possibly with a fused activation) as a detectron2 FrozenBatchNorm2d."""
    if isinstance(m, FrozenBatchNorm2d) or not isinstance(m, _BatchNorm):
        return m
    act, drop = getattr(m, "act", None), getattr(m, "drop", None)
    new = FrozenBatchNormAct2d(m.num_features, m.eps, act, drop) if act is not None else \
        FrozenBatchNorm2d(m.num_features, m.eps)
    with torch.no_grad():
        if m.affine:
            new.weight.copy_(m.weight.detach())
            new.bias.copy_(m.bias.detach())
        if m.running_mean is not None:
            new.running_mean.copy_(m.running_mean)
            new.running_var.copy_(m.running_var)
    return new.to(m.weight.device if m.affine else m.running_mean.device)


def _converted(m: _BatchNorm, norm: str, key: str) -> nn.Module:
    """BatchNorm ``m`` as detectron2's ``get_norm(norm)`` layer, its tensors and fused activation kept."""
    if norm == "FrozenBN":
        return _frozen(m)
    new = CheckedNorm(norm, key)(m.num_features)
    new.load_state_dict({k: v for k, v in m.state_dict().items() if k in new.state_dict()}, strict=False)
    if getattr(m, "act", None) is not None:
        new.__class__ = _norm_then_act(type(new))
        new.drop, new.act = getattr(m, "drop", nn.Identity()), m.act
    return new


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _own_tensors(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))


def _stride_name(stride: int) -> Optional[str]:
    return _STRIDES.get(int(stride))


def _create_kwargs(value, key: str) -> Dict[str, Any]:
    """``create_kwargs`` as a dict: a dict (Python configs) or a flat ``[name, value, ...]`` list (yacs)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    items = list(value) if isinstance(value, (list, tuple)) else None
    if items is None or len(items) % 2 or not all(isinstance(k, str) for k in items[::2]):
        raise config_error(key, value, problem="must be a flat list of argument names and values",
                           fix=f"write it as [name, value, ...], e.g. ['drop_path_rate', 0.1] (a dict in Python "
                               f"configs)")
    return dict(zip(items[::2], items[1::2]))


class _Uses(TorchFunctionMode):
    """Counts, per tensor, the torch functions that take it as an argument (shape queries aside)."""

    _QUERIES = {"__get__", "dim", "size", "numel", "stride", "is_contiguous", "data_ptr", "storage_offset", "__len__",
                "element_size", "is_floating_point", "ndimension", "get_device"}

    def __init__(self):
        super().__init__()
        self.uses = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in self._QUERIES:
            for a in list(args) + list(kwargs.values()):
                for t in (a if isinstance(a, (list, tuple)) else (a,)):
                    if isinstance(t, torch.Tensor):
                        self.uses[id(t)] += 1
        return func(*args, **kwargs)


class TimmBackbone(NormEvalMixin, Backbone):
    """A timm model's ``features_only`` network as a detectron2 :class:`Backbone`.

    Implements :class:`d2_backbones.families.FamilyBackbone`.

    Args:
        name: a timm model name that supports ``features_only`` (``timm.list_models()``).
        in_channels: input image channels (timm's ``in_chans``).
        norm: ``""``/``"BN"`` (keep timm's norms), ``"FrozenBN"``, ``"SyncBN"``, ``"nnSyncBN"``,
            ``"naiveSyncBN"``, ``"GN"``: what every BatchNorm of the model becomes.
        out_features: names from ``stem, stage2, stage3, stage4, stage5`` that the model has; empty (default):
            every one of ``stage2..stage5`` it has.
        freeze_at: 0 nothing, 1 the stem, k the stem and the first k-1 stages.
        norm_eval: keep BatchNorm statistics fixed in train mode (re-applied on ``.train()``).
        with_cp: gradient checkpointing per block.
        create_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"drop_path_rate": 0.1}``), or a flat
            ``[name, value, ...]`` list as yacs stores it.
    """

    __jit_unused_properties__ = ["stage_names", "body_in_channels"]
    feature_names = TIMM_FEATURES
    conv_norm_pairs = ()

    def __init__(
        self,
        name: str = DEFAULT_MODEL,
        *,
        in_channels: int = 3,
        norm: str = "FrozenBN",
        out_features: Sequence[str] = (),
        freeze_at: int = 0,
        norm_eval: bool = False,
        with_cp: bool = False,
        create_kwargs: Union[Mapping[str, Any], Sequence, None] = None,
    ):
        super().__init__()
        key = arg_key
        timm = _require_timm(name)
        check_bools(norm_eval=norm_eval, with_cp=with_cp)
        if not isinstance(name, str) or not timm.is_model(name):
            close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.5)
            raise config_error(key("name"), name, close or None, problem="is not a timm model name",
                               fix=f"set {key('name')} to a name from timm.list_models()"
                                   + (" (nearest first above)" if close else ""))
        if not isinstance(norm, str) or norm not in TIMM_NORMS:
            raise config_error(key("norm"), norm, TIMM_NORMS, nearest=isinstance(norm, str),
                               fix=f"set {key('norm')} to one of them ('' keeps timm's norms)")
        user_kwargs = _create_kwargs(create_kwargs, key("create_kwargs"))
        self.name = name
        self.norm, self.norm_eval, self.with_cp, self.freeze_at = norm, bool(norm_eval), bool(with_cp), freeze_at
        self.create_kwargs = user_kwargs
        self.pretrained_cfg = dict(timm.models.get_pretrained_cfg(name).to_dict()) \
            if timm.models.get_pretrained_cfg(name) is not None else {}

        # 1) the features network with every feature timm lists, to read feature_info: on the meta device
        #    (no memory, no weight initialisation) when the model allows it
        try:
            with torch.device("meta"):
                body, size_kwargs = self._create(timm, name, in_channels, user_kwargs, None)
        except (RuntimeError, NotImplementedError, AssertionError):
            body, size_kwargs = self._create(timm, name, in_channels, user_kwargs, None)
        info = body.feature_info.info
        available: Dict[str, int] = {}  # our name -> feature_info index (the last one at that stride)
        for i, entry in enumerate(info):
            fname = _stride_name(entry["reduction"])
            if fname is not None:
                available[fname] = i
        have = [f for f in TIMM_FEATURES if f in available]
        if not have:
            raise config_error(key("name"), name, problem=f"has no feature at stride 2, 4, 8, 16 or 32 (timm's "
                               f"feature_info strides: {[e['reduction'] for e in info]})",
                               fix="choose a model with a feature pyramid or a stride-16/32 output")
        default = [f for f in have if f != "stem"] or have
        out_features = list(out_features) if out_features is not None and len(out_features) else default
        hint = f" ({name} has {', '.join(have)}; the others are not in its timm feature_info)"
        out_features = check_out_features(out_features, have, key("out_features"), f"timm model {name}", hint)
        out_features = [f for f in have if f in out_features]
        last = max(have.index(f) for f in out_features)
        built = have[: last + 1]  # the units: stem (always) + the stages up to the last output
        stage_names = [f for f in built if f != "stem"]
        check_freeze_at(freeze_at, len(stage_names) + 1, ["stem"] + stage_names, key("freeze_at"),
                        f"timm model {name}", stem_note=": what runs before the first stride-4 stage")

        # 2) keep only the indices needed (stem/stage boundaries and outputs); re-create if timm's default differs
        first_stage = next((i for i, e in enumerate(info) if e["reduction"] >= 4), None)
        wanted = sorted({available[f] for f in built} | ({first_stage} if first_stage is not None else set()))
        if tuple(body.feature_info.out_indices) != tuple(wanted) or any(p.is_meta for p in body.parameters()):
            body, _ = self._create(timm, name, in_channels, {**user_kwargs, **size_kwargs}, tuple(wanted))
        self.body = body
        self.size_kwargs = size_kwargs
        positions = {idx: pos for pos, idx in enumerate(wanted)}
        self._pos = {f: positions[available[f]] for f in out_features}
        self._out_features = out_features
        self._out_feature_channels = {f: int(info[available[f]]["num_chs"]) for f in out_features}
        self._out_feature_strides = {f: int(info[available[f]]["reduction"]) for f in out_features}
        self._stage_names = stage_names
        self._feature_modules = {f: info[available[f]]["module"] for f in built}
        self._first_stage_module = info[first_stage]["module"] if first_stage is not None else None

        # 3) norms, then the input size the model runs at, the units, checkpointing and freezing
        self._convert_norms(norm, key("norm"))
        self._nhwc = False
        self._pad_to = 1
        self._units = self._trace(positions, [available[f] for f in built], built)
        self._wrapped: List[str] = []
        if self.with_cp:
            self._enable_checkpointing()
        self.freeze(freeze_at)
        self.train()

    # ------------------------------------------------------------------------------------------ building
    @staticmethod
    def _create(timm, name, in_channels, user_kwargs, out_indices):
        """``timm.create_model(features_only=True)`` with the first size options it takes; returns ``(model,
        size options used)``. With ``out_indices=None`` the size options are tried, else taken from the kwargs."""
        options = _SIZE_OPTIONS if out_indices is None else ({},)
        last_error = None
        for opts in options:
            kwargs = {**opts, **user_kwargs}
            if out_indices is not None:
                kwargs["out_indices"] = out_indices
            try:
                model = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_channels, **kwargs)
            except TypeError as e:
                if any(f"'{k}'" in str(e) for k in opts):
                    last_error = e
                    continue  # the model does not take this size option
                raise config_error(arg_key("create_kwargs"), user_kwargs,
                                   problem=f"is refused by timm.create_model({name!r}): {e}",
                                   fix="remove or correct the arguments the model does not take") from None
            except RuntimeError as e:
                if "features_only not implemented" in str(e) or "feature" in str(e).lower():
                    raise config_error(arg_key("name"), name, problem=f"does not support timm's features_only ({e})",
                                       fix="choose a model that does, e.g. resnet50, efficientnet_b0, convnext_tiny, "
                                           "swin_tiny_patch4_window7_224") from None
                raise
            return model, {k: v for k, v in opts.items() if k not in user_kwargs}
        raise RuntimeError(f"timm.create_model({name!r}) failed: {last_error}")  # pragma: no cover

    def _convert_norms(self, norm: str, key: str) -> None:
        if norm in ("", "BN"):
            return
        for path, m in list(self.body.named_modules()):
            if isinstance(m, _BatchNorm) and not isinstance(m, FrozenBatchNorm2d):
                _set_module(self.body, path, _converted(m, norm, key))

    @torch.jit.unused
    def _run_body(self, x: torch.Tensor) -> List[torch.Tensor]:
        out = self.body(x)
        return list(out.values()) if isinstance(out, dict) else list(out)

    def _trace(self, positions, indices, built) -> Dict[str, List[str]]:
        """One eval forward on a small input (padded if the model needs it) with hooks: the input size
        rule, the output layout, and the module paths of each freezing unit."""
        clock = [0]
        entered: Dict[str, int] = {}
        exited: Dict[str, int] = {}
        outputs: Dict[int, Tuple[str, int]] = {}  # data_ptr of a module's output -> (path, exit time)
        handles = []

        def pre(path):
            def hook(_m, _inp):
                clock[0] += 1
                entered.setdefault(path, clock[0])
            return hook

        def post(path):
            def hook(_m, _inp, out):
                clock[0] += 1
                exited[path] = clock[0]
                if isinstance(out, torch.Tensor):
                    outputs[out.data_ptr()] = (path, clock[0])
            return hook

        for path, m in self.body.named_modules():
            if path:
                handles.append(m.register_forward_pre_hook(pre(path)))
                handles.append(m.register_forward_hook(post(path)))
        was_training = self.body.training
        self.body.eval()
        errors = []
        feats = None
        try:
            candidates = list(_PAD_CANDIDATES)
            size = self.pretrained_cfg.get("input_size") or (3, 224, 224)
            candidates += [max(size[1:]), 2 * max(size[1:])]
            for pad in candidates:
                h, w = (-(-s // pad) * pad for s in _PROBE)
                entered.clear(), exited.clear(), outputs.clear()
                try:
                    with torch.no_grad():  # a second, larger size first: fixed-size models fail there
                        self._run_body(torch.zeros(1, self.body_in_channels, h + max(pad, 32), w))
                        entered.clear(), exited.clear(), outputs.clear()
                        feats = self._run_body(torch.zeros(1, self.body_in_channels, h, w))
                except Exception as e:  # noqa: BLE001 - any failure means: not at this size
                    errors.append(f"{h}x{w}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    continue
                ok, nhwc = self._check_sizes(feats, positions, indices, h, w)
                if ok:
                    self._pad_to, self._nhwc = pad, nhwc
                    break
                errors.append(f"{h}x{w}: outputs {[tuple(f.shape) for f in feats]} do not match feature_info")
                feats = None
        finally:
            for hd in handles:
                hd.remove()
            self.body.train(was_training)
        if feats is None:
            raise config_error(
                arg_key("name"), self.name,
                problem=f"runs only at a fixed input size ({'x'.join(map(str, size[1:]))}), not on detectron2's "
                        f"variable image sizes, with or without timm's dynamic-size options and zero padding "
                        f"(tried {'; '.join(errors[-3:])})",
                fix="choose a model that takes variable sizes (a CNN, swin_*, vit_* with dynamic_img_size, ...); "
                    "docs/timm.md lists the models refused and why")
        return self._units_from(entered, exited, outputs, feats, positions, indices, built)

    @property
    def body_in_channels(self) -> int:
        conv = next((m for m in self.body.modules() if isinstance(m, nn.Conv2d)), None)
        return conv.in_channels if conv is not None else 3

    def _check_sizes(self, feats, positions, indices, h, w) -> Tuple[bool, bool]:
        info = self.body.feature_info.info
        nhwc = False
        for idx in indices:
            f = feats[positions[idx]]
            c, s = info[idx]["num_chs"], info[idx]["reduction"]
            if f.dim() != 4:
                return False, False
            if f.shape[1] != c and f.shape[-1] == c:
                nhwc = True
                f = f.permute(0, 3, 1, 2)
            if f.shape[1] != c:
                return False, False
            for got, full in ((f.shape[2], h), (f.shape[3], w)):
                if got != math.ceil(full / s):  # padded inputs are multiples of the stride: exact
                    return False, False
        return True, nhwc

    def _resolve(self, name: str) -> Optional[str]:
        paths = dict(self.body.named_modules())
        for cand in (name, name.replace(".", "_"), "model." + name, "model." + name.replace(".", "_")):
            if cand in paths:
                return cand
        return None

    def _units_from(self, entered, exited, outputs, feats, positions, indices, built) -> Dict[str, List[str]]:
        ends = {}
        for fname, idx in zip(built, indices):
            path = self._resolve(self._feature_modules[fname])
            if path is None or path not in exited:  # e.g. features computed by hooks of another module
                hit = outputs.get(feats[positions[idx]].data_ptr())
                ends[fname] = hit[1] if hit else max(exited.values())
            else:
                ends[fname] = exited[path]
        first = self._resolve(self._first_stage_module) if self._first_stage_module else None
        stem_end = entered.get(first, None) if first else None
        if stem_end is None:
            stem_end = ends.get("stem", 0)
        stem_end = max(stem_end, ends.get("stem", 0))
        units: Dict[str, List[str]] = {f: [] for f in ["stem"] + self._stage_names}
        bounds = [("stem", stem_end)] + [(f, ends[f]) for f in self._stage_names]
        for path, m in self.body.named_modules():
            if not path or not _own_tensors(m):
                continue
            t = entered.get(path)
            unit = bounds[-1][0]
            if t is not None:
                unit = next((f for f, end in bounds if t <= end), bounds[-1][0])
            units[unit].append(path)
        self._entered = entered
        return units

    def _enable_checkpointing(self) -> None:
        """Checkpoint the largest modules whose tensors all lie in one unit (the blocks)."""
        owner = {p: u for u, paths in self._units.items() for p in paths}
        inside: Dict[str, Optional[str]] = {}
        for path, m in self.body.named_modules():
            units = {owner[(path + "." + p) if p and path else (p or path)] for p, sub in m.named_modules()
                     if ((path + "." + p) if p and path else (p or path)) in owner}
            inside[path] = units.pop() if len(units) == 1 else None
        for path, m in self.body.named_modules():
            if not path or inside.get(path) is None or path not in self._entered:
                continue
            parent = path.rpartition(".")[0]
            if parent and inside.get(parent) is not None and parent in self._entered:
                continue  # its parent is checkpointed as a whole
            if not any(True for _ in m.parameters()):
                continue
            m.forward = _CheckpointedForward(m, type(m).forward.__get__(m))
            self._wrapped.append(path)

    # ------------------------------------------------------------------------------------------ the contract
    def freeze(self, freeze_at: int = 0) -> "TimmBackbone":
        """``requires_grad=False`` for the stem and the first ``freeze_at - 1`` stages; only their BatchNorms
        become FrozenBN (activations fused into a norm kept)."""
        for name, paths in list(self._units.items())[:freeze_at]:
            for path in paths:
                m = self.body.get_submodule(path)
                for p in m.parameters(recurse=False):
                    p.requires_grad = False
                if isinstance(m, _BatchNorm):
                    _set_module(self.body, path, _frozen(m))
        return self

    @property
    def stage_names(self) -> List[str]:
        """The built stages after the stem, in network order."""
        return list(self._stage_names)

    def named_stages(self) -> List[Tuple[str, List[nn.Module]]]:
        """``[("stem", [modules]), ("stage2", [...]), ...]``: the modules holding tensors of each unit."""
        return [(name, [self.body.get_submodule(p) for p in paths]) for name, paths in self._units.items()]

    def describe(self) -> str:
        """The variant, e.g. ``"timm resnet18"``."""
        parts = [f"{k}={v}" for k, v in {**self.size_kwargs, **self.create_kwargs}.items()]
        if self._pad_to > 1:
            parts.append(f"input padded to multiples of {self._pad_to}")
        return f"timm {self.name}" + (f" ({', '.join(parts)})" if parts else "")

    @torch.jit.unused
    def prepare_for_inference(self) -> List[str]:
        """Called by :func:`d2_backbones.optimize_for_inference` (eval mode, weights loaded): re-parameterise
        (timm's ``reparameterize_model``: MobileOne, RepViT, FastViT, RepVGG, ...), then fold every BatchNorm
        whose input is a convolution's output used by nothing else into that convolution. Returns the
        folded norms' names (relative to this module)."""
        from timm.utils.model import reparameterize_model

        # timm's re-parameterisation fuses identity branches that must be nn.BatchNorm2d: frozen ones go back
        # (in eval mode a BatchNorm2d with the same tensors computes the same)
        for path, m in list(self.body.named_modules()):
            if type(m) in (FrozenBatchNorm2d, FrozenBatchNormAct2d):
                bn = nn.BatchNorm2d(m.num_features, eps=m.eps).eval()
                bn.load_state_dict({k: getattr(m, k) for k in ("weight", "bias", "running_mean", "running_var")},
                                   strict=False)
                if isinstance(m, FrozenBatchNormAct2d):
                    bn.__class__ = _norm_then_act(nn.BatchNorm2d)
                    bn.drop, bn.act = m.drop, m.act
                _set_module(self.body, path, bn)
        reparameterize_model(self.body, inplace=True)
        convs, norms, keep = {}, {}, []
        handles = []
        uses = _Uses()

        def conv_hook(path):
            def hook(_m, _inp, out):
                convs[id(out)] = path
                uses.uses[id(out)] = 0  # counted from its creation on (ids of freed tensors are reused)
                keep.append(out)  # alive until the end: its id stays unique
            return hook

        def norm_hook(path):
            def hook(_m, inp):
                if inp and isinstance(inp[0], torch.Tensor):
                    # the input's id names a conv output only while both are alive: resolve it now, and keep
                    # the input alive so that no later tensor takes its id
                    keep.append(inp[0])
                    norms.setdefault(path, (convs.get(id(inp[0])), id(inp[0])))
            return hook

        for path, m in self.body.named_modules():
            if isinstance(m, nn.Conv2d) and type(m).forward is not None:
                handles.append(m.register_forward_hook(conv_hook(path)))
            elif isinstance(m, (_BatchNorm, FrozenBatchNorm2d)):
                handles.append(m.register_forward_pre_hook(norm_hook(path)))
        h, w = (-(-s // self._pad_to) * self._pad_to for s in _PROBE)
        try:
            with torch.no_grad(), uses:
                self._run_body(torch.zeros(1, self.body_in_channels, h, w))
        finally:
            for hd in handles:
                hd.remove()
        folded = []
        for npath, (cpath, tid) in norms.items():
            if cpath is None or uses.uses[tid] != 1:
                continue
            conv, norm = self.body.get_submodule(cpath), self.body.get_submodule(npath)
            if conv.weight.shape[0] != norm.num_features or norm.running_mean is None:
                continue
            weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_mean)
            bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
            w_new, b_new = torch.nn.utils.fusion.fuse_conv_bn_weights(
                conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, weight, bias)
            conv.weight, conv.bias = w_new, b_new
            act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
            rest = [m for m in (drop, act) if m is not None and not isinstance(m, nn.Identity)]
            _set_module(self.body, npath, rest[0] if len(rest) == 1 else nn.Sequential(*rest))
            folded.append(f"body.{npath}")
        return folded

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"TimmBackbone takes an (N, C, H, W) tensor, got shape {x.shape}")
        h, w = x.shape[-2], x.shape[-1]
        pad = self._pad_to
        if pad > 1 and (h % pad != 0 or w % pad != 0):
            x = F.pad(x, [0, (pad - w % pad) % pad, 0, (pad - h % pad) % pad])
        feats: List[torch.Tensor] = self.body(x)  # timm's features networks return a list, in out_indices order
        out: Dict[str, torch.Tensor] = {}
        for name in self._out_features:
            f = feats[self._pos[name]]
            if self._nhwc:
                f = f.permute(0, 3, 1, 2)
            s = self._out_feature_strides[name]
            out[name] = f[:, :, : (h + s - 1) // s, : (w + s - 1) // s]
        return out


class _CheckpointedForward:
    """A module's ``forward`` run under :func:`~d2_backbones.layers.checkpoint_keep_bn_stats` while training with
    autograd on (the module keeps its parameter names: only its instance ``forward`` is replaced)."""

    def __init__(self, module: nn.Module, forward: Callable):
        self.module, self.forward = module, forward

    def __call__(self, *args, **kwargs):
        if self.module.training and torch.is_grad_enabled():
            return checkpoint_keep_bn_stats(lambda *a: self.forward(*a, **kwargs), self.module, *args)
        return self.forward(*args, **kwargs)

    def __deepcopy__(self, memo):
        import copy

        module = copy.deepcopy(self.module, memo)
        return _CheckpointedForward(module, type(module).forward.__get__(module))


# ---------------------------------------------------------------------------------------------
# input settings and weights
# ---------------------------------------------------------------------------------------------
def pixel_config(name: str) -> Dict[str, Any]:
    """The input settings of timm model ``name``'s pretrained weights, as config values.

    Example::

        >>> pixel_config("resnet18")
        {'INPUT.FORMAT': 'RGB', 'MODEL.PIXEL_MEAN': [123.675, 116.28, 103.53], 'MODEL.PIXEL_STD': [58.395, 57.12, 57.375]}
        >>> pixel_config("vit_small_patch16_224")["MODEL.PIXEL_MEAN"]
        [127.5, 127.5, 127.5]
    """
    timm = _require_timm(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise config_error("MODEL.TIMM.NAME", name, problem="has no pretrained config in timm",
                           fix="use a name from timm.list_models(pretrained=True)")
    mean = [round(float(v) * 255, 4) for v in cfg.mean]
    std = [round(float(v) * 255, 4) for v in cfg.std]
    return {"INPUT.FORMAT": "RGB", "MODEL.PIXEL_MEAN": mean, "MODEL.PIXEL_STD": std}


def convert_timm_state_dict(state_dict: Mapping[str, torch.Tensor], name: str,
                            create_kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[Dict[str, torch.Tensor],
                                                                                       List[str], TimmBackbone]:
    """A timm model's state dict (``timm.create_model(name).state_dict()`` names, or timm's hub files) in the
    names of :class:`TimmBackbone` (``body.*``): returns ``(tensors, dropped keys, the model they fit)``.

    The tensors are written to a temporary ``.safetensors`` file and timm loads that file into the
    features network itself (``pretrained_cfg_overlay=dict(file=...)``: timm applies the model's own
    ``checkpoint_filter_fn`` and maps to the features network's names; a safetensors file holds only
    tensors, nothing in it runs). Tensors the features network has no place for (the classifier, layers
    after the last feature) are the dropped keys.
    """
    timm = _require_timm(name)
    from safetensors.torch import save_file

    sd = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    model = TimmBackbone(name, norm="", out_features=None, create_kwargs=dict(create_kwargs or {}))
    ours = model.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
        try:
            loaded = timm.create_model(
                name, pretrained=True, features_only=True, pretrained_cfg_overlay=dict(file=path),
                out_indices=tuple(model.body.feature_info.out_indices), **model.size_kwargs, **model.create_kwargs)
        except RuntimeError as e:
            raise ConvertError(f"the checkpoint does not fit timm model {name!r}: {str(e).splitlines()[0][:400]} "
                               f"Fix: pass the timm name the weights were saved from as --arch.") from None
    bare = {"body." + k: v for k, v in loaded.state_dict().items() if not k.endswith("num_batches_tracked")}
    # the features network renames nothing it keeps: a source tensor is used if an equal tensor is in `bare`
    def fingerprint(t):
        return tuple(t.shape), float(t.double().sum()), float(t.double().abs().sum())

    used = {fingerprint(v) for v in bare.values()}
    dropped = sorted(k for k, v in sd.items() if k.endswith("num_batches_tracked") or fingerprint(v) not in used)
    missing = [k for k in ours if k not in bare and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConvertError(f"timm model {name!r} loaded into a network whose tensors differ from d2_backbones' "
                           f"(missing {missing[:3]}).")
    return bare, dropped, model


def _convert_timm(fmt: str, src: Dict[str, torch.Tensor], extras: Mapping, *, arch: Optional[str],
                  style: Optional[str]) -> Converted:
    if not arch:
        raise ConvertError("a timm checkpoint cannot be recognised from its keys: name the model it was saved "
                           "from with --arch, e.g. --format timm --arch efficientnet_b0.")
    if _timm is None:
        raise ConvertError("converting timm weights needs the timm package. Fix: pip install timm.")
    if not _timm.is_model(arch):
        close = difflib.get_close_matches(arch, _timm.list_models(), n=5, cutoff=0.5)
        raise ConvertError(f"--arch {arch!r} is not a timm model name" + (f"; nearest: {', '.join(close)}" if close
                                                                         else "") + ".")
    bare, dropped, model = convert_timm_state_dict(src, arch)
    config = {"MODEL.TIMM.NAME": arch, **pixel_config(arch)}
    return Converted(bare, model, config, {"arch": f"timm {arch}", "name": arch}, dropped, {}, {}, [])


def _never(_sd) -> bool:
    """A timm model's file cannot be recognised from its keys; ``--format timm --arch NAME`` names it."""
    return False


def describe_timm_weights(bare: Mapping[str, torch.Tensor]) -> Optional[Tuple[str, Dict]]:
    """``("a timm backbone", {})`` for tensors in this family's names (``body.*``); None otherwise."""
    if bare and all(k.startswith("body.") for k in bare):
        return "a timm features backbone", {}
    return None


# =============================================================================================
# the family: config section, builder arguments, weight formats, the record
# =============================================================================================
def add_timm_config(_C: CN) -> None:
    """``MODEL.TIMM`` keys."""
    _C.MODEL.TIMM = CN()
    # Any timm model name that supports features_only (timm.list_models()), e.g. "efficientnet_b0",
    # "convnext_tiny", "regnety_016", "swin_tiny_patch4_window7_224". docs/timm.md lists the tested ones.
    _C.MODEL.TIMM.NAME = DEFAULT_MODEL
    # Features to return: "stem" (stride 2), "stage2".."stage5" (strides 4, 8, 16, 32), only those the model
    # has in timm's feature_info. [] = every one of stage2..stage5 the model has.
    _C.MODEL.TIMM.OUT_FEATURES = []
    # What every BatchNorm of the model becomes: "" or "BN" (keep timm's), "FrozenBN" (detectron2's default
    # for pretrained backbones), "SyncBN", "nnSyncBN", "naiveSyncBN", "GN" (32 groups). Activations fused
    # into timm's BatchNormAct2d are kept; other norms (LayerNorm) are left as they are.
    _C.MODEL.TIMM.NORM = "FrozenBN"
    # Keep BatchNorm running statistics fixed while training (mmdet norm_eval). Options: True, False.
    _C.MODEL.TIMM.NORM_EVAL = False
    # Gradient checkpointing per block: same outputs and gradients, less memory. Options: True, False.
    _C.MODEL.TIMM.WITH_CP = False
    # Extra timm.create_model arguments as a flat [name, value, ...] list, e.g. ["drop_path_rate", 0.1].
    _C.MODEL.TIMM.CREATE_KWARGS = []


TIMM_FAMILY = register_family(Family(
    name="timm", build=TimmBackbone, config_node="MODEL.TIMM", add_config_keys=add_timm_config,
    arg_keys={"name": "MODEL.TIMM.NAME", "norm": "MODEL.TIMM.NORM", "out_features": "MODEL.TIMM.OUT_FEATURES",
              **BACKBONE_KEYS, "norm_eval": "MODEL.TIMM.NORM_EVAL", "with_cp": "MODEL.TIMM.WITH_CP",
              "create_kwargs": "MODEL.TIMM.CREATE_KWARGS"},
    feature_names=TIMM_FEATURES, config_dir="Timm",
    variants={"timm-" + n: ["MODEL.TIMM.NAME", n] for n in
              ("efficientnet_b0", "mobilenetv3_large_100", "convnext_atto", "regnety_002", "resnet18")},
    weight_formats=(WeightFormat("timm", "timm", "timm.create_model(NAME).state_dict() / timm hub files "
                                 "(--format timm --arch NAME)", _never, _convert_timm),),
    describe_weights=describe_timm_weights,
    contract_variants={"timm-resnet18": dict(name="resnet18"),
                       "timm-mobilenetv3_large_100": dict(name="mobilenetv3_large_100"),
                       "timm-efficientnet_b0": dict(name="efficientnet_b0")},
    heavy_variants=("timm-efficientnet_b0",),
))
