"""ResNet family: structure, shapes, parameter counts, freezing, norm_eval, with_cp, DCN, plugins, equivalence."""

import pytest
import timm
import torch
import torchvision
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import BasicStem

import d2_backbones
from d2_backbones import ConfigError, build_resnet
from d2_backbones import kwargs_from_cfg
from d2_backbones.errors import argument_keys
from d2_backbones.resnet import convert_timm_resnet, convert_torchvision_resnet
from d2_backbones.layers import count_params
from d2_backbones.resnet import DeepStem, ResNetDeformBottleneckBlock

from conftest import assert_backbone_outputs, train_step

STAGES = ["res2", "res3", "res4", "res5"]


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("strides,dilations,expected", [
    ((1, 2, 2, 1), (1, 1, 1, 2), [4, 8, 16, 16]),
    ((1, 2, 1, 1), (1, 1, 2, 4), [4, 8, 8, 8]),
    ((2, 2, 2, 2), (1, 1, 1, 1), [8, 16, 32, 64]),
])
@pytest.mark.parametrize("depth", [18, 50])
def test_per_stage_strides_and_dilations(strides, dilations, expected, depth):
    m = build_resnet(depth, strides=strides, dilations=dilations, norm="BN")
    assert [m.output_shape()[k].stride for k in STAGES] == expected
    assert_backbone_outputs(m, 67, 80)
    for name, d in zip(STAGES, dilations):
        block = getattr(m, name)[0]
        conv = block.conv1 if depth == 18 else block.conv2
        assert conv.dilation == (d, d) and conv.padding == (d, d)


def test_unused_stages_not_built():
    m = build_resnet(50, out_features=["res3"], norm="BN")
    assert hasattr(m, "res3") and not hasattr(m, "res4") and not hasattr(m, "res5")
    m = build_resnet(50, out_features=["stem"], norm="BN")
    assert not hasattr(m, "res2")
    assert list(m.output_shape()) == ["stem"]


# ------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("stride_in_1x1,expect", [(True, ((2, 2), (1, 1))), (False, ((1, 1), (2, 2)))])
def test_style_puts_stride_in_1x1_or_3x3(stride_in_1x1, expect):
    m = build_resnet(50, stride_in_1x1=stride_in_1x1, norm="BN")
    for stage in ["res3", "res4", "res5"]:
        b = getattr(m, stage)[0]
        assert (b.conv1.stride, b.conv2.stride) == expect
        assert getattr(m, stage)[1].conv1.stride == (1, 1) and getattr(m, stage)[1].conv2.stride == (1, 1)


def test_deep_stem_structure():
    m = build_resnet(50, deep_stem=True, norm="BN")
    assert isinstance(m.stem, DeepStem)
    convs = [m.stem.conv1, m.stem.conv2, m.stem.conv3]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 32, (3, 3), (2, 2)), (32, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1))]
    assert all(isinstance(c.norm, nn.BatchNorm2d) for c in convs)
    assert isinstance(build_resnet(50, norm="BN").stem, BasicStem)
    assert build_resnet(50, norm="BN").stem.conv1.kernel_size == (7, 7)


def test_avg_down_shortcut_structure():
    m = build_resnet(50, avg_down=True, norm="BN")
    for stage in ["res3", "res4", "res5"]:
        b = getattr(m, stage)[0]
        assert isinstance(b.shortcut_pool, nn.AvgPool2d)
        assert (b.shortcut_pool.kernel_size, b.shortcut_pool.stride) == (2, 2)
        assert b.shortcut_pool.ceil_mode and not b.shortcut_pool.count_include_pad
        assert b.shortcut.stride == (1, 1) and b.shortcut.kernel_size == (1, 1)
        assert getattr(m, stage)[1].shortcut is None
    # stride 1 (res2): no pool, the 1x1 projection stays because channels change (64 -> 256)
    assert m.res2[0].shortcut_pool is None and m.res2[0].shortcut.stride == (1, 1)
    plain = build_resnet(50, norm="BN")
    assert plain.res3[0].shortcut_pool is None and plain.res3[0].shortcut.stride == (2, 2)
    # ResNet-18 res2 keeps identity shortcuts (same channels, stride 1)
    assert build_resnet(18, avg_down=True, norm="BN").res2[0].shortcut is None


def test_resnext_groups_and_width():
    m = build_resnet(50, num_groups=32, width_per_group=4, norm="BN")
    assert m.res2[0].conv2.groups == 32 and m.res2[0].conv2.out_channels == 128
    assert m.res5[0].conv2.out_channels == 1024


