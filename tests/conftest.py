"""Shared test helpers. Everything runs on CPU against the real detectron2 (no mocks, no downloads)."""
import glob
import math
import os
import sys
from typing import Callable, Dict, Optional

import pytest
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # test this checkout, whatever an editable install points to

import detectron2  # noqa: E402,F401  (the suite must fail loudly when detectron2 is missing)
import d2_backbones  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
