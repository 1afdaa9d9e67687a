"""The inference runtime switch: ``TEST.RUNTIME`` (torch, onnxruntime, openvino) x ``TEST.PRECISION`` (fp32, bf16, int8).

:func:`prepare_model` takes a detectron2 model in eval mode **with its weights loaded** and makes it run
the way the config asks, in place:

1. :func:`~d2_backbones.optimize_for_inference` (norms folded into the convolutions, channels_last);
2. ``model.backbone`` (backbone + FPN) is replaced by a :class:`RuntimeBackbone`: for ONNX Runtime and
   OpenVINO, the folded backbone + FPN and detectron2's RPN head (:class:`DetectorGraph`) exported to ONNX at
   startup (dynamic height and width, checked against PyTorch on two sizes) and run there; for ``torch``, the
   folded PyTorch module. It keeps ``output_shape()``, ``size_divisibility`` and ``padding_constraints``, so
   detectron2's pre-processing and heads see no difference; the RPN reads the head outputs the runtime computed;
3. the mask head's convolutions run in the runtime too (exported with a dynamic number of boxes); the rest of
   the heads stays detectron2's PyTorch code, with two exact speed-ups (the RPN decodes only the anchors it
   keeps; masks are pasted by separable bilinear sampling). Under ``bf16`` (and ``int8`` on CPUs with bf16)
   the compute-heavy head parts run in bfloat16 (the runtime's, or PyTorch autocast for the box head) and hand
   float32 back, so box decoding, NMS, ROIAlign and mask pasting stay float32.

==========  =====================================================  ==========================================
precision   torch                                                  onnxruntime / openvino
==========  =====================================================  ==========================================
fp32        folded + channels_last (exact)                         exported backbone + FPN (exact)
bf16        bfloat16 autocast (backbone + heads)                   openvino: ``INFERENCE_PRECISION_HINT``
                                                                   bf16; onnxruntime: refused (its CPU
                                                                   kernels have no bfloat16 convolution)
int8        refused (use onnxruntime)                              the calibrated QDQ model of
                                                                   ``python -m d2_backbones.calibrate``
==========  =====================================================  ==========================================

fp32 is exact everywhere: the outputs equal PyTorch eager's within float32 rounding (``tests/test_runtime.py``
asserts a relative 1e-4). bf16 and int8 change the numbers (bbox AP on ``shapes_val``: docs/benchmarks.md).

The CPU decides whether a precision pays: bf16 needs AVX512-BF16 or AMX, int8 needs VNNI (AVX512-VNNI,
AVX-VNNI) or AMX; :func:`cpu_isa` reads the flags from ``/proc/cpuinfo`` (else torch's
``get_cpu_capability()``) and :func:`precision_note` says at start when the chosen precision will be
slower here. ONNX Runtime and OpenVINO are optional (``pip install d2_backbones[deploy]``); without them
:func:`require` says what to install.

Example (no weights needed for the check of the values)::

    >>> from d2_backbones.config import get_cfg
    >>> cfg = get_cfg()
    >>> cfg.TEST.RUNTIME, cfg.TEST.PRECISION
    ('torch', 'fp32')
    >>> cfg.TEST.PRECISION = "fp16"
    >>> check_runtime(cfg)
    Traceback (most recent call last):
    ...
    d2_backbones.errors.ConfigError: TEST.PRECISION='fp16' is not supported. Valid values: 'fp32', 'bf16', 'int8'. Fix: set TEST.PRECISION to one of them (bf16 where the CPU has AVX512-BF16 or AMX, int8 after python -m d2_backbones.calibrate).
"""
import contextlib
import functools
import glob
import hashlib
import importlib
import json
import logging
import os
import re
import tempfile
import time
import types
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.modeling import Backbone

from .errors import ConfigError
from .inference import is_optimized_for_inference, optimize_for_inference

__all__ = ["RUNTIMES", "PRECISIONS", "DEPLOY_EXTRA", "cpu_isa", "describe_isa", "precision_note", "require",
           "check_runtime", "is_switched", "RuntimeBackbone", "DetectorGraph", "detector_graph", "BF16Autocast", "prepare_model", "evaluation_model",
           "export_backbone", "export_mask_head", "mask_calibration_path", "mask_head_hash", "paste_masks", "GatherROIAlign", "roi_align_levels", "config_hash", "weights_hash", "calibration_path", "find_calibration",
           "CALIBRATE_COMMAND"]

logger = logging.getLogger("d2_backbones")

RUNTIMES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
DEPLOY_EXTRA = "pip install 'd2_backbones[deploy]'"
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "onnx": "onnx"}
CALIBRATE_COMMAND = "python -m d2_backbones.calibrate --config-file {config} MODEL.WEIGHTS {weights}"
_DIVISOR = 32


# ---------------------------------------------------------------------------------------------- the CPU
@functools.lru_cache(maxsize=1)
def cpu_isa() -> Dict[str, object]:
    """What this CPU offers for inference: ``{"avx2", "avx512", "bf16", "amx", "vnni": bool, "source": str}``.

    Read from the ``flags`` line of ``/proc/cpuinfo`` (Linux); elsewhere from
    ``torch.backends.cpu.get_cpu_capability()`` (which names AVX2 / AVX512 only, so bf16 and VNNI count as
    absent there).
    """
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if flags:
        return {"avx2": "avx2" in flags, "avx512": "avx512f" in flags,
                "bf16": bool(flags & {"avx512_bf16", "amx_bf16"}), "amx": bool(flags & {"amx_bf16", "amx_int8"}),
                "vnni": bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}), "source": "/proc/cpuinfo"}
    cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    return {"avx2": cap in ("AVX2", "AVX512"), "avx512": cap == "AVX512", "bf16": False, "amx": False,
            "vnni": False, "source": f"torch.backends.cpu.get_cpu_capability()={cap!r}"}


def describe_isa(isa: Optional[Dict[str, object]] = None) -> str:
    """One line naming what matters for inference, e.g. ``"AVX-512, AVX512-BF16, VNNI (from /proc/cpuinfo)"``."""
    isa = isa or cpu_isa()
    parts = [n for k, n in (("avx512", "AVX-512"), ("bf16", "AVX512-BF16/AMX-BF16"), ("amx", "AMX"),
                            ("vnni", "VNNI")) if isa.get(k)]
    if not isa.get("avx512"):
        parts.insert(0, "AVX2" if isa.get("avx2") else "no AVX2")
    return f"{', '.join(parts)} (from {isa['source']})"