# ------------------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("kw,expected", [
    (dict(depth=18), 11_176_512),
    (dict(depth=34), 21_284_672),
    (dict(depth=50), 23_508_032),
    (dict(depth=101), 42_500_160),
    (dict(depth=152), 58_143_808),
    (dict(depth=50, num_groups=32, width_per_group=4), 22_979_904),
    (dict(depth=101, num_groups=32, width_per_group=8), 86_742_336),
    (dict(depth=101, num_groups=64, width_per_group=4), 81_406_272),
    (dict(depth=18, deep_stem=True, avg_down=True), 11_195_744),
    (dict(depth=34, deep_stem=True, avg_down=True), 21_303_904),
    (dict(depth=50, deep_stem=True, avg_down=True), 23_527_264),
    (dict(depth=50, deep_stem=True), 23_527_264),
    (dict(depth=101, deep_stem=True, avg_down=True), 42_519_392),
])
def test_parameter_counts_match_reference(kw, expected):
    """anchors.md §2a: backbone-only counts (BN affine counted)."""
    assert count_params(build_resnet(norm="BN", **kw)) == expected


@pytest.mark.parametrize("depth,expected", [(18, 11_166_912), (50, 23_454_912), (101, 42_394_816)])
def test_frozen_bn_trainable_counts(depth, expected):
    assert count_params(build_resnet(depth, norm="FrozenBN"), trainable_only=True) == expected


# ------------------------------------------------------------------------------------------ freezing
def _stage_modules(m):
    return [("stem", m.stem)] + [(n, getattr(m, n)) for n in STAGES]


def test_freeze_at_out_of_range_is_clear():
    with pytest.raises(ConfigError, match=r"freeze_at=6 is out of range.*0, 1, 2, 3, 4, 5"):
        build_resnet(50, freeze_at=6)
    with pytest.raises(ConfigError, match=r"Valid values: 0, 1, 2, 3\. Fix"):
        build_resnet(50, freeze_at=4, out_features=["res3"])


def test_norm_eval_through_fpn_train_call():
    fpn = d2_backbones.build_fpn(build_resnet(18, norm="BN", norm_eval=True), ["res2", "res3", "res4", "res5"], 32)
    fpn.train()
    assert all(not x.training for x in fpn.bottom_up.modules() if isinstance(x, nn.BatchNorm2d))


# ------------------------------------------------------------------------------------------ with_cp
def test_with_cp_inactive_in_eval_and_no_grad():
    m = build_resnet(18, norm="BN", with_cp=True).eval()
    with torch.no_grad():
        m(torch.randn(1, 3, 32, 32))  # must not try to checkpoint


# ------------------------------------------------------------------------------------------ zero init
def test_zero_init_residual():
    m = build_resnet(50, norm="BN", zero_init_residual=True)
    for s in STAGES:
        for blk in getattr(m, s):
            assert torch.count_nonzero(blk.conv3.norm.weight) == 0
    basic = build_resnet(18, norm="BN", zero_init_residual=True)
    assert all(torch.count_nonzero(b.conv2.norm.weight) == 0 for s in STAGES for b in getattr(basic, s))
    # effect: a block without projection is the identity on non-negative input (relu(0 + x) = x)
    blk = m.res2[1].eval()
    x = torch.rand(1, 256, 8, 8)
    torch.testing.assert_close(blk(x), x)
    plain = build_resnet(50, norm="BN")
    assert all(torch.count_nonzero(b.conv3.norm.weight) > 0 for b in plain.res2)


# ------------------------------------------------------------------------------------------ DCN
@pytest.mark.parametrize("modulated", [False, True])
def test_dcn_runs_on_cpu_and_has_detectron2_names(modulated):
    m = build_resnet(50, norm="BN", deform_on_per_stage=[False, True, True, True], deform_modulated=modulated,
                     deform_num_groups=2)
    assert isinstance(m.res3[0], ResNetDeformBottleneckBlock) and not isinstance(m.res2[0], ResNetDeformBottleneckBlock)
    assert m.res3[0].conv2_offset.out_channels == (27 if modulated else 18) * 2
    keys = m.state_dict().keys()
    assert "res3.0.conv2_offset.weight" in keys and "res3.0.conv2.weight" in keys and "res3.0.conv2.norm.weight" in keys
    assert_backbone_outputs(m, 63, 50)
    train_step(m, torch.randn(1, 3, 48, 48))
    assert m.res4[0].conv2_offset.weight.grad is not None


