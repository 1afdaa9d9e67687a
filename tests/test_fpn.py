"""FPN builder and top blocks (shared by every family)."""
import pytest
import torch
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

from d2_backbones.errors import argument_keys
from d2_backbones import ConfigError, build_fpn, build_resnet
from d2_backbones.fpn import ExtraConvLevels

from conftest import assert_backbone_outputs

C2_C5 = ["res2", "res3", "res4", "res5"]


def _r18(**kw):
    return build_resnet(18, norm="BN", out_features=C2_C5, **kw)


@pytest.mark.parametrize("hw", [(128, 128), (160, 96)])
def test_rcnn_fpn_p2_to_p6(hw):
    fpn = build_fpn(_r18(), C2_C5, 64, top_block="maxpool")
    assert isinstance(fpn, FPN) and isinstance(fpn.top_block, LastLevelMaxPool)
    assert fpn.size_divisibility == 32
    shapes = fpn.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    assert all(s.channels == 64 for s in shapes.values())
    assert_backbone_outputs(fpn, *hw)


@pytest.mark.parametrize("source", ["on_input", "on_lateral", "on_output"])
@pytest.mark.parametrize("relu", [True, False])
def test_retinanet_fpn_p3_to_p7(source, relu):
    fpn = build_fpn(_r18(), ["res3", "res4", "res5"], 64, top_block="p6p7", top_block_source=source,
                    top_block_relu=relu)
    shapes = fpn.output_shape()
    assert list(shapes) == ["p3", "p4", "p5", "p6", "p7"]
    assert [s.stride for s in shapes.values()] == [8, 16, 32, 64, 128]
    assert fpn.size_divisibility == 32
    assert_backbone_outputs(fpn, 128, 96)
    tb = fpn.top_block
    if relu and source != "on_lateral":
        assert type(tb) is LastLevelP6P7  # detectron2's own block
    else:
        assert isinstance(tb, ExtraConvLevels) and tb.relu_between == relu
    assert tb.in_feature == ("p5" if source == "on_output" else "res5")
    assert tb.p6.in_channels == (512 if source == "on_input" else 64)
    # the lateral conv is referenced, not registered twice
    keys = list(fpn.state_dict())
    assert len(keys) == len(set(keys)) and not any("top_block._lateral" in k for k in keys)


def test_on_lateral_equals_manual_lateral():
    fpn = build_fpn(_r18(), ["res3", "res4", "res5"], 32, top_block="p6", top_block_source="on_lateral").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        c5 = fpn.bottom_up(x)["res5"]
        expected = fpn.top_block.p6(fpn.fpn_lateral5(c5))
        torch.testing.assert_close(fpn(x)["p6"], expected)


def test_relu_between_p6_p7_matters():
    torch.manual_seed(0)
    a = build_fpn(_r18(), ["res3", "res4", "res5"], 32, top_block="p6p7", top_block_relu=True).eval()
    b = build_fpn(_r18(), ["res3", "res4", "res5"], 32, top_block="p6p7", top_block_relu=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        oa, ob = a(x), b(x)
    torch.testing.assert_close(oa["p6"], ob["p6"])
    assert not torch.allclose(oa["p7"], ob["p7"])


def test_p6_only_and_none():
    fpn = build_fpn(_r18(), ["res3", "res4", "res5"], 32, top_block="p6", top_block_source="on_output")
    assert list(fpn.output_shape()) == ["p3", "p4", "p5", "p6"]
    fpn = build_fpn(_r18(), C2_C5, 32, top_block="none")
    assert list(fpn.output_shape()) == ["p2", "p3", "p4", "p5"]
    assert_backbone_outputs(fpn, 64, 96)


def test_subset_of_levels_start_end():
    fpn = build_fpn(_r18(), ["res2", "res3", "res4"], 32, top_block="maxpool")
    assert list(fpn.output_shape()) == ["p2", "p3", "p4", "p5"]
    assert fpn.top_block.in_feature == "p4" and fpn.size_divisibility == 16
    assert_backbone_outputs(fpn, 48, 80)


def test_fpn_norm_and_fuse_type():
    fpn = build_fpn(_r18(), C2_C5, 64, norm="GN", fuse_type="avg")
    assert fpn.fpn_lateral2.norm is not None and fpn.fpn_lateral2.bias is None
    assert fpn._fuse_type == "avg"
    assert_backbone_outputs(fpn, 64, 64)


@pytest.mark.parametrize("kw,match", [
    (dict(in_features=["res2", "res6"]), r"contains 'res6'.*res2 \(stride 4, 64 ch\), res3 \(stride 8, 128 ch\)"),
    (dict(in_features=["res2", "res4"]), r"res2 has stride 4 and res4 has stride 16"),
    (dict(top_block="p6p8"), r"top_block='p6p8'.*Valid values: 'p6p7'"),
    (dict(top_block_source="on_top"), r"top_block_source='on_top'"),
    (dict(norm="GN", out_channels=48), r"norm='GN'.*48-channel"),
    (dict(fuse_type="max"), r"fuse_type='max'.*'sum', 'avg'"),
])
def test_fpn_errors(kw, match):
    args = dict(in_features=C2_C5, out_channels=32)
    args.update(kw)
    with pytest.raises(ConfigError, match=match):
        build_fpn(_r18(), **args)


def test_dilated_backbone_strides_error_names_features():
    bb = build_resnet(50, norm="BN", strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
    with pytest.raises(ConfigError, match=r"res4 has stride 16 and res5 has stride 16.*dilated"):
        with argument_keys({"in_features": "MODEL.FPN.IN_FEATURES"}):
            build_fpn(bb, C2_C5, 32)


@pytest.mark.slow
def test_scripting_and_tracing_match_eager():
    import detectron2.export.torchscript  # noqa: F401  (detectron2's scripting patches)
    fpn = build_fpn(build_resnet(50, norm="BN", deep_stem=True, avg_down=True,
                                 deform_on_per_stage=[False, False, True, True], deform_modulated=True,
                                 plugins=[dict(type="gc", stages=[False, True, True, True])]),
                    C2_C5, 32, top_block="p6p7", top_block_source="on_output", top_block_relu=False).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        eager = fpn(x)
        scripted = torch.jit.script(fpn)(x)
        traced = torch.jit.trace(fpn, x, strict=False)(x)
    for k in eager:
        torch.testing.assert_close(scripted[k], eager[k])
        torch.testing.assert_close(traced[k], eager[k])