def precision_note(precision: str, isa: Optional[Dict[str, object]] = None) -> Optional[str]:
    """A warning when ``precision`` will be slower than fp32 on this CPU, else None.

    >>> precision_note("bf16", {"avx2": True, "avx512": False, "bf16": False, "amx": False, "vnni": False,
    ...                         "source": "test"})[:55]
    'TEST.PRECISION bf16 on a CPU without AVX512-BF16 or AMX'
    >>> precision_note("fp32") is None
    True
    """
    isa = isa or cpu_isa()
    if precision == "bf16" and not isa.get("bf16"):
        return (f"TEST.PRECISION bf16 on a CPU without AVX512-BF16 or AMX ({describe_isa(isa)}): bfloat16 is emulated "
                f"there and runs slower than fp32. Use TEST.PRECISION fp32 on this machine.")
    if precision == "int8" and not isa.get("vnni"):
        return (f"TEST.PRECISION int8 on a CPU without VNNI or AMX ({describe_isa(isa)}): int8 convolutions have no "
                f"fast instructions there and usually run slower than fp32. Use TEST.PRECISION fp32 on this machine.")
    return None


# ---------------------------------------------------------------------------------------------- checks
def require(name: str):
    """Import the optional package ``name`` (onnxruntime, openvino, onnx) or say exactly what to install."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(
            f"TEST.RUNTIME {name} needs the {_PACKAGES.get(name, name)!r} package, which is not installed "
            f"({e}). Install the deployment extra: {DEPLOY_EXTRA} (or only this runtime: pip install "
            f"{_PACKAGES.get(name, name)}), or set TEST.RUNTIME torch.") from e


def _runtime_values(cfg) -> Tuple[str, str]:
    return str(cfg.TEST.RUNTIME), str(cfg.TEST.PRECISION)


def is_switched(cfg) -> bool:
    """Whether ``cfg`` asks for anything but PyTorch fp32 (``TEST.RUNTIME`` / ``TEST.PRECISION``)."""
    return _runtime_values(cfg) != ("torch", "fp32")


def check_runtime(cfg, *, eval_only: bool = True, imports: bool = True) -> None:
    """Refuse values and combinations that cannot run, naming the key, the value, the valid values and the fix.

    ``eval_only=False`` (training with periodic evaluations) also refuses int8, whose calibration belongs to
    fixed weights. ``imports`` checks that the runtime's package is installed. Logs :func:`precision_note`.
    """
    runtime, precision = _runtime_values(cfg)
    if runtime not in RUNTIMES:
        raise ConfigError(f"TEST.RUNTIME={runtime!r} is not supported. Valid values: "
                          f"{', '.join(map(repr, RUNTIMES))}. Fix: set TEST.RUNTIME to one of them.")
    if precision not in PRECISIONS:
        raise ConfigError(f"TEST.PRECISION={precision!r} is not supported. Valid values: "
                          f"{', '.join(map(repr, PRECISIONS))}. Fix: set TEST.PRECISION to one of them (bf16 where "
                          f"the CPU has AVX512-BF16 or AMX, int8 after python -m d2_backbones.calibrate).")
    device = str(cfg.MODEL.DEVICE)
    if is_switched(cfg) and not device.startswith("cpu"):
        raise ConfigError(f"TEST.RUNTIME={runtime!r} / TEST.PRECISION={precision!r} are CPU inference settings, but "
                          f"MODEL.DEVICE={device!r}. Fix: set MODEL.DEVICE cpu, or TEST.RUNTIME torch and "
                          f"TEST.PRECISION fp32 on a GPU.")
    if precision == "int8" and runtime == "torch":
        raise ConfigError("TEST.PRECISION='int8' runs in ONNX Runtime or OpenVINO, not with TEST.RUNTIME='torch'. "
                          "Fix: set TEST.RUNTIME onnxruntime (or openvino), after calibrating once: "
                          + CALIBRATE_COMMAND.format(config="<config>", weights="<weights>"))
    if precision == "bf16" and runtime == "onnxruntime":
        raise ConfigError("TEST.PRECISION='bf16' is not offered with TEST.RUNTIME='onnxruntime': its CPU kernels have "
                          "no bfloat16 convolution (a bf16 graph runs slower than fp32). Fix: TEST.RUNTIME openvino "
                          "(bf16 through its inference precision hint) or torch (bfloat16 autocast).")
    if precision == "int8" and not eval_only:
        raise ConfigError("TEST.PRECISION='int8' evaluates weights calibrated by python -m d2_backbones.calibrate; "
                          "the weights change during training, so the periodic evaluations cannot use it. Fix: train "
                          "with TEST.PRECISION fp32 (or bf16), then calibrate model_final.pth and evaluate with "
                          "--eval-only TEST.RUNTIME onnxruntime TEST.PRECISION int8.")
    if imports and runtime != "torch":
        require("onnx")
        require(runtime)
    note = precision_note(precision)
    if note:
        logger.warning(note)


# ---------------------------------------------------------------------------------------------- modules
def _to_float(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_float(v) for k, v in x.items()}
    return x


class BF16Autocast(nn.Module):
    """Runs ``module`` under CPU bfloat16 autocast and returns float32 tensors (a stand-in for it)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.module(*args, **kwargs)
        return _to_float(out)

    def __getattr__(self, name):  # attributes the heads read from the module they call (e.g. output_shape)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


class RuntimeBackbone(Backbone):
    """Stands in for ``model.backbone``: runs ``run(images) -> {feature: tensor}`` (a session of an exported
    backbone + FPN, or a PyTorch module) and keeps the replaced backbone's ``output_shape()``,
    ``size_divisibility`` and ``padding_constraints``.

    Args:
        backbone: the backbone it replaces (read for its shapes; kept as ``self.module`` only if ``keep``).
        run: the function computing the features of a padded, normalised ``(N, 3, H, W)`` batch.
        label: what runs it, for logs and ``repr`` (e.g. ``"onnxruntime fp32"``).
        keep: keep ``backbone`` as a submodule (``run`` calls it: the PyTorch runtimes).
    """

    def __init__(self, backbone: nn.Module, run: Callable[[torch.Tensor], Dict[str, torch.Tensor]], label: str,
                 keep: bool = False):
        super().__init__()
        self._shapes = dict(backbone.output_shape())
        self._size_divisibility = int(getattr(backbone, "size_divisibility", 0))
        self._padding_constraints = dict(getattr(backbone, "padding_constraints", {}) or {})
        self._out_features = list(self._shapes)
        self._run = run
        self.label = label
        self.module = backbone if keep else None
        self.cache: Optional[Dict[str, object]] = None  # the RPN head outputs a runtime computed (DetectorGraph)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self._run(x)

    def output_shape(self):
        return dict(self._shapes)

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return dict(self._padding_constraints)

    def extra_repr(self) -> str:
        return f"runtime={self.label!r}, out_features={self._out_features}"


# ---------------------------------------------------------------------------------------------- sessions
def _threads() -> int:
    return max(1, torch.get_num_threads())