def test_dcn_v1_with_zero_offsets_equals_plain_conv():
    torch.manual_seed(0)
    dcn = build_resnet(50, norm="BN", deform_on_per_stage=[True, True, True, True]).eval()
    plain = build_resnet(50, norm="BN").eval()
    sd = {k: v for k, v in dcn.state_dict().items() if "conv2_offset" not in k}
    plain.load_state_dict(sd)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = dcn(x), plain(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


def test_dcn_offsets_change_output():
    m = build_resnet(50, norm="BN", deform_on_per_stage=[False, False, False, True]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = m(x)["res5"]
        nn.init.normal_(m.res5[0].conv2_offset.weight, std=0.5)
        b = m(x)["res5"]
    assert not torch.allclose(a, b)


# ------------------------------------------------------------------------------------------ plugins
def test_plugins_positions_names_and_identity_init():
    plugins = [dict(type="gc", position="after_conv3", stages=[False, True, True, True], ratio=1 / 16),
               dict(type="se", position="after_conv2", stages=[True, False, False, False])]
    m = build_resnet(50, norm="BN", plugins=plugins).eval()
    keys = m.state_dict().keys()
    assert "res3.0.after_conv3.gc.conv_mask.weight" in keys
    assert "res2.0.after_conv2.se.conv_reduce.weight" in keys
    assert not any(k.startswith("res2.") and ".gc." in k for k in keys)
    assert m.res3[0].after_conv3.gc.channel_add_conv[0].out_channels == 512 // 16
    assert m.res2[0].after_conv2.se.conv_reduce.out_channels == 64 // 16
    assert_backbone_outputs(m, 64, 48)
    # GC blocks start as identity (zero-init last conv): same output as the model without them
    gc_only = build_resnet(50, norm="BN", plugins=plugins[:1]).eval()
    plain = build_resnet(50, norm="BN").eval()
    plain.load_state_dict({k: v for k, v in gc_only.state_dict().items() if ".gc." not in k})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gc_only(x)["res5"], plain(x)["res5"])
    train_step(m, torch.randn(1, 3, 64, 64))
    assert m.res3[0].after_conv3.gc.channel_add_conv[3].weight.grad is not None


def test_plugins_on_basic_block():
    m = build_resnet(18, norm="BN", plugins=[dict(type="se", position="after_conv1")])
    assert_backbone_outputs(m, 40, 40)
    with pytest.raises(ConfigError, match=r"after_conv3.*BasicBlock"):
        build_resnet(18, plugins=[dict(type="gc", position="after_conv3")])


@pytest.mark.parametrize("plugin,match", [
    (dict(type="nonlocal"), r"TYPE='nonlocal'.*Valid values: 'gc', 'se'"),
    (dict(type="gc", position="after_conv4"), r"POSITION='after_conv4'.*after_conv1"),
    (dict(type="gc", stages=[True, True]), r"STAGES.*4 booleans"),
    (dict(type="gc", rate=0.1), r"'RATE' is not a plugin field.*'RATIO'"),
])
def test_plugin_errors(plugin, match):
    with pytest.raises(ConfigError, match=match):
        with argument_keys({"plugins": "MODEL.RESNETS.PLUGINS"}):
            build_resnet(50, plugins=[plugin])


# ------------------------------------------------------------------------------------------ equivalence
def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)


def _tv_features(tv, x):
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    out = {}
    for i, name in enumerate(STAGES):
        x = getattr(tv, f"layer{i + 1}")(x)
        out[name] = x
    return out


@pytest.mark.parametrize("arch,depth,kw", [("resnet18", 18, {}), ("resnet50", 50, {}),
                                           ("resnext50_32x4d", 50, dict(num_groups=32, width_per_group=4))])
def test_equivalent_to_torchvision(arch, depth, kw):
    tv = getattr(torchvision.models, arch)(weights=None)
    _randomize_bn(tv)
    tv.eval()
    sd, dropped = convert_torchvision_resnet(tv.state_dict())
    assert dropped == ["fc.bias", "fc.weight"]
    ours = build_resnet(depth, norm="BN", stride_in_1x1=False, **kw).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        a, b = ours(x), _tv_features(tv, x)
    for k in STAGES:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


