"""Shared test helpers. Everything runs on CPU against the real detectron2 (no mocks, no downloads)."""
import contextlib
import copy
import glob
import logging
import math
import os
import sys
from typing import Callable, Dict, Optional

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # test this checkout, whatever an editable install points to

import detectron2  # noqa: E402,F401  (the suite must fail loudly when detectron2 is missing)
import d2_backbones  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from d2_backbones import optimize_for_inference  # noqa: E402

CONFIG_DIR = os.path.join(REPO, "configs")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def ceil_size(size: int, stride: int) -> int:
    return math.ceil(size / stride)


def assert_backbone_outputs(model: nn.Module, h: int, w: int, n: int = 1,
                            size_fn: Callable[[int, int], int] = ceil_size) -> Dict[str, torch.Tensor]:
    """Forward in eval mode and check every output against ``output_shape()`` exactly.

    ``size_fn(size, stride)`` gives the expected spatial size (ceil by default).
    """
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(n, 3, h, w))
    shapes = model.output_shape()
    assert list(out) == list(shapes), (list(out), list(shapes))
    for k, spec in shapes.items():
        expected = (n, spec.channels, size_fn(h, spec.stride), size_fn(w, spec.stride))
        assert tuple(out[k].shape) == expected, (k, tuple(out[k].shape), expected)
    return out


def bn_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith("running_mean") or k.endswith("running_var")}


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    out = model(x)
    loss = sum(v.float().pow(2).mean() for v in out.values())
    if loss.requires_grad:  # False when every stage is frozen
        loss.backward()


def all_yaml_configs(subdir: str = "") -> list:
    return sorted(glob.glob(os.path.join(CONFIG_DIR, subdir, "**", "*.yaml"), recursive=True))


def leaf_configs(subdir: str = "") -> list:
    return [p for p in all_yaml_configs(subdir) if not os.path.basename(p).startswith("Base-")]


def load_cfg(path: str, opts: Optional[list] = None):
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(opts or []))
    return cfg


def build_and_infer(path: str, size=(160, 224), opts: Optional[list] = None):
    """Build the full detectron2 model of a yaml on CPU and run one inference."""
    cfg = load_cfg(path, opts)
    model = build_model(cfg)
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": torch.randint(0, 255, (3,) + tuple(size), dtype=torch.uint8).float(),
                          "height": size[0], "width": size[1]}])
    assert len(outputs) == 1
    return cfg, model, outputs[0]


# ---------------------------------------------------------------------------------------------- folding
RTOL = 1e-4  # max|optimized - eager| <= RTOL * max|eager|, per output


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FrozenBatchNorm2d, _BatchNorm)):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            if isinstance(m, (FrozenBatchNorm2d, _BatchNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _compare(opt: nn.Module, eager: nn.Module, x: torch.Tensor, channels_last: bool) -> None:
    with torch.no_grad():
        ref, out = eager(x), opt(x)
    assert list(out) == list(ref)
    for k in ref:
        assert out[k].shape == ref[k].shape
        assert max_rel_err(out[k], ref[k]) <= RTOL, (k, max_rel_err(out[k], ref[k]))
        if channels_last and out[k].shape[1] > 1 and out[k].shape[2] * out[k].shape[3] > 1:
            assert out[k].is_contiguous(memory_format=torch.channels_last), k


def assert_same_outputs(eager: nn.Module, x: torch.Tensor, *, channels_last: bool = True,
                        odd: tuple = (1, 3, 97, 131)) -> nn.Module:
    """Optimize a copy of ``eager`` and assert equal outputs, no foldable norm left, same output_shape().

    An FPN gets ``x`` (detectron2 pads images to a multiple of 32 for it) and its ``bottom_up`` also
    gets an odd-sized input; a bare backbone gets both.
    """
    eager.eval()
    opt = optimize_for_inference(copy.deepcopy(eager), channels_last=channels_last)
    _compare(opt, eager, x, channels_last)
    if hasattr(eager, "bottom_up"):
        _compare(opt.bottom_up, eager.bottom_up, torch.randn(*odd), channels_last)
    else:
        _compare(opt, eager, torch.randn(*odd), channels_last)
    assert opt.output_shape() == eager.output_shape()
    left = [n for n, m in opt.named_modules() if isinstance(m, (FrozenBatchNorm2d, _BatchNorm))]
    assert left == [], left
    report = opt._d2b_inference
    assert len(report.folded) == sum(isinstance(m, (FrozenBatchNorm2d, _BatchNorm)) for m in eager.modules())
    return opt



@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------- logs
LOAD_LOGGERS = ("fvcore.common.checkpoint", "detectron2", "d2_backbones")  # where loading and its checks log


@contextlib.contextmanager
def captured_logs(names=LOAD_LOGGERS):
    """Records of these loggers at INFO and above, whatever an earlier ``setup()`` did to their propagation."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield records
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def warnings_in(records):
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def summary(records):
    """The one ``Weights loading summary:`` line of a load."""
    lines = [r.getMessage() for r in records if r.getMessage().startswith("Weights loading summary:")]
    assert len(lines) == 1, lines
    return lines[0]
