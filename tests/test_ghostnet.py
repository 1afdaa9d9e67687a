"""GhostNet family: shapes, parameter counts, equivalence with timm, weights, freezing, configs."""
import copy
import math
import os

import pytest
import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone

import d2_backbones
from d2_backbones import FAMILIES, kwargs_from_cfg
from d2_backbones.errors import argument_keys
from d2_backbones.config import our_keys
from d2_backbones.ghostnet import GHOSTNET_V1, GhostNet, convert_ghostnet_state_dict
from d2_backbones.layers import count_params

from conftest import CONFIG_DIR, assert_backbone_outputs, build_and_infer, leaf_configs, load_cfg

ALL = ["stem", "stage2", "stage3", "stage4", "stage5"]
STRIDES = {"stem": 2, "stage2": 4, "stage3": 8, "stage4": 16, "stage5": 32}

# width, timm model, body params (anchors.md 2c), channels stem..stage5 and stage5 before the final conv
# (anchors.md 1d).
WIDTHS = [
    (0.5, "ghostnet_050", 690_612, [8, 12, 20, 56, 480], 80),
    (1.0, "ghostnet_100", 2_671_428, [16, 24, 40, 112, 960], 160),
    (1.3, "ghostnet_130", 4_479_100, [20, 32, 52, 144, 1248], 208),
]
WIDTH_IDS = ["x0.5", "x1.0", "x1.3"]

# Which group (stem = 0, stage2 = 1, ...) every top-level module belongs to, for freezing.
GROUP_OF_BLOCK = {0: 0, 1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 4, 8: 4, 9: 4}


def group_of(name: str) -> int:
    if name.startswith(("conv_stem", "bn1")):
        return 0
    return GROUP_OF_BLOCK[int(name.split(".")[1])]