def _ort_runner(path: str, names: List[str]) -> Callable:
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # no busy-waiting between runs: PyTorch's heads run right after, on the same cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]

    def run(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outs = sess.run(out_names, {input_name: x.detach().float().contiguous().numpy()})
        return {k: torch.from_numpy(v) for k, v in zip(out_names, outs) if k in names}

    return run


def _ov_runner(path: str, names: List[str], precision: str, channels_last: Sequence[str] = ()) -> Callable:
    """An OpenVINO session; outputs named in ``channels_last`` are handed over in NHWC memory (OpenVINO's
    threaded layout conversion) and returned as channels_last NCHW views, which the ROIAlign gather reads
    without a copy."""
    ov = require("openvino")
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",  # the CPU plugin's default
              "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": _threads(), "NUM_STREAMS": 1}  # is bf16 on
    model = core.read_model(path)  # bf16 CPUs: ask for f32 explicitly
    nhwc = [o.get_any_name() for o in model.outputs if o.get_any_name() in channels_last and len(o.get_partial_shape()) == 4]
    if nhwc:
        ppp = ov.preprocess.PrePostProcessor(model)
        for name in nhwc:
            ppp.output(name).model().set_layout(ov.Layout("NCHW"))
            ppp.output(name).tensor().set_layout(ov.Layout("NHWC"))
        model = ppp.build()
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    out_names = [o.get_any_name() for o in compiled.outputs]

    def run(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        res = request.infer({0: x.detach().float().contiguous().numpy()}, share_outputs=False)
        return {k: torch.from_numpy(res[i]).permute(0, 3, 1, 2) if k in nhwc else torch.from_numpy(res[i])
                for i, k in enumerate(out_names) if k in names}

    return run


# ---------------------------------------------------------------------------------------------- export
def _check_exported(backbone: nn.Module, run: Callable, sizes, tolerance: float, what: str) -> float:
    from .export import max_rel_diff

    worst = 0.0
    g = torch.Generator().manual_seed(0)
    for h, w in sizes:
        x = torch.randn(1, 3, h, w, generator=g)
        with torch.no_grad():
            eager = backbone(x)
        got = run(x)
        diffs = max_rel_diff(eager, {k: got[k] for k in eager})
        worst = max(worst, max(diffs.values()))
    if worst > tolerance:
        raise RuntimeError(f"{what}: the exported backbone + FPN differs from PyTorch by {worst:.2e} (relative) > "
                           f"{tolerance:g} on random inputs of sizes {sizes}. Report this with the config; "
                           f"TEST.RUNTIME torch runs the model without export.")
    return worst


def export_backbone(backbone: nn.Module, path: str) -> List[str]:
    """Export a (folded) backbone + FPN to ONNX at ``path`` with dynamic height and width (multiples of 32),
    through :func:`d2_backbones.export.export_onnx` (torch's TorchScript-based exporter, several times faster
    to export than the dynamo one; the dynamo exporter if it fails). Returns the output names."""
    from .export import export_onnx

    sample = torch.randn(1, 3, 2 * _DIVISOR * 3, 2 * _DIVISOR * 4)
    try:
        return export_onnx(backbone, sample, path, exporter="torchscript")
    except Exception as e:  # noqa: BLE001 - the other exporter, then the caller's error
        logger.info(f"TorchScript-based ONNX export failed ({type(e).__name__}: {e}); trying the dynamo exporter")
        return export_onnx(backbone, sample, path, exporter="dynamo")


class DetectorGraph(nn.Module):
    """What is exported for a runtime: the backbone + FPN and, when the model has detectron2's standard RPN head,
    that head too (its convolutions read the FPN's largest maps: a tenth of Mask R-CNN's time). Outputs: the
    features (``output_shape()`` order), then ``rpn_logits.<i>`` and ``rpn_deltas.<i>`` per RPN input feature."""

    def __init__(self, backbone: nn.Module, rpn_head: Optional[nn.Module] = None, rpn_in_features=()):
        super().__init__()
        self.backbone = backbone
        self.rpn_head = rpn_head
        self.rpn_in_features = list(rpn_in_features) if rpn_head is not None else []

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = dict(self.backbone(x))
        if self.rpn_head is not None:
            logits, deltas = self.rpn_head([out[f] for f in self.rpn_in_features])
            for i, (a, b) in enumerate(zip(logits, deltas)):
                out[f"rpn_logits.{i}"], out[f"rpn_deltas.{i}"] = a, b
        return out

    def output_shape(self):
        from detectron2.layers import ShapeSpec

        shapes = dict(self.backbone.output_shape())
        for i in range(len(self.rpn_in_features)):
            shapes[f"rpn_logits.{i}"] = shapes[f"rpn_deltas.{i}"] = ShapeSpec()
        return shapes


def detector_graph(model: nn.Module) -> DetectorGraph:
    """The :class:`DetectorGraph` of a (folded) detectron2 model: its backbone, and its RPN head if that is
    detectron2's ``StandardRPNHead`` (a custom head stays in PyTorch)."""
    from detectron2.modeling.proposal_generator import RPN
    from detectron2.modeling.proposal_generator.rpn import StandardRPNHead

    pg = getattr(model, "proposal_generator", None)
    if isinstance(pg, RPN) and type(pg.rpn_head) is StandardRPNHead:
        return DetectorGraph(model.backbone, pg.rpn_head, pg.in_features).eval()
    return DetectorGraph(model.backbone).eval()


class _CachedRPNHead(nn.Module):
    """Stands in for the RPN head whose outputs the runtime computed with the features: returns them when called
    on those very feature tensors, else runs the PyTorch head."""

    def __init__(self, head: nn.Module, cache: Dict[str, object]):
        super().__init__()
        self.head = head
        self._cache = cache

    def forward(self, features: List[torch.Tensor]):
        cached = self._cache.get("rpn")
        if cached is not None and features and features[0] is cached[0]:
            return list(cached[1]), list(cached[2])
        return self.head(features)


def _session(runtime: str, precision: str, path: str, names: List[str], channels_last: Sequence[str] = ()) -> Callable:
    if runtime == "onnxruntime":
        return _ort_runner(path, names)
    return _ov_runner(path, names, precision, channels_last)


def _runtime_backbone(backbone: nn.Module, runtime: str, precision: str, onnx_path: Optional[str] = None,
                      check: bool = True, graph: Optional[DetectorGraph] = None) -> RuntimeBackbone:
    """The :class:`RuntimeBackbone` of a folded ``backbone`` in ``runtime`` x ``precision``. With ``graph`` (a
    :class:`DetectorGraph` holding ``backbone`` and an RPN head), the runtime computes the RPN head's outputs too
    and keeps them in ``stand_in.cache["rpn"]`` for a :class:`_CachedRPNHead`."""
    label = f"{runtime} {precision}"
    if runtime == "torch":
        if precision == "bf16":
            wrapped = BF16Autocast(backbone)
            return RuntimeBackbone(backbone, lambda x: wrapped(x), label, keep=True)
        return RuntimeBackbone(backbone, backbone, label, keep=True)
    require("onnx")
    graph = graph if graph is not None else DetectorGraph(backbone).eval()
    names = list(graph.output_shape())
    features = list(backbone.output_shape())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="d2b_runtime_") as tmp:
        path = onnx_path
        if path is None:  # fp32 / bf16: the folded model, exported now
            path = os.path.join(tmp, "backbone_fpn.onnx")
            with _quiet_export():
                export_backbone(graph, path)
        run_all = _session(runtime, precision, path, names, channels_last=features)
        # the session holds the model in memory: the temporary file can go
    got = set(run_all(torch.zeros(1, 3, 2 * _DIVISOR, 2 * _DIVISOR)))
    if not set(features) <= got:
        raise RuntimeError(f"{path} computes {sorted(got)}, not the backbone's features {features}: it was made for "
                           f"another model. Calibrate again (python -m d2_backbones.calibrate).")
    rpn = [n for n in names if n.startswith("rpn_")] if set(names) <= got else []
    cache: Dict[str, object] = {}
    n_rpn = len(rpn) // 2
    first_name = graph.rpn_in_features[0] if n_rpn else None

    def run(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = run_all(x)
        feats = {k: out[k] for k in features}
        if n_rpn:
            cache["rpn"] = (feats[first_name], [out[f"rpn_logits.{i}"] for i in range(n_rpn)],
                            [out[f"rpn_deltas.{i}"] for i in range(n_rpn)])
        return feats

    if check and precision == "fp32":
        err = _check_exported(graph, run_all, [(3 * _DIVISOR, 4 * _DIVISOR), (4 * _DIVISOR, 3 * _DIVISOR)], 1e-4,
                              label)
        logger.info(f"TEST.RUNTIME {runtime}: {'backbone + FPN + RPN head' if n_rpn else 'backbone + FPN'} exported "
                    f"and checked (max rel. difference {err:.1e}) in {time.perf_counter() - t0:.1f} s")
    else:
        logger.info(f"TEST.RUNTIME {runtime} {precision}: backbone + FPN ready in {time.perf_counter() - t0:.1f} s")
    stand_in = RuntimeBackbone(backbone, run, label)
    if n_rpn:
        stand_in.cache = cache
    return stand_in


def _mask_head_sample(mask_head: nn.Module) -> torch.Tensor:
    """Two random pooled boxes of the size the mask head reads (channels of its first convolution, 14 x 14)."""
    channels = next(m for m in mask_head.modules() if isinstance(m, nn.Conv2d)).in_channels
    return torch.randn(2, channels, 14, 14)


def export_mask_head(mask_head: nn.Module, path: str) -> None:
    """Export a mask head's ``layers`` (convolutions, deconvolution, predictor) to ONNX at ``path``, input
    ``rois`` (boxes x channels x 14 x 14, the number of boxes dynamic), output ``masks``."""
    require("onnx")  # the exporter's dependency
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(_Layers(mask_head).eval(), (_mask_head_sample(mask_head),), path, input_names=["rois"], output_names=["masks"], opset_version=18,
                          dynamo=False, dynamic_axes={"rois": {0: "n", 2: "h", 3: "w"}})


def _runtime_mask_head(mask_head: nn.Module, runtime: str, precision: str, onnx_path: Optional[str] = None) -> bool:
    """Run the mask head's ``layers`` (4 convs, deconv, predictor: 50 GMACs at 100 detections) in the runtime,
    exported with a dynamic number of boxes (or ``onnx_path``: the int8 calibration). ``False`` (left in
    PyTorch) for a head without ``layers``."""
    if not callable(getattr(type(mask_head), "layers", None)):
        return False
    if onnx_path is not None:
        run = _session(runtime, precision, onnx_path, ["masks"])
    else:
        with tempfile.TemporaryDirectory(prefix="d2b_runtime_") as tmp:
            path = os.path.join(tmp, "mask_head.onnx")
            export_mask_head(mask_head, path)
            run = _session(runtime, precision, path, ["masks"])
    if precision == "fp32":
        sample = _mask_head_sample(mask_head)
        with torch.no_grad():
            ref = type(mask_head).layers(mask_head, sample)
        err = float((run(sample)["masks"] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if err > 1e-4:
            return False  # keep PyTorch's
    mask_head.layers = types.MethodType(functools.partial(_session_layers, run=run), mask_head)
    return True


def mask_calibration_path(path: str) -> str:
    """The int8 mask head written beside the int8 backbone ``path`` (:func:`calibration_path`)."""
    return path[:-len(".onnx")] + ".mask_head.onnx"


def mask_head_hash(cfg) -> str:
    """sha256 (16 hex digits) of the keys the mask head's calibration depends on besides those in the file name:
    ``MODEL.ROI_MASK_HEAD.*`` and the ROI heads' classes and in-features (not the test thresholds)."""
    data = {"ROI_MASK_HEAD": dict(cfg.MODEL.ROI_MASK_HEAD), "NUM_CLASSES": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "IN_FEATURES": list(cfg.MODEL.ROI_HEADS.IN_FEATURES)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _mask_calibration(cfg, backbone_path: str, fallback: str) -> Optional[str]:
    """The int8 mask head written beside the int8 backbone, if there is one made for ``cfg``'s head keys; a
    file made for other keys is not used (a warning names the command; the head runs in ``fallback``)."""
    path = mask_calibration_path(backbone_path)
    if not os.path.isfile(path):
        return None
    if read_calibration_meta(path).get("d2b_mask_head_hash") != mask_head_hash(cfg):
        command = CALIBRATE_COMMAND.format(config="<config>", weights=cfg.MODEL.WEIGHTS)
        logger.warning(f"{path} was calibrated for other ROI_MASK_HEAD / ROI_HEADS keys: the mask head runs in "
                       f"{fallback} instead. Fix: calibrate again ({command})")
        return None
    return path


def _int8_box_heads(model: nn.Module) -> List[str]:
    """The box heads' fully connected layers (1000 proposals x 12544 x 1024 for the shipped configs) as
    dynamically quantized int8 layers (PyTorch's int8 kernels; activation scales per batch, so no calibration)."""
    roi = getattr(model, "roi_heads", None)
    head = getattr(roi, "box_head", None)
    heads = [("box_head", head)] if not isinstance(head, nn.ModuleList) else \
        [(f"box_head.{i}", h) for i, h in enumerate(head)]
    done = []
    for name, head in heads:
        if not isinstance(head, nn.Module) or not any(isinstance(m, nn.Linear) for m in head.modules()):
            continue
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao's eager quantization announces its move to torchao
                torch.ao.quantization.quantize_dynamic(head, {nn.Linear}, dtype=torch.qint8, inplace=True)
        except Exception as e:  # noqa: BLE001 - a torch without it: the head stays as it is (bf16 below)
            logger.info(f"int8 {name}: dynamic quantization unavailable ({type(e).__name__}: {e})")
            continue
        done.append(f"roi_heads.{name}")
    return done


class _Layers(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x):
        return type(self.head).layers(self.head, x)


def _session_layers(head: nn.Module, x: torch.Tensor, run: Callable) -> torch.Tensor:
    if x.shape[0] == 0:
        return type(head).layers(head, x)
    return run(x)["masks"]


@contextlib.contextmanager
def _quiet_export():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------- heads
def _bf16_heads(model: nn.Module, skip: Sequence[str] = ()) -> List[str]:
    """Run the compute-heavy parts of the heads under bfloat16 autocast (float32 in and out); returns their names.

    The RPN head's convolutions, the box head (its fully connected layers: 1000 proposals x 12544 x 1024 for
    the shipped configs), the mask head's convolutions (``layers``; mask_rcnn_inference stays float32), and
    RetinaNet's / FCOS's head towers. Box decoding, NMS, ROIAlign and mask pasting stay float32.
    """
    done = []
    pg = getattr(model, "proposal_generator", None)
    if pg is not None and isinstance(getattr(pg, "rpn_head", None), nn.Module) \
            and "proposal_generator.rpn_head" not in skip:
        pg.rpn_head = BF16Autocast(pg.rpn_head)
        done.append("proposal_generator.rpn_head")
    if isinstance(getattr(model, "head", None), nn.Module):  # RetinaNet, FCOS
        model.head = BF16Autocast(model.head)
        done.append("head")
    roi = getattr(model, "roi_heads", None)
    if roi is not None:
        heads = [("box_head", getattr(roi, "box_head", None))]
        if isinstance(getattr(roi, "box_head", None), nn.ModuleList):  # Cascade: one box head per stage
            heads = [(f"box_head.{i}", h) for i, h in enumerate(roi.box_head)]
        for name, head in heads:
            if isinstance(head, nn.Module) and not isinstance(head, BF16Autocast) and f"roi_heads.{name}" not in skip:
                _set_path(roi, name, BF16Autocast(head))
                done.append(f"roi_heads.{name}")
        mask_head = getattr(roi, "mask_head", None)
        if mask_head is not None and callable(getattr(type(mask_head), "layers", None)) \
                and not any(n.startswith("roi_heads.mask_head.layers") for n in skip):
            # an instance attribute (the head's forward calls self.layers(x)), bound so a deepcopy stays bound
            mask_head.layers = types.MethodType(_bf16_layers, mask_head)
            done.append("roi_heads.mask_head.layers")
    return done


def _bf16_layers(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return type(head).layers(head, x).float()


def _set_path(root: nn.Module, dotted: str, value: nn.Module) -> None:
    parts = dotted.split(".")
    parent = root
    for p in parts[:-1]:
        parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
    if parts[-1].isdigit():
        parent[int(parts[-1])] = value
    else:
        setattr(parent, parts[-1], value)


# ---------------------------------------------------------------------------------------------- exact head speed-ups
def _rpn_predict_topk_first(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes):
    """detectron2's ``RPN.predict_proposals`` at inference, decoding only the anchors that can be kept.

    detectron2 decodes every anchor (268,000 at 800x1333) and then keeps the ``PRE_NMS_TOPK_TEST`` best of
    each level; decoding is per anchor, so taking the top-k first and decoding those gives the same boxes.
    """
    from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals

    if self.training:
        return type(self).predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes)
    with torch.no_grad():
        n = pred_anchor_deltas[0].shape[0]
        batch = torch.arange(n, device=pred_anchor_deltas[0].device)[:, None]
        boxes, logits = [], []
        for anchors_i, logits_i, deltas_i in zip(anchors, pred_objectness_logits, pred_anchor_deltas):
            b = anchors_i.tensor.size(1)
            top, idx = logits_i.topk(min(self.pre_nms_topk[False], logits_i.shape[1]), dim=1)
            deltas = deltas_i.reshape(n, -1, b)[batch, idx].reshape(-1, b)
            kept = anchors_i.tensor[idx].reshape(-1, b)
            boxes.append(self.box2box_transform.apply_deltas(deltas, kept).view(n, -1, b))
            logits.append(top)
        return find_top_rpn_proposals(boxes, logits, image_sizes, self.nms_thresh, self.pre_nms_topk[False],
                                      self.post_nms_topk[False], self.min_box_size, False)


def _interpolation_matrix(coords: torch.Tensor, size: int) -> torch.Tensor:
    """``(len(coords), size)`` weights of 1-D linear interpolation at ``coords`` (pixel units of grid_sample with
    align_corners=False), zero outside ``[0, size - 1]`` (grid_sample's zero padding)."""
    c = ((coords + 1) * size - 1) / 2
    lo = torch.floor(c)
    w_hi = c - lo
    w_lo = (lo + 1) - c
    lo = lo.long()
    out = torch.zeros(len(coords), size + 2, dtype=coords.dtype)  # columns 0 and size+1 catch the outside
    rows = torch.arange(len(coords))
    out[rows, (lo + 1).clamp(0, size + 1)] += w_lo
    out[rows, (lo + 2).clamp(0, size + 1)] += w_hi
    return out[:, 1:size + 1]


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_shape: Tuple[int, int],
                threshold: float = 0.5) -> torch.Tensor:
    """detectron2's ``paste_masks_in_image`` on CPU (each mask resampled over its box's region, bilinear, then
    thresholded), computed as two small matrix products per mask: bilinear sampling on a grid of rows x columns
    is separable, ``R_y @ mask @ R_x^T``. Same values up to float32 rounding (a pixel flips only where the
    soft mask is within 1e-6 of the threshold), several times faster.

    >>> m = torch.rand(3, 28, 28); b = torch.tensor([[10., 12., 60., 40.], [0., 0., 5., 90.], [30., 5., 99., 70.]])
    >>> from detectron2.layers.mask_ops import paste_masks_in_image
    >>> bool((paste_masks(m, b, (80, 100)) != paste_masks_in_image(m, b, (80, 100))).sum() <= 2)
    True
    """
    n = masks.shape[0]
    img_h, img_w = image_shape
    if n == 0:
        return masks.new_empty((0,) + tuple(image_shape), dtype=torch.uint8)
    out = torch.zeros(n, img_h, img_w, dtype=torch.bool)
    boxes = boxes.float()
    x0i = torch.clamp(boxes[:, 0].floor() - 1, min=0).int().tolist()
    y0i = torch.clamp(boxes[:, 1].floor() - 1, min=0).int().tolist()
    x1i = torch.clamp(boxes[:, 2].ceil() + 1, max=img_w).int().tolist()
    y1i = torch.clamp(boxes[:, 3].ceil() + 1, max=img_h).int().tolist()
    masks = masks.float()
    with _single_thread():  # products of a few hundred rows: threads only add synchronisation
        for i in range(n):
            _paste_one(out[i], masks[i], boxes[i], (x0i[i], y0i[i], x1i[i], y1i[i]), threshold)
    return out


@contextlib.contextmanager
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _paste_one(out: torch.Tensor, mask: torch.Tensor, box: torch.Tensor, region, threshold: float) -> None:
    x0i, y0i, x1i, y1i = region
    if y1i <= y0i or x1i <= x0i:
        return
    x0, y0, x1, y1 = box[0:1], box[1:2], box[2:3], box[3:4]
    gy = (torch.arange(y0i, y1i, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
    gx = (torch.arange(x0i, x1i, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
    size = mask.shape[-1]
    soft = _interpolation_matrix(gy, size) @ mask @ _interpolation_matrix(gx, size).T
    out[y0i:y1i, x0i:x1i] = soft >= threshold


def _postprocess_fast_paste(self, batched_inputs, detected_instances=None, do_postprocess: bool = True):
    """``GeneralizedRCNN.inference`` whose post-processing pastes masks with :func:`paste_masks`."""
    from detectron2.modeling.postprocessing import detector_postprocess

    results = type(self).inference(self, batched_inputs, detected_instances, do_postprocess=False)
    if not do_postprocess:
        return results
    processed = []
    for r, inputs in zip(results, batched_inputs):
        height, width = inputs.get("height", r.image_size[0]), inputs.get("width", r.image_size[1])
        masks = r.pred_masks if r.has("pred_masks") else None
        if masks is not None:
            r.remove("pred_masks")
            r.set("_d2b_index", torch.arange(len(r)))
        out = detector_postprocess(r, height, width)
        if masks is not None:
            index = out._d2b_index
            out.remove("_d2b_index")
            out.pred_masks = paste_masks(masks[index][:, 0], out.pred_boxes.tensor, out.image_size)
        processed.append({"instances": out})
    return processed


def _roi_axis(start: torch.Tensor, bin_size: torch.Tensor, grid: int, bins: int, size: int):
    """One axis of ROIAlign's sampling, in torchvision's float32 arithmetic and order: for ``R`` boxes with
    ``grid`` samples per bin, the two neighbouring pixels of every sample and their bilinear weights,
    ``(index, weight)`` of shape ``(R, bins, grid, 2)``. Samples outside ``[-1, size]`` weigh 0."""
    k = torch.arange(bins, dtype=start.dtype)
    i = (torch.arange(grid, dtype=start.dtype) + 0.5)
    s = (start[:, None, None] + k[None, :, None] * bin_size[:, None, None]) \
        + (i[None, None, :] * bin_size[:, None, None]) / grid
    inside = (s >= -1.0) & (s <= size)
    s = s.clamp(min=0)
    low = s.to(torch.int64)
    edge = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(edge, low, low + 1)
    s = torch.where(edge, low.to(s.dtype), s)
    frac = s - low
    weight = torch.stack([1 - frac, frac], -1) * inside[..., None]
    return torch.stack([low, high], -1), weight


_TABLES: List[Tuple[Tuple[object, ...], torch.Tensor]] = []


def _channel_table(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The maps ``xs`` (each N, C, H, W) as one (sum of N*H*W, C) table of channel vectors, map after map: a view
    of a single channels_last map, else a copy kept for the next pooler reading the same tensors (the box and
    the mask pooler read the same FPN maps)."""
    c = xs[0].shape[1]
    if len(xs) == 1 and xs[0].permute(0, 2, 3, 1).is_contiguous():
        return xs[0].permute(0, 2, 3, 1).view(-1, c)
    for refs, table in _TABLES:
        if len(refs) == len(xs) and all(r() is x for r, x in zip(refs, xs)):
            return table
    table = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, c) for x in xs])
    _TABLES.append((tuple(weakref.ref(x) for x in xs), table))
    del _TABLES[:-4]
    return table


def roi_align_levels(xs: Sequence[torch.Tensor], rois: torch.Tensor, levels: Optional[torch.Tensor],
                     output_size: Tuple[int, int], spatial_scales: Sequence[float], sampling_ratio: int = 0,
                     aligned: bool = True) -> torch.Tensor:
    """``torchvision.ops.roi_align`` of each box ``rois[i]`` (``(R, 5)``: image index, x1, y1, x2, y2) on the map
    ``xs[levels[i]]`` (``(N, C, H, W)``, scale ``spatial_scales[levels[i]]``), as one weighted row gather.

    Every output value is a weighted sum of channel vectors: the bilinear taps of ``grid_h x grid_w`` sample
    points per bin, averaged. With the maps as one table of channel vectors that is a single
    ``embedding_bag(mode="sum", per_sample_weights=...)``: a vectorised, threaded kernel, where torchvision's CPU
    kernel walks box by box and channel by channel on one core. Sample points and weights follow torchvision's
    float32 formulas in the same order (``aligned``; adaptive ``sampling_ratio=0``: ``ceil(roi size / bins)``
    samples; samples off the map weigh 0), so the result equals torchvision's up to the order of the float32
    sums. The taps are built per (level, sample grid) group, without padding, and placed in box order; the
    result is an ``(R, C, ph, pw)`` channels_last view. ``levels=None``: every box on ``xs[0]``.

    >>> from torchvision.ops import roi_align
    >>> x = torch.randn(1, 8, 20, 24)
    >>> rois = torch.tensor([[0, 1.0, 2.0, 15.0, 9.0], [0, -3.0, 4.5, 30.0, 25.0]])
    >>> out = roi_align_levels([x], rois, None, (7, 7), [0.5])
    >>> out.shape, bool(torch.allclose(out, roi_align(x, rois, (7, 7), 0.5, 0, True), atol=1e-5))
    (torch.Size([2, 8, 7, 7]), True)
    """
    c = xs[0].shape[1]
    ph, pw = output_size
    r = rois.shape[0]
    if r == 0:
        return xs[0].new_zeros((0, ph, pw, c)).permute(0, 3, 1, 2)
    levels = torch.zeros(r, dtype=torch.int64) if levels is None else levels.to(torch.int64)
    rois = rois.to(xs[0].dtype)
    scale = torch.tensor(list(spatial_scales), dtype=rois.dtype)[levels]
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    roi_w, roi_h = rois[:, 3] * scale - offset - x1, rois[:, 4] * scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / ph, roi_w / pw
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((r,), sampling_ratio, dtype=torch.int64)
    else:
        grid_h, grid_w = torch.ceil(roi_h / ph).to(torch.int64), torch.ceil(roi_w / pw).to(torch.int64)
    grid_h, grid_w = grid_h.clamp(min=0), grid_w.clamp(min=0)
    table = _channel_table(xs)
    rows = torch.tensor([0] + [x.numel() // c for x in xs], dtype=torch.int64).cumsum(0)  # each map's first row
    base = rows[levels] + rois[:, 0].to(torch.int64) * torch.tensor([x.shape[2] * x.shape[3] for x in xs])[levels]
    taps = 4 * grid_h * grid_w  # per bin
    start = torch.cumsum(taps * (ph * pw), 0) - taps * (ph * pw)  # each box's first tap
    total = int(start[-1] + taps[-1] * ph * pw)
    index = torch.empty(total, dtype=torch.int64)
    weight = torch.empty(total, dtype=table.dtype)
    key = (levels * 4096 + grid_h) * 4096 + grid_w
    for value in torch.unique(key).tolist():
        sel = torch.nonzero(key == value).flatten()
        level, gh, gw = value // 4096 ** 2, (value // 4096) % 4096, value % 4096
        if gh == 0 or gw == 0:
            continue  # an empty sample grid: no taps, torchvision's output is 0
        h, w = xs[level].shape[2:]
        yi, yw = _roi_axis(y1[sel], bin_h[sel], gh, ph, h)  # (r, ph, gh, 2)
        xi, xw = _roi_axis(x1[sel], bin_w[sel], gw, pw, w)  # (r, pw, gw, 2)
        idx = ((base[sel, None, None] + yi.flatten(2) * w)[:, :, None, :, None]
               + xi.flatten(2)[:, None, :, None, :])  # (r, ph, pw, gh*2, gw*2)
        wt = (yw.flatten(2) / (gh * gw))[:, :, None, :, None] * xw.flatten(2)[:, None, :, None, :]
        dest = (start[sel, None] + torch.arange(ph * pw * 4 * gh * gw)).flatten()
        index[dest] = idx.flatten()
        weight[dest] = wt.flatten()
    offsets = (start[:, None] + torch.arange(ph * pw) * taps[:, None]).flatten()
    bags = F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weight)  # empty bags: 0
    return bags.view(r, ph, pw, c).permute(0, 3, 1, 2)


class GatherROIAlign(nn.Module):
    """detectron2's ``ROIAlign`` computed by :func:`roi_align_levels` (same values, several times faster on
    CPU: 1000 boxes on a 160x160x256 map, 470 ms -> 80 ms on 2 cores of an AMD EPYC with AVX-512); other
    devices, dtypes and autograd use the wrapped op."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled() or rois.dim() != 2:
            return self.op(x, rois)
        op = self.op
        return roi_align_levels([x], rois, None, op.output_size, [op.spatial_scale], op.sampling_ratio, op.aligned)


def _gather_pooler_forward(self, x: List[torch.Tensor], box_lists) -> torch.Tensor:
    """detectron2's ``ROIPooler.forward`` as one :func:`roi_align_levels` gather over all levels, straight into a
    channels_last output in box order (detectron2 fills a zeroed tensor level by level); the same boxes to the
    same levels (``assign_boxes_to_levels``)."""
    from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels, convert_boxes_to_pooler_format

    poolers = self.level_poolers
    if torch.is_grad_enabled() or x[0].device.type != "cpu" or x[0].dtype != torch.float32 or len(poolers) == 1:
        return ROIPooler.forward(self, x, box_lists)
    boxes = convert_boxes_to_pooler_format(box_lists)
    levels = assign_boxes_to_levels(box_lists, self.min_level, self.max_level, self.canonical_box_size,
                                    self.canonical_level)
    op = poolers[0].op
    return roi_align_levels(x, boxes, levels, self.output_size, [p.op.spatial_scale for p in poolers],
                            op.sampling_ratio, op.aligned)


class _ChannelsLastFlatten(nn.Module):
    """Flattens pooled boxes ``(R, C, h, w)`` in (h, w, C) order: a free view of the channels_last tensor the
    gather pooler returns (``torch.flatten`` would copy it into (C, h, w) order). Used with the next fully
    connected layer's weight columns permuted to match (:func:`_channels_last_box_heads`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def _channels_last_box_heads(roi_heads: nn.Module) -> int:
    """detectron2's ``FastRCNNConvFCHead`` without convolutions (the shipped 2fc heads): its ``flatten`` reads
    the channels_last pooled boxes as they are, and ``fc1``'s columns are permuted from (C, h, w) to (h, w, C)
    order, the same products summed in another order. Returns how many heads changed."""
    from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead

    head = getattr(roi_heads, "box_head", None)
    heads = list(head) if isinstance(head, nn.ModuleList) else [head]
    shape = getattr(getattr(roi_heads, "box_pooler", None), "output_size", None)
    changed = 0
    for h in heads:
        children = list(h.named_children()) if isinstance(h, FastRCNNConvFCHead) else []
        if shape is None or len(children) < 2 or not isinstance(children[0][1], nn.Flatten) \
                or not isinstance(children[1][1], nn.Linear):
            continue
        fc = children[1][1]
        if fc.in_features % (shape[0] * shape[1]):
            continue
        channels = fc.in_features // (shape[0] * shape[1])
        with torch.no_grad():
            fc.weight.copy_(fc.weight.view(fc.out_features, channels, shape[0], shape[1]).permute(0, 2, 3, 1)
                            .reshape(fc.out_features, -1))
        setattr(h, children[0][0], _ChannelsLastFlatten())
        changed += 1
    return changed


def _fast_heads(model: nn.Module) -> List[str]:
    """The exact speed-ups of the heads (any precision): top-k-first RPN decoding, ROIAlign as a row gather,
    separable mask pasting."""
    from detectron2.layers import ROIAlign
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.modeling.proposal_generator import RPN

    done = []
    gathered = 0
    for module in list(model.modules()):
        poolers = getattr(module, "level_poolers", None)
        if isinstance(poolers, nn.ModuleList):
            for i, op in enumerate(poolers):
                if type(op) is ROIAlign:
                    poolers[i] = GatherROIAlign(op)
                    gathered += 1
            if isinstance(module, ROIPooler) and type(module).forward is ROIPooler.forward and \
                    all(isinstance(op, GatherROIAlign) for op in poolers):
                module.forward = types.MethodType(_gather_pooler_forward, module)
    if gathered:
        done.append("ROIAlign as a row gather")
    roi = getattr(model, "roi_heads", None)
    if roi is not None and _channels_last_box_heads(roi):
        done.append("box head reads channels_last")
    pg = getattr(model, "proposal_generator", None)
    if isinstance(pg, RPN) and type(pg).predict_proposals is RPN.predict_proposals:
        pg.predict_proposals = types.MethodType(_rpn_predict_topk_first, pg)
        done.append("RPN: top-k anchors decoded")
    roi = getattr(model, "roi_heads", None)
    if (isinstance(model, GeneralizedRCNN) and type(model).inference is GeneralizedRCNN.inference
            and getattr(roi, "mask_on", False)):
        model.inference = types.MethodType(_postprocess_fast_paste, model)
        done.append("masks pasted separably")
    return done


# ---------------------------------------------------------------------------------------------- model
def prepare_model(model: nn.Module, cfg, int8_path: Optional[str] = None) -> nn.Module:
    """Make a loaded detectron2 model (eval mode) run as ``cfg.TEST.RUNTIME`` / ``cfg.TEST.PRECISION`` ask, in
    place; returns it. Always folds (:func:`~d2_backbones.optimize_for_inference`). int8 loads the calibration
    of ``MODEL.WEIGHTS`` (:func:`find_calibration`), or ``int8_path`` if given."""
    check_runtime(cfg)
    runtime, precision = _runtime_values(cfg)
    onnx_path = None
    if precision == "int8":  # a missing calibration says the command, before any work
        onnx_path = int8_path or find_calibration(cfg)
    model = optimize_for_inference(model.eval())
    if getattr(model, "_d2b_runtime", None):
        return model
    backbone = model.backbone
    graph = detector_graph(model) if runtime != "torch" else None
    model.backbone = _runtime_backbone(backbone, runtime, precision, onnx_path, graph=graph)
    in_runtime = []
    if getattr(model.backbone, "cache", None) is not None:
        model.proposal_generator.rpn_head = _CachedRPNHead(model.proposal_generator.rpn_head, model.backbone.cache)
        in_runtime.append("proposal_generator.rpn_head")
    # the heads' precision: bf16's; int8 (already approximate) uses bf16 heads where the CPU has bf16
    head_precision = "bf16" if precision == "bf16" or (precision == "int8" and cpu_isa()["bf16"]) else "fp32"
    mask_head = getattr(getattr(model, "roi_heads", None), "mask_head", None)
    mask_int8 = None
    if precision == "int8" and runtime == "openvino" and mask_head is not None:
        mask_int8 = _mask_calibration(cfg, onnx_path, head_precision)
    mask_runtime = runtime != "torch" and not (runtime == "onnxruntime" and head_precision == "bf16")
    if mask_int8 and _runtime_mask_head(mask_head, runtime, "int8", onnx_path=mask_int8):
        in_runtime.append("roi_heads.mask_head.layers (int8)")
    elif mask_runtime and mask_head is not None and _runtime_mask_head(mask_head, runtime, head_precision):
        in_runtime.append("roi_heads.mask_head.layers")
    fast = _fast_heads(model)
    int8_heads = _int8_box_heads(model) if precision == "int8" else []
    heads = _bf16_heads(model, skip=in_runtime + int8_heads) if head_precision == "bf16" else []
    model._d2b_runtime = f"{runtime} {precision}"
    logger.info(f"Inference runtime: backbone + FPN in {runtime} {precision}"
                + (f"; in {runtime} too: {', '.join(in_runtime)}" if in_runtime else "")
                + (f"; int8 (dynamic) in {', '.join(int8_heads)}" if int8_heads else "")
                + (f"; bfloat16 autocast in {', '.join(heads)}" if heads else "; heads in PyTorch float32")
                + (f" ({', '.join(fast)})" if fast else "")
                + f"; CPU: {describe_isa()}")
    return model


def evaluation_model(model: nn.Module, cfg) -> nn.Module:
    """The model train_net evaluates: ``model`` itself, or (``TEST.OPTIMIZE_FOR_INFERENCE`` / the runtime
    switch) a prepared copy, so the model being trained stays intact. A model already prepared is used as is."""
    import copy

    from torch.nn.parallel import DistributedDataParallel

    switched = is_switched(cfg)
    if not switched and (not cfg.TEST.OPTIMIZE_FOR_INFERENCE or is_optimized_for_inference(model)):
        return model
    if getattr(model, "_d2b_runtime", None):
        return model
    model = model.module if isinstance(model, DistributedDataParallel) else model
    t0 = time.perf_counter()
    copied = copy.deepcopy(model).eval()
    copied = prepare_model(copied, cfg) if switched else optimize_for_inference(copied)
    what = f"TEST.RUNTIME {cfg.TEST.RUNTIME} TEST.PRECISION {cfg.TEST.PRECISION}" if switched \
        else "TEST.OPTIMIZE_FOR_INFERENCE"
    logger.info(f"{what}: evaluating a prepared copy of the model (prepared in {time.perf_counter() - t0:.1f} s)")
    return copied


# ---------------------------------------------------------------------------------------------- int8 cache
_HEAD_NODES = re.compile(r"HEAD|RPN|RETINANET|ANCHOR|PROPOSAL|PANOPTIC|FCOS|KEYPOINT")
_NOT_HASHED = {"WEIGHTS", "DEVICE", "WEIGHTS_CHECK", "MASK_ON", "KEYPOINT_ON", "LOAD_PROPOSALS",
               "META_ARCHITECTURE"}


def config_hash(cfg) -> str:
    """sha256 (16 hex digits) of what the calibrated backbone depends on in ``cfg``: every ``MODEL.*`` key but
    the heads' (and the weights path, device), the test resize and input format, the training datasets."""
    model = {k: v for k, v in cfg.MODEL.items() if k not in _NOT_HASHED and not _HEAD_NODES.search(k)}
    data = {"MODEL": model, "INPUT": [cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST],
            "DATASETS.TRAIN": list(cfg.DATASETS.TRAIN)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_hash(path: str) -> str:
    """sha256 of the weights file's bytes (16 hex digits)."""
    st = os.stat(path)
    return _file_sha256(os.path.abspath(path), st.st_size, st.st_mtime)[:16]


def _local_weights(cfg) -> str:
    weights = str(cfg.MODEL.WEIGHTS)
    if not weights:
        raise ConfigError("TEST.PRECISION='int8' needs trained weights (its calibration belongs to them), but "
                          "MODEL.WEIGHTS is empty. Fix: set MODEL.WEIGHTS to a trained checkpoint and calibrate "
                          "it once: " + CALIBRATE_COMMAND.format(config="<config>", weights="<weights>"))
    from detectron2.utils.file_io import PathManager

    return PathManager.get_local_path(weights)  # a URL: its downloaded copy (the calibration goes beside it)


def calibration_path(cfg) -> str:
    """Where the int8 model of ``cfg`` and its ``MODEL.WEIGHTS`` lives: beside the weights, named after them and
    the two hashes, e.g. ``model_final.int8-<config hash>-<weights hash>.onnx``."""
    weights = _local_weights(cfg)
    stem = os.path.splitext(os.path.basename(weights))[0]
    return os.path.join(os.path.dirname(os.path.abspath(weights)),
                        f"{stem}.int8-{config_hash(cfg)}-{weights_hash(weights)}.onnx")


def find_calibration(cfg, config_file: str = "<config>") -> str:
    """The calibrated int8 model of ``cfg``, or an error saying the command to run (missing, or stale: made for
    another config or other weights, which a different hash in the file name or its metadata shows)."""
    path = calibration_path(cfg)
    weights = str(cfg.MODEL.WEIGHTS)
    command = CALIBRATE_COMMAND.format(config=config_file, weights=weights)
    if os.path.isfile(path):
        meta = read_calibration_meta(path)
        expected = os.path.basename(path).split(".int8-")[1][:-len(".onnx")]
        if meta.get("d2b_hash") != expected:
            raise ConfigError(f"The int8 calibration {path} does not hold what its name says (metadata hash "
                              f"{meta.get('d2b_hash')!r}, expected {expected!r}). Fix: delete it and calibrate "
                              f"again: {command}")
        return path
    stem = os.path.basename(path).split(".int8-")[0]
    others = sorted(glob.glob(os.path.join(os.path.dirname(path), glob.escape(stem) + ".int8-*.onnx")))
    why = (f"the calibration(s) beside them ({', '.join(os.path.basename(o) for o in others)}) were made for "
           f"another config or other weights (stale)" if others else "no calibration exists for them yet")
    raise ConfigError(f"TEST.PRECISION='int8' needs the int8 calibration of MODEL.WEIGHTS={weights!r} with this "
                      f"config ({os.path.basename(path)}), but {why}. Fix: calibrate once (a few minutes; "
                      f"--num-images sets how many training images): {command}")


def read_calibration_meta(path: str) -> Dict[str, str]:
    """The ``d2b_*`` metadata an int8 model carries (hash, number of images, dataset, method)."""
    onnx = require("onnx")
    model = onnx.load(path, load_external_data=False)
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("d2b_")}
