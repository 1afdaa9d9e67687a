"""A fourth family is cheap: a toy family defined here, through the public contract only, gets the
contract test, the yacs builders, the FPN, folding and the model table with no change to the package."""
import pytest
import torch
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_backbone

import d2_backbones
from d2_backbones import Family
from d2_backbones.errors import arg_key, check_freeze_at, check_out_features, config_error
from d2_backbones.layers import NormEvalMixin, checkpoint_keep_bn_stats, freeze_module

import test_contract


# ---------------------------------------------------------------------------------------------- the family
class ToyNet(NormEvalMixin, Backbone):
    """A stride-2 stem and three stride-2 conv stages (t2, t3, t4), ``width`` doubling per stage."""

    feature_names = ("stem", "t2", "t3", "t4")
    conv_norm_pairs = ()

    def __init__(self, width: int = 8, *, in_channels: int = 3, norm="BN", out_features=("t2", "t3", "t4"),
                 freeze_at: int = 0, norm_eval: bool = False, with_cp: bool = False):
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise config_error(arg_key("width"), width, problem="must be a positive int", fix="use e.g. 8")
        out_features = check_out_features(out_features, self.feature_names, arg_key("out_features"), "ToyNet")
        last = max(self.feature_names.index(f) for f in out_features)
        check_freeze_at(freeze_at, last + 1, self.feature_names, arg_key("freeze_at"), "ToyNet")
        chans = [in_channels] + [width * 2 ** i for i in range(last + 1)]
        for i, name in enumerate(self.feature_names[: last + 1]):
            conv = Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1, bias=False,
                          norm=get_norm(norm, chans[i + 1]), activation=nn.ReLU())
            self.add_module(name, nn.Sequential(conv))
        self.stage_names = list(self.feature_names[1: last + 1])
        self._out_features = list(out_features)
        self._out_feature_channels = {f: chans[self.feature_names.index(f) + 1] for f in out_features}
        self._out_feature_strides = {f: 2 ** (self.feature_names.index(f) + 1) for f in out_features}
        self.norm_eval, self.with_cp, self.freeze_at, self.width = norm_eval, with_cp, freeze_at, width
        self.freeze(freeze_at)
        self.train()

    def named_stages(self):
        return [(n, [getattr(self, n)]) for n in ["stem"] + self.stage_names]

    def freeze(self, freeze_at: int = 0):
        for i, (name, _) in enumerate(self.named_stages()):
            if i < freeze_at:
                setattr(self, name, freeze_module(getattr(self, name)))
        return self

    def describe(self) -> str:
        return f"ToyNet-{self.width}"

    def forward(self, x):
        outputs = {}
        for name, stage in self.named_children():
            if self.with_cp and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint_keep_bn_stats(stage, stage, x)
            else:
                x = stage(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


def add_toy_keys(cfg) -> None:
    cfg.MODEL.TOY = CN()
    cfg.MODEL.TOY.WIDTH = 8  # channels of the stem, doubled per stage
    cfg.MODEL.TOY.NORM = "BN"
    cfg.MODEL.TOY.OUT_FEATURES = ["t2", "t3", "t4"]
    cfg.MODEL.TOY.NORM_EVAL = False
    cfg.MODEL.TOY.WITH_CP = False


TOY = Family(
    name="toy", build=ToyNet, config_node="MODEL.TOY", add_config_keys=add_toy_keys,
    arg_keys={"width": "MODEL.TOY.WIDTH", "norm": "MODEL.TOY.NORM", "out_features": "MODEL.TOY.OUT_FEATURES",
              "freeze_at": "MODEL.BACKBONE.FREEZE_AT", "norm_eval": "MODEL.TOY.NORM_EVAL",
              "with_cp": "MODEL.TOY.WITH_CP"},
    feature_names=ToyNet.feature_names, variants={"Toy-8": ["MODEL.TOY.WIDTH", 8]})


# ---------------------------------------------------------------------------------------------- tests
def _registered_names():
    return d2_backbones.build.REGISTERED_NAMES  # looked up when used: another test may reload the module


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    d2_backbones.register_family(TOY)
    yield
    d2_backbones.FAMILIES.pop("toy")
    for name in TOY.builder_names:
        _registered_names().remove(name)
        BACKBONE_REGISTRY._obj_map.pop(name)
    d2_backbones.config._template.cache_clear()


CHECKS = ["check_interface", "check_every_parameter_learns", "check_norm_eval", "check_with_cp",
          "check_torchscript", "check_folding", "check_yacs_round_trip"]


@pytest.mark.parametrize("check", CHECKS)
def test_toy_passes_the_contract(check):
    getattr(test_contract, check)(TOY, {"width": 4})


@pytest.mark.parametrize("freeze_at", [0, 1, 2, -1])
def test_toy_freezing(freeze_at):
    test_contract.check_freezing(TOY, {"width": 4}, freeze_at)


@pytest.mark.parametrize("size", [(64, 96), (65, 79)])
def test_toy_output_shapes(size):
    test_contract.check_output_shapes(TOY, {"width": 4}, size)


def test_toy_config_builders_fpn_and_errors_name_its_keys():
    cfg = d2_backbones.get_cfg()
    assert cfg.MODEL.TOY.WIDTH == 8 and "build_d2b_toy_fpn_backbone" in _registered_names()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_d2b_toy_fpn_backbone", "MODEL.FPN.IN_FEATURES", ["t2", "t3", "t4"],
                         "MODEL.FPN.OUT_CHANNELS", 16])
    fpn = build_backbone(cfg)
    assert fpn.output_shape() == {f"p{i}": ShapeSpec(channels=16, stride=2 ** i) for i in (2, 3, 4, 5)}
    cfg.merge_from_list(["MODEL.TOY.WIDTH", 0])
    with pytest.raises(d2_backbones.ConfigError, match=r"^MODEL\.TOY\.WIDTH=0 must be a positive int"):
        build_backbone(cfg)


def test_toy_in_the_model_table():
    from d2_backbones import model_table

    assert model_table.VARIANTS["Toy-8"] == ("toy", ["MODEL.TOY.WIDTH", 8])
    row = model_table.measure_variant("Toy-8", latency_runs=0, det_size=False)
    body = ToyNet(8, norm="BN", out_features=["t2", "t3", "t4"])
    assert row["params"] == sum(p.numel() for p in body.parameters()) and row["gmacs_224"] > 0