def randomize_norms(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def timm_ghostnet(name: str) -> nn.Module:
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        randomize_norms(model)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------
def test_block_table_is_the_paper_table():
    rows = [r for group in GHOSTNET_V1 for r in group]
    assert len(GHOSTNET_V1) == 9 and len(rows) == 16
    assert [r.stride for r in rows].count(2) == 4
    assert rows[-1] == (5, 960, 160, 0.25, 1)
    assert sum(r.se > 0 for r in rows) == 7


@pytest.mark.parametrize("width,_name,_params,channels,pre_conv", WIDTHS, ids=WIDTH_IDS)
@pytest.mark.parametrize("size", [(64, 96), (65, 79)], ids=["even", "odd"])
def test_output_shapes(width, _name, _params, channels, pre_conv, size):
    model = GhostNet(width, out_features=ALL)
    shapes = model.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == STRIDES
    assert [shapes[f].channels for f in ALL] == channels
    out = assert_backbone_outputs(model, *size)
    assert list(out) == ALL
    for f, ch in zip(ALL, channels):  # explicit: ceil(H / s), ceil(W / s)
        assert tuple(out[f].shape) == (1, ch, math.ceil(size[0] / STRIDES[f]), math.ceil(size[1] / STRIDES[f]))

    before = GhostNet(width, out_features=["stage3", "stage5"], final_conv=False)
    assert before.output_shape()["stage5"] == ShapeSpec(channels=pre_conv, stride=32)
    assert len(before.blocks) == 9
    assert_backbone_outputs(before, *size)


@pytest.mark.parametrize("width,name,params,_channels,_pre", WIDTHS, ids=WIDTH_IDS)
def test_parameter_count(width, name, params, _channels, _pre):
    model = GhostNet(width, norm="BN")
    assert count_params(model) == params
    ref = timm.create_model(name, pretrained=False)
    body = sum(p.numel() for k, p in ref.named_parameters() if not k.startswith(("conv_head", "classifier")))
    assert body == params


def test_later_groups_are_not_built():
    model = GhostNet(1.0, out_features=["stage2", "stage3"])
    assert len(model.blocks) == 5
    assert not any(k.startswith(("blocks.5", "blocks.9")) for k in model.state_dict())
    assert list(model(torch.zeros(1, 3, 64, 64))) == ["stage2", "stage3"]
    assert len(GhostNet(1.0, out_features=["stem"]).blocks) == 1
    assert len(GhostNet(1.0, out_features=["stage4"]).blocks) == 7


def test_any_positive_width_builds():
    model = GhostNet(0.75, out_features=ALL)
    # make_divisible(16 * .75, 4) = 12, (24 * .75) = 18 -> 20, (40 * .75) = 30 -> 32, (112 * .75) = 84,
    # (960 * .75) = 720
    assert [v.channels for v in model.output_shape().values()] == [12, 20, 32, 84, 720]
    assert_backbone_outputs(model, 33, 47)


# ---------------------------------------------------------------------------------------------
# equivalence with timm and weights
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,name,_params,_channels,_pre", WIDTHS, ids=WIDTH_IDS)
def test_matches_timm_at_our_taps(width, name, _params, _channels, _pre):
    ref = timm_ghostnet(name)
    sd, dropped = convert_ghostnet_state_dict(ref.state_dict())
    assert {k for k in dropped if "num_batches_tracked" not in k} == {
        "conv_head.weight", "conv_head.bias", "classifier.weight", "classifier.bias"}

    ours = GhostNet(width, norm="BN", out_features=ALL)
    result = ours.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ours_pre = GhostNet(width, norm="BN", out_features=["stage5"], final_conv=False)
    ours_pre.load_state_dict({k: v for k, v in sd.items() if not k.startswith("blocks.9")})
    ours.eval(), ours_pre.eval()

    taps = {"stem": 0, "stage2": 2, "stage3": 4, "stage4": 6, "stage5": 9, "pre": 8}
    seen = {}
    hooks = [ref.blocks[i].register_forward_hook(
        lambda _m, _i, out, name=name: seen.__setitem__(name, out.detach().clone())) for name, i in taps.items()]
    x = torch.randn(2, 3, 67, 81)
    with torch.no_grad():
        ref(x)
        got = ours(x)
        got_pre = ours_pre(x)["stage5"]
    for h in hooks:
        h.remove()
    worst = 0.0
    for f in ALL:
        assert got[f].shape == seen[f].shape, f
        torch.testing.assert_close(got[f], seen[f], rtol=1e-5, atol=1e-5, msg=f)
        worst = max(worst, (got[f] - seen[f]).abs().max().item())
    torch.testing.assert_close(got_pre, seen["pre"], rtol=1e-5, atol=1e-5)
    assert got_pre.shape[1] == ours_pre.output_shape()["stage5"].channels
    print(f"{name}: max |ours - timm| = {worst:.2e}")


def huawei_style_state_dict(ref: nn.Module):
    """timm's keys plus the thop counters (`total_ops`/`total_params`) Huawei's checkpoints carry."""
    sd = dict(ref.state_dict())
    counters = []
    for name, _ in ref.named_modules():
        for c in ("total_ops", "total_params"):
            key = f"{name}.{c}" if name else c
            sd[key] = torch.zeros(1, dtype=torch.float64)
            counters.append(key)
    return sd, counters


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_huawei_style_checkpoint_loads_and_reports_drops(norm):
    ref = timm_ghostnet("ghostnet_100")
    sd, counters = huawei_style_state_dict(ref)
    ours = GhostNet(1.0, norm=norm, out_features=ALL)
    converted, dropped = convert_ghostnet_state_dict(sd, model=ours)
    result = ours.load_state_dict(converted, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert set(counters) <= set(dropped)
    assert {"conv_head.weight", "conv_head.bias", "classifier.weight", "classifier.bias"} <= set(dropped)
    assert not any("total" in k for k in converted)
    assert dropped == sorted(dropped)
    for k, v in converted.items():
        assert torch.equal(ours.state_dict()[k], v), k

    # wrapped in {"state_dict": ...} with a DataParallel prefix: same result
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    again, dropped_again = convert_ghostnet_state_dict(wrapped, model=ours)
    assert sorted(again) == sorted(converted) and dropped_again == dropped


def test_conversion_drops_groups_not_built_and_checks_width():
    ref = timm.create_model("ghostnet_100", pretrained=False)
    small = GhostNet(1.0, out_features=["stage2", "stage3", "stage4"])
    converted, dropped = convert_ghostnet_state_dict(ref.state_dict(), model=small)
    small.load_state_dict(converted, strict=True)
    assert any(k.startswith("blocks.7.") for k in dropped) and any(k.startswith("blocks.9.") for k in dropped)
    assert not any(k.startswith(("blocks.7.", "blocks.8.", "blocks.9.")) for k in converted)

    with pytest.raises(d2_backbones.ConfigError, match=r"width=1\.3.*16 output channels \(width 1\.0\)"):
        convert_ghostnet_state_dict(ref.state_dict(), model=GhostNet(1.3))


def test_converted_weights_load_through_model_weights(tmp_path):
    """The README workflow: convert with a prefix, save, point MODEL.WEIGHTS at the file."""
    ref = timm_ghostnet("ghostnet_100")
    converted, _ = convert_ghostnet_state_dict(ref.state_dict(), prefix="backbone.bottom_up.")
    path = os.path.join(str(tmp_path), "ghostnet_100_d2.pth")
    torch.save({"model": converted, "__author__": "timm ghostnet_100"}, path)

    from detectron2.modeling import build_model
    model = build_model(load_cfg(os.path.join(CONFIG_DIR, "GhostNet", "faster_rcnn_ghostnet_100_FPN_1x.yaml")))
    incompatible = copy.deepcopy(model).load_state_dict(converted, strict=False)
    assert not [k for k in incompatible.missing_keys if ".bottom_up." in k]
    assert not incompatible.unexpected_keys
    DetectionCheckpointer(model).load(path)
    body = model.backbone.bottom_up.state_dict()
    for k, v in ref.state_dict().items():
        if k.startswith(("conv_head", "classifier")) or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(body[k], v), k


# ---------------------------------------------------------------------------------------------
# norms, freezing, norm_eval, with_cp
# ---------------------------------------------------------------------------------------------
def test_norm_is_threaded_through_every_layer():
    n_convs_with_norm = sum(isinstance(m, nn.BatchNorm2d) for m in GhostNet(1.0, out_features=ALL).modules())
    frozen = GhostNet(1.0, norm="FrozenBN", out_features=ALL)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) == n_convs_with_norm
    assert not any(isinstance(m, _BatchNorm) for m in frozen.modules())
    sync = GhostNet(0.5, norm="SyncBN", out_features=ALL)
    assert all(type(m) is nn.SyncBatchNorm for m in sync.modules() if isinstance(m, _BatchNorm))

    def gn(c):
        return nn.GroupNorm(math.gcd(c, 32), c)

    grouped = GhostNet(1.0, norm=gn, out_features=ALL)
    assert sum(isinstance(m, nn.GroupNorm) for m in grouped.modules()) == n_convs_with_norm
    assert not any(isinstance(m, _BatchNorm) for m in grouped.modules())
    assert_backbone_outputs(grouped, 64, 48)


def test_gn_error_is_clear():
    with argument_keys(FAMILIES["ghostnet"].arg_keys), pytest.raises(d2_backbones.ConfigError) as e:
        GhostNet(1.0, norm="GN")
    msg = str(e.value)
    assert "MODEL.GHOSTNET.NORM='GN'" in msg and "16-channel" in msg and "Fix:" in msg
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_list(["MODEL.GHOSTNET.NORM", "GN", "MODEL.BACKBONE.NAME", "build_d2b_ghostnet_fpn_backbone",
                         "MODEL.FPN.IN_FEATURES", ["stage2", "stage3", "stage4", "stage5"]])
    with pytest.raises(d2_backbones.ConfigError, match="MODEL.GHOSTNET.NORM='GN'"):
        build_backbone(cfg)
    with argument_keys(FAMILIES["ghostnet"].arg_keys):
        with pytest.raises(d2_backbones.ConfigError, match="MODEL.GHOSTNET.NORM='BNN'.*Valid values: 'BN'"):
            GhostNet(1.0, norm="BNN")
        with pytest.raises(d2_backbones.ConfigError, match="no normalisation"):
            GhostNet(1.0, norm="")


@pytest.mark.parametrize("width", [0, -1.0, float("nan"), float("inf"), "1.0", True, None])
def test_width_errors_are_clear(width):
    with argument_keys(FAMILIES["ghostnet"].arg_keys), pytest.raises(d2_backbones.ConfigError) as e:
        GhostNet(width)
    assert "MODEL.GHOSTNET.WIDTH=" in str(e.value) and "positive number" in str(e.value)
    assert "Fix:" in str(e.value)


def test_bad_out_features_and_freeze_at():
    with pytest.raises(d2_backbones.ConfigError, match="out_features=.*contains 'res5'.*Valid values: 'stem'"):
        GhostNet(1.0, out_features=["res5"])  # without a config, errors name the argument
    with argument_keys(FAMILIES["ghostnet"].arg_keys):
        with pytest.raises(d2_backbones.ConfigError, match="MODEL.GHOSTNET.OUT_FEATURES.*is empty"):
            GhostNet(1.0, out_features=[])
        with pytest.raises(d2_backbones.ConfigError, match=r"MODEL.BACKBONE.FREEZE_AT=4 is out of range.*0, 1, 2, 3\."):
            GhostNet(1.0, out_features=["stage3"], freeze_at=4)
    GhostNet(1.0, out_features=["stage3"], freeze_at=3)


# ---------------------------------------------------------------------------------------------
# config and yamls
# ---------------------------------------------------------------------------------------------
def test_config_keys_and_kwargs():
    keys = our_keys()
    assert keys["MODEL.GHOSTNET.WIDTH"] == 1.0
    assert keys["MODEL.GHOSTNET.OUT_FEATURES"] == ["stage2", "stage3", "stage4", "stage5"]
    assert keys["MODEL.GHOSTNET.NORM"] == "FrozenBN"
    assert keys["MODEL.GHOSTNET.FINAL_CONV"] is True
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_list(["MODEL.GHOSTNET.WIDTH", 1.3, "MODEL.GHOSTNET.FINAL_CONV", False,
                         "MODEL.BACKBONE.FREEZE_AT", 3])
    kw = kwargs_from_cfg("ghostnet", cfg, ShapeSpec(channels=3))
    assert kw["width"] == 1.3 and kw["final_conv"] is False and kw["freeze_at"] == 3
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_d2b_ghostnet_backbone", "MODEL.GHOSTNET.NORM", "BN",
                         "MODEL.RPN.IN_FEATURES", ["stage4"], "MODEL.ROI_HEADS.IN_FEATURES", ["stage4"]])
    backbone = build_backbone(cfg)
    assert isinstance(backbone, GhostNet)
    assert backbone.output_shape()["stage5"].channels == 208
    cfg.merge_from_list(["MODEL.GHOSTNET.WIDTH", -2.0])
    with pytest.raises(d2_backbones.ConfigError, match="MODEL.GHOSTNET.WIDTH=-2.0"):
        build_backbone(cfg)
    cfg.merge_from_list(["MODEL.GHOSTNET.WIDTH", 1.0])
    cfg.MODEL.GHOSTNET.WITH_CP = "yes"  # e.g. set in Python; yacs only type-checks merges
    with pytest.raises(d2_backbones.ConfigError, match="MODEL.GHOSTNET.WITH_CP='yes'"):
        build_backbone(cfg)