def test_equivalent_to_timm_resnet50d():
    ref = timm.create_model("resnet50d", pretrained=False)
    _randomize_bn(ref)
    ref.eval()
    sd, dropped = convert_timm_resnet(ref.state_dict())
    assert dropped == ["fc.bias", "fc.weight"]
    ours = build_resnet(50, norm="BN", deep_stem=True, avg_down=True).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        feats = ref.forward_intermediates(x, indices=4, intermediates_only=True)
        a = ours(x)
    for k, f in zip(STAGES, feats[-4:]):
        torch.testing.assert_close(a[k], f, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ cfg mapping + errors
def _cfg(**opts):
    cfg = d2_backbones.get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_d2b_resnet_backbone"
    cfg.MODEL.META_ARCHITECTURE = "ProposalNetwork"
    cfg.MODEL.RPN.IN_FEATURES = ["res4"]
    for k, v in opts.items():
        cfg.merge_from_list([k, v])
    return cfg


def test_kwargs_from_cfg_mapping():
    cfg = _cfg(**{"MODEL.RESNETS.DEPTH": 101, "MODEL.RESNETS.DEEP_STEM": True, "MODEL.RESNETS.AVG_DOWN": True,
                  "MODEL.RESNETS.STRIDE_IN_1X1": False, "MODEL.RESNETS.NORM": "BN",
                  "MODEL.RESNETS.NORM_EVAL": True, "MODEL.RESNETS.WITH_CP": True,
                  "MODEL.RESNETS.STAGE_STRIDES": [1, 2, 2, 2], "MODEL.RESNETS.RES5_DILATION": 2,
                  "MODEL.RESNETS.FROZEN_STAGES": 0, "MODEL.RESNETS.PLUGINS": [{"TYPE": "gc"}]})
    kw = kwargs_from_cfg("resnet", cfg, ShapeSpec(channels=3))
    assert kw["depth"] == 101 and kw["deep_stem"] and kw["avg_down"] and not kw["stride_in_1x1"]
    assert kw["norm"] == "BN" and kw["norm_eval"] and kw["with_cp"]
    assert kw["strides"] == [1, 2, 2, 1] and kw["dilations"] == [1, 1, 1, 2]  # detectron2's RES5_DILATION convention
    assert kw["freeze_at"] == 1  # mmdet frozen_stages 0 == FREEZE_AT 1
    assert kw["plugins"] == [{"TYPE": "gc"}]


@pytest.mark.parametrize("frozen_stages,freeze_at,expected", [(-1, 2, 0), (1, 2, 2), (3, 4, 4), (None, 3, 3)])
def test_frozen_stages_alias(frozen_stages, freeze_at, expected):
    cfg = _cfg(**{"MODEL.RESNETS.FROZEN_STAGES": frozen_stages, "MODEL.BACKBONE.FREEZE_AT": freeze_at})
    assert kwargs_from_cfg("resnet", cfg, ShapeSpec(channels=3))["freeze_at"] == expected


def test_frozen_stages_conflict_is_an_error():
    cfg = _cfg(**{"MODEL.RESNETS.FROZEN_STAGES": 2, "MODEL.BACKBONE.FREEZE_AT": 1})
    with pytest.raises(ConfigError, match=r"MODEL.RESNETS.FROZEN_STAGES=2.*FREEZE_AT=3.*disagrees.*FREEZE_AT=1"):
        build_backbone(cfg)


@pytest.mark.parametrize("opts,match", [
    ({"MODEL.RESNETS.DEPTH": 42}, r"MODEL.RESNETS.DEPTH=42 is not supported. Valid values: 18, 34, 50, 101, 152"),
    ({"MODEL.RESNETS.NORM": "syncbn"}, r"MODEL.RESNETS.NORM='syncbn'.*Valid values: 'SyncBN'"),
    ({"MODEL.RESNETS.OUT_FEATURES": ["res2", "res6"]}, r"OUT_FEATURES.*'res6'.*'stem', 'res2'"),
    ({"MODEL.BACKBONE.FREEZE_AT": 7}, r"MODEL.BACKBONE.FREEZE_AT=7 is out of range"),
    ({"MODEL.RESNETS.DEPTH": 18}, r"MODEL.RESNETS.RES2_OUT_CHANNELS=256.*must be 64 for ResNet-18"),
    ({"MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
      "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, True, True, True]},
     r"DEFORM_ON_PER_STAGE.*Bottleneck blocks \(depth >= 50\)"),
    ({"MODEL.RESNETS.STAGE_STRIDES": [1, 2, 2]}, r"STAGE_STRIDES=\[1, 2, 2\] must be 4 positive ints"),
    ({"MODEL.RESNETS.RES5_DILATION": 3}, r"RES5_DILATION=3.*Valid values: 1, 2"),
    ({"MODEL.RESNETS.NORM": "GN", "MODEL.RESNETS.STEM_OUT_CHANNELS": 48},
     r"MODEL.RESNETS.NORM='GN'.*32 groups.*(24|48)-channel"),
    ({"MODEL.RESNETS.PLUGINS": [{"TYPE": "xx"}]}, r"MODEL.RESNETS.PLUGINS\[0\].TYPE='xx'"),
])
def test_cfg_errors_name_key_value_valid_and_fix(opts, match):
    cfg = _cfg(**opts)
    with pytest.raises(ConfigError, match=match) as e:
        build_backbone(cfg)
    assert "Fix:" in str(e.value) or "Valid values" in str(e.value)