# the Faster/Mask R-CNN and RetinaNet configs per width (other meta-architectures: test_meta_architectures.py)
GHOSTNET_YAMLS = [p for p in leaf_configs("GhostNet") if p.endswith(".yaml")
                  and os.path.basename(p).startswith(("faster_rcnn", "mask_rcnn", "retinanet"))]


def test_all_variants_have_configs():
    names = sorted(os.path.basename(p) for p in GHOSTNET_YAMLS)
    expected = sorted(f"{arch}_ghostnet_{w}_FPN_1x.yaml" for arch in ("faster_rcnn", "mask_rcnn", "retinanet")
                      for w in ("050", "100", "130"))
    assert names == expected


@pytest.mark.slow
@pytest.mark.parametrize("path", GHOSTNET_YAMLS, ids=[os.path.basename(p) for p in GHOSTNET_YAMLS])
def test_yaml_builds_and_runs_inference(path):
    cfg, model, output = build_and_infer(path)
    assert cfg.VERSION == 2
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    width = {"050": 0.5, "100": 1.0, "130": 1.3}[os.path.basename(path).split("_")[-3]]
    body = model.backbone.bottom_up
    assert isinstance(body, GhostNet) and body.width == width
    assert "instances" in output and len(output["instances"]) >= 0
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        assert list(model.backbone.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    else:
        assert list(model.backbone.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
        assert cfg.MODEL.MASK_ON == os.path.basename(path).startswith("mask")
