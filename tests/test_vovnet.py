"""VoVNetV2-eSE / VoVNetV1: architecture, parameter counts, freezing, checkpoints, timm equivalence, configs.

Reference numbers (spec table, parameter counts, key names) are facts from vovnet-detectron2's
``vovnet/vovnet.py`` and timm, as listed in the project's reference notes; timm models are built
with random weights (no downloads).
"""
import math
import os

import pytest
import timm
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone, build_model

import d2_backbones
from d2_backbones import FAMILIES, kwargs_from_cfg
from d2_backbones.errors import ConfigError, nearest_first
from d2_backbones.fpn import build_fpn
from d2_backbones.layers import count_params
from d2_backbones.vovnet import (
    VOVNET_SPECS, DeformConvUnit, OSAModule, VoVNet, VoVNetSpec, convert_timm_vovnet, convert_vovnet_detectron2,
)

from conftest import (
    CONFIG_DIR, assert_backbone_outputs, build_and_infer, leaf_configs, load_cfg, train_step,
)

# vovnet-detectron2's spec table: stem, stage_conv_ch, stage_out_ch, layer_per_block, block_per_stage, dw.
REFERENCE_SPECS = {
    "V-19-slim-dw-eSE": ([64, 64, 64], [64, 80, 96, 112], [112, 256, 384, 512], 3, [1, 1, 1, 1], True),
    "V-19-dw-eSE": ([64, 64, 64], [128, 160, 192, 224], [256, 512, 768, 1024], 3, [1, 1, 1, 1], True),
    "V-19-slim-eSE": ([64, 64, 128], [64, 80, 96, 112], [112, 256, 384, 512], 3, [1, 1, 1, 1], False),
    "V-19-eSE": ([64, 64, 128], [128, 160, 192, 224], [256, 512, 768, 1024], 3, [1, 1, 1, 1], False),
    "V-39-eSE": ([64, 64, 128], [128, 160, 192, 224], [256, 512, 768, 1024], 5, [1, 1, 2, 2], False),
    "V-57-eSE": ([64, 64, 128], [128, 160, 192, 224], [256, 512, 768, 1024], 5, [1, 1, 4, 3], False),
    "V-99-eSE": ([64, 64, 128], [128, 160, 192, 224], [256, 512, 768, 1024], 5, [1, 3, 9, 3], False),
}
V1_TIMM = {"VoVNetV1-39": "vovnet39a", "VoVNetV1-57": "vovnet57a"}

# Parameter counts of vovnet-detectron2 (eSE in every module) with BN / trainable with FrozenBN,
# and timm's ese_vovnet* body (eSE in the last module of each stage).
PARAMS_ALL_BN = {"V-19-slim-dw-eSE": 1_384_752, "V-19-dw-eSE": 5_518_080, "V-19-slim-eSE": 2_653_136,
                 "V-19-eSE": 10_180_416, "V-39-eSE": 25_184_128, "V-57-eSE": 41_454_912, "V-99-eSE": 69_523_520}
PARAMS_ALL_FROZEN = {"V-19-slim-dw-eSE": 1_379_152, "V-19-dw-eSE": 5_506_944, "V-19-slim-eSE": 2_647_984,
                     "V-19-eSE": 10_170_560, "V-39-eSE": 25_163_712, "V-57-eSE": 41_423_296, "V-99-eSE": 69_469_376}
PARAMS_LAST_BN = {"V-19-slim-dw-eSE": 1_384_752, "V-19-dw-eSE": 5_518_080, "V-19-slim-eSE": 2_653_136,
                  "V-19-eSE": 10_180_416, "V-39-eSE": 23_543_936, "V-57-eSE": 37_583_936, "V-99-eSE": 62_174_272}

ALL_FEATURES = ["stem", "stage2", "stage3", "stage4", "stage5"]
CASES = [(n, p) for n in REFERENCE_SPECS for p in ("all", "last")] + [(n, None) for n in V1_TIMM]


def vovnet_size(size: int, stride: int) -> int:
    """Stem convs round up (ceil(H/4)); each ceil-mode, unpadded 3x3/2 max-pool floors: n -> n // 2."""
    n = math.ceil(size / 4)
    return n * 4 // stride


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


def _timm_body_params(name: str) -> int:
    t = timm.create_model(name, pretrained=False)
    return count_params(t) - count_params(t.get_classifier())


def _cfg(*opts):
    cfg = d2_backbones.get_cfg()
    # backbone-only builds: point the (default) R-CNN heads at a VoVNet feature
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RPN.IN_FEATURES", "['stage4']",
                         "MODEL.ROI_HEADS.IN_FEATURES", "['stage4']"] + list(opts))
    return cfg


# ---------------------------------------------------------------------------------------------
# spec table, shapes, parameter counts
# ---------------------------------------------------------------------------------------------
def test_spec_table_matches_reference():
    for name, (stem, conv, out, layers, blocks, dw) in REFERENCE_SPECS.items():
        s = VOVNET_SPECS[name]
        assert (list(s.stem), list(s.stage_conv_ch), list(s.stage_out_ch), s.layer_per_block,
                list(s.block_per_stage), s.depthwise) == (stem, conv, out, layers, blocks, dw), name
        assert s.residual and s.ese == "all", name
    for name in V1_TIMM:
        s = VOVNET_SPECS[name]
        assert not s.residual and s.ese == "none"
        assert s.stage_out_ch == VOVNET_SPECS[name.replace("VoVNetV1", "V") + "-eSE"].stage_out_ch


@pytest.mark.parametrize("name,placement", CASES)
def test_shapes_strides_and_param_counts(name, placement):
    model = VoVNet(name, norm="BN", ese_placement=placement, out_features=ALL_FEATURES)
    spec = VOVNET_SPECS[name]
    if placement is None:
        assert count_params(model) == _timm_body_params(V1_TIMM[name])
    else:
        expected = PARAMS_ALL_BN if placement == "all" else PARAMS_LAST_BN
        assert count_params(model) == expected[name]
        n_ese = sum(isinstance(m, OSAModule) and m.ese is not None for m in model.modules())
        assert n_ese == (sum(spec.block_per_stage) if placement == "all" else 4)
    shapes = model.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "stem": (spec.stem[2], 4), "stage2": (spec.stage_out_ch[0], 4), "stage3": (spec.stage_out_ch[1], 8),
        "stage4": (spec.stage_out_ch[2], 16), "stage5": (spec.stage_out_ch[3], 32)}
    assert_backbone_outputs(model, 64, 96, size_fn=vovnet_size)
    assert_backbone_outputs(model, 67, 101, size_fn=vovnet_size)  # odd: stage5 is 2x3, not ceil's 3x4


@pytest.mark.parametrize("name", list(REFERENCE_SPECS))
def test_frozen_bn_param_counts(name):
    model = VoVNet(name, norm="FrozenBN")
    assert count_params(model) == PARAMS_ALL_FROZEN[name]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_odd_size_floors_where_resnet_ceils():
    model = VoVNet("V-19-slim-dw-eSE", norm="BN", out_features=ALL_FEATURES).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 32, 1333))
    widths = {k: v.shape[-1] for k, v in out.items()}
    assert widths == {"stem": 334, "stage2": 334, "stage3": 167, "stage4": 83, "stage5": 41}
    assert math.ceil(1333 / 16) == 84  # what a padded strided conv (ResNet) gives


def test_unused_stages_not_built_and_output_order():
    model = VoVNet("V-39-eSE", norm="BN", out_features=["stage3", "stem"])
    assert [n for n, _ in model.named_children()] == ["stem", "stage2", "stage3"]
    assert list(model.output_shape()) == ["stem", "stage3"]
    out = model.eval()(torch.zeros(1, 3, 64, 64))
    assert list(out) == ["stem", "stage3"]


def test_fpn_param_counts():
    for name, fpn256, fpn128 in [("V-19-slim-dw-eSE", 2_684_928, 752_640), ("V-39-eSE", 3_016_704, 918_528)]:
        body = VoVNet(name, norm="FrozenBN")
        base = count_params(body)
        for ch, extra in ((256, fpn256), (128, fpn128)):
            fpn = build_fpn(body, ["stage2", "stage3", "stage4", "stage5"], ch, top_block="maxpool")
            assert count_params(fpn) - base == extra
            assert fpn.output_shape()["p6"] == ShapeSpec(channels=ch, stride=64)


# ---------------------------------------------------------------------------------------------
# gradients, freezing, norm_eval, with_cp
# ---------------------------------------------------------------------------------------------
def test_dcn_gradients_counts_and_names():
    model = VoVNet("V-39-eSE", norm="FrozenBN", stage_with_dcn=[False, True, True, True], with_modulated_dcn=True)
    assert count_params(model) == 26_937_315  # centermask2 V-39 + DCNv2 on stages 3-5
    sd = model.state_dict()
    assert tuple(sd["stage3.OSA3_1.layers.0.OSA3_1_0/conv_offset.weight"].shape) == (27, 256, 3, 3)
    assert tuple(sd["stage3.OSA3_1.layers.0.OSA3_1_0/conv_offset.bias"].shape) == (27,)
    assert tuple(sd["stage3.OSA3_1.layers.0.OSA3_1_0/conv.weight"].shape) == (160, 256, 3, 3)
    assert "stage3.OSA3_1.layers.0.OSA3_1_0/norm.running_mean" in sd
    assert not any("conv_offset" in k for k in sd if k.startswith("stage2."))
    model = VoVNet("V-19-eSE", norm="BN", stage_with_dcn=[False, False, True, True], with_modulated_dcn=True,
                   deformable_groups=2)
    train_step(model, torch.randn(2, 3, 64, 64))
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad[:5]


def test_dcn_v1_with_zero_offsets_equals_plain_conv_and_v2_halves():
    plain = VoVNet("V-19-eSE", norm="BN").eval()
    _randomize_bn(plain)
    dcn = VoVNet("V-19-eSE", norm="BN", stage_with_dcn=[False, True, True, True]).eval()
    missing = dcn.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith(("/conv_offset.weight", "/conv_offset.bias")) for k in missing)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = plain(x), dcn(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    unit = DeformConvUnit(8, 16, "u", d2_backbones.layers.CheckedNorm(""), modulated=True).eval()
    conv = getattr(unit, "u/conv")
    x = torch.randn(1, 8, 9, 11)
    with torch.no_grad():
        ref = torch.relu(0.5 * nn.functional.conv2d(x, conv.weight, padding=1) + conv.bias.view(1, -1, 1, 1))
        torch.testing.assert_close(unit(x), ref, rtol=1e-4, atol=1e-5)


def test_freeze_at_from_cfg_and_out_of_range():
    cfg = _cfg("MODEL.BACKBONE.NAME", "build_d2b_vovnet_backbone", "MODEL.VOVNET.CONV_BODY", "V-19-slim-dw-eSE",
               "MODEL.VOVNET.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", 2)
    model = build_backbone(cfg)
    assert isinstance(getattr(model.stage2.OSA2_1.concat, "OSA2_1_concat/norm"), FrozenBatchNorm2d)
    assert isinstance(getattr(model.stage3.OSA3_1.concat, "OSA3_1_concat/norm"), nn.BatchNorm2d)
    with pytest.raises(ConfigError, match=r"MODEL\.BACKBONE\.FREEZE_AT=6"):
        build_backbone(_cfg("MODEL.BACKBONE.NAME", "build_d2b_vovnet_backbone", "MODEL.BACKBONE.FREEZE_AT", 6))
    with pytest.raises(ConfigError, match="freeze_at=4"):
        VoVNet("V-19-eSE", out_features=["stage3"], freeze_at=4)


# ---------------------------------------------------------------------------------------------
# checkpoints: vovnet-detectron2 names, DetectionCheckpointer, timm conversion + equivalence
# ---------------------------------------------------------------------------------------------
def reference_keys(name: str, frozen_bn: bool = True):
    """vovnet-detectron2's state-dict keys and shapes, written from its module structure."""
    stem, conv, out, layers, blocks, dw = REFERENCE_SPECS[name]
    keys = {}

    def norm(prefix, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{s}"] = (c,)
        if not frozen_bn:
            keys[f"{prefix}.num_batches_tracked"] = ()

    def conv_norm(prefix, cin, cout, k):
        keys[f"{prefix}/conv.weight"] = (cout, cin, k, k)
        norm(f"{prefix}/norm", cout)

    def dw_unit(prefix, c):
        keys[f"{prefix}/dw_conv3x3.weight"] = (c, 1, 3, 3)
        keys[f"{prefix}/pw_conv1x1.weight"] = (c, c, 1, 1)
        norm(f"{prefix}/pw_norm", c)

    conv_norm("stem.stem_1", 3, stem[0], 3)
    for i in (2, 3):
        if dw:
            dw_unit(f"stem.stem_{i}", stem[i - 1])
        else:
            conv_norm(f"stem.stem_{i}", stem[i - 2], stem[i - 1], 3)
    in_ch = stem[2]
    for s in range(4):
        n = s + 2
        for b in range(blocks[s]):
            osa = f"OSA{n}_{b + 1}"
            m = f"stage{n}.{osa}"
            cin = in_ch if b == 0 else out[s]
            if dw and cin != conv[s]:
                conv_norm(f"{m}.conv_reduction.{osa}_reduction_0", cin, conv[s], 1)
            c = cin
            for i in range(layers):
                if dw:
                    dw_unit(f"{m}.layers.{i}.{osa}_{i}", conv[s])
                else:
                    conv_norm(f"{m}.layers.{i}.{osa}_{i}", c, conv[s], 3)
                c = conv[s]
            conv_norm(f"{m}.concat.{osa}_concat", cin + layers * conv[s], out[s], 1)
            keys[f"{m}.ese.fc.weight"] = (out[s], out[s], 1, 1)
            keys[f"{m}.ese.fc.bias"] = (out[s],)
        in_ch = out[s]
    return keys


def test_reference_key_names_spot_check():
    keys = reference_keys("V-39-eSE")
    assert len(keys) == 207  # V-39 with FrozenBN
    for k in ["stem.stem_1/conv.weight", "stem.stem_1/norm.running_var", "stage2.OSA2_1.layers.0.OSA2_1_0/conv.weight",
              "stage2.OSA2_1.concat.OSA2_1_concat/norm.bias", "stage2.OSA2_1.ese.fc.weight",
              "stage4.OSA4_2.ese.fc.bias"]:
        assert k in keys
    dw = reference_keys("V-19-slim-dw-eSE")
    for k in ["stem.stem_2/dw_conv3x3.weight", "stem.stem_3/pw_conv1x1.weight", "stem.stem_3/pw_norm.weight",
              "stage3.OSA3_1.conv_reduction.OSA3_1_reduction_0/conv.weight",
              "stage2.OSA2_1.layers.2.OSA2_1_2/pw_norm.bias"]:
        assert k in dw


@pytest.mark.parametrize("name", list(REFERENCE_SPECS))
def test_golden_vovnet_detectron2_keys_load_strict(name):
    big = sum(VOVNET_SPECS[name].block_per_stage) > 6
    for frozen in (True,) if big else (True, False):  # published checkpoints are FrozenBN; BN adds counters
        golden = reference_keys(name, frozen_bn=frozen)
        model = VoVNet(name, norm="FrozenBN" if frozen else "BN")
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == golden
        sd = {k: (torch.rand(shape) + 0.5 if shape else torch.tensor(3)) for k, shape in golden.items()}
        assert not model.load_state_dict(sd, strict=True).missing_keys
        assert torch.equal(model.state_dict()["stem.stem_1/conv.weight"], sd["stem.stem_1/conv.weight"])
    if name == "V-39-eSE":
        with pytest.raises(RuntimeError, match="Unexpected key"):
            VoVNet(name, norm="FrozenBN", ese_placement="last").load_state_dict(sd, strict=True)


def _detector():
    return build_model(load_cfg(os.path.join(CONFIG_DIR, "VoVNet", "faster_rcnn_V_19_slim_dw_eSE_FPNLite_3x.yaml")))


def test_detection_checkpointer_loads_vovnet_detectron2_files(tmp_path):
    source = _detector()
    body = {k: v + 0.25 for k, v in source.backbone.bottom_up.state_dict().items()}  # distinct values
    prefixed = {"backbone.bottom_up." + k: v for k, v in body.items()}
    files = {
        "wrapped.pth": ({"model": prefixed}, ""),
        "bare_prefixed.pth": (prefixed, ""),
        "bare_unprefixed.pth": (body, "?matching_heuristics=True"),
    }
    for fname, (content, query) in files.items():
        path = str(tmp_path / fname)
        torch.save(content, path)
        model = _detector()
        DetectionCheckpointer(model).load(path + query)
        loaded = model.backbone.bottom_up.state_dict()
        assert loaded.keys() == body.keys()
        for k, v in body.items():
            assert torch.equal(loaded[k], v), (fname, k)
    # into a bare VoVNet: strip the prefix / wrapper, drop the other parts
    sd, dropped = convert_vovnet_detectron2({"model": {**prefixed, "backbone.fpn_lateral2.weight": torch.zeros(1),
                                                       "roi_heads.box_head.fc1.bias": torch.zeros(1)}})
    assert dropped == ["backbone.fpn_lateral2.weight", "roi_heads.box_head.fc1.bias"]
    VoVNet("V-19-slim-dw-eSE").load_state_dict(sd, strict=True)


@pytest.mark.parametrize("timm_name,ours", [("ese_vovnet19b_dw", "V-19-dw-eSE"), ("ese_vovnet39b", "V-39-eSE"),
                                            ("vovnet39a", "VoVNetV1-39")])
def test_timm_weights_convert_and_match_features(timm_name, ours):
    ref = timm.create_model(timm_name, pretrained=False).eval()
    _randomize_bn(ref)
    sd, dropped = convert_timm_vovnet(ref.state_dict())
    assert [k for k in dropped if not k.endswith("num_batches_tracked")] == ["head.fc.bias", "head.fc.weight"]
    prefixed, _ = convert_timm_vovnet(ref.state_dict(), prefix="backbone.bottom_up.")
    assert prefixed.keys() == {"backbone.bottom_up." + k for k in sd}
    placement = None if ours.startswith("VoVNetV1") else "last"
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
    for norm in ("BN", "FrozenBN"):
        model = VoVNet(ours, norm=norm, ese_placement=placement)
        model.load_state_dict(sd, strict=True)
        model.eval()
        with torch.no_grad():
            out = model(x)
        for i, f in enumerate(["stage2", "stage3", "stage4", "stage5"]):
            assert out[f].abs().mean() > 0
            torch.testing.assert_close(out[f], expected[i], rtol=1e-4, atol=1e-4)
    if placement == "last" and VOVNET_SPECS[ours].block_per_stage != (1, 1, 1, 1):
        with pytest.raises(RuntimeError, match="Missing key"):  # timm weights need ESE_PLACEMENT "last"
            VoVNet(ours, norm="BN").load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------
# config, registry, errors
# ---------------------------------------------------------------------------------------------
def test_config_keys_and_kwargs_mapping():
    cfg = d2_backbones.get_cfg()
    v = cfg.MODEL.VOVNET
    assert (v.CONV_BODY, list(v.OUT_FEATURES), v.NORM) == ("V-39-eSE", ["stage2", "stage3", "stage4", "stage5"],
                                                          "FrozenBN")
    assert "OUT_CHANNELS" not in v and "BACKBONE_OUT_CHANNELS" not in v
    cfg.merge_from_list(["MODEL.VOVNET.CONV_BODY", "V-19-eSE", "MODEL.VOVNET.ESE_PLACEMENT", "last",
                         "MODEL.VOVNET.STAGE_WITH_DCN", "[False, False, True, True]", "MODEL.BACKBONE.FREEZE_AT", 3])
    kw = kwargs_from_cfg("vovnet", cfg, ShapeSpec(channels=3))
    assert kw == dict(spec="V-19-eSE", norm="FrozenBN", out_features=["stage2", "stage3", "stage4", "stage5"],
                      freeze_at=3, norm_eval=False, with_cp=False, ese_placement="last",
                      stage_with_dcn=[False, False, True, True], with_modulated_dcn=False, deformable_groups=1,
                      in_channels=3)
    assert set(FAMILIES["vovnet"].arg_keys) | {"in_channels"} == set(kw)


def test_unknown_conv_body_lists_valid_names_nearest_first():
    with pytest.raises(ConfigError) as e:
        build_backbone(_cfg("MODEL.BACKBONE.NAME", "build_d2b_vovnet_backbone", "MODEL.VOVNET.CONV_BODY", "V-39"))
    msg = str(e.value)
    assert "MODEL.VOVNET.CONV_BODY='V-39'" in msg
    listed = ", ".join(repr(n) for n in nearest_first("V-39", VOVNET_SPECS))
    assert listed in msg and msg.index("'V-39-eSE'") < msg.index("'V-99-eSE'")


def test_bad_out_features_and_other_errors():
    with pytest.raises(ConfigError, match=r"MODEL\.VOVNET\.OUT_FEATURES.*'res2'.*stage2"):
        build_backbone(_cfg("MODEL.BACKBONE.NAME", "build_d2b_vovnet_backbone",
                            "MODEL.VOVNET.OUT_FEATURES", "['res2', 'res3']"))
    with pytest.raises(ConfigError, match=r"MODEL\.FPN\.IN_FEATURES"):
        build_backbone(_cfg("MODEL.BACKBONE.NAME", "build_d2b_vovnet_fpn_backbone",
                            "MODEL.FPN.IN_FEATURES", "['res2', 'res3', 'res4', 'res5']"))
    with pytest.raises(ConfigError, match=r"MODEL\.VOVNET\.ESE_PLACEMENT='first'"):
        build_backbone(_cfg("MODEL.BACKBONE.NAME", "build_d2b_vovnet_backbone", "MODEL.VOVNET.ESE_PLACEMENT",
                            "first"))
    with pytest.raises(ConfigError, match=r"MODEL\.VOVNET\.STAGE_WITH_DCN.*depthwise"):
        build_backbone(_cfg("MODEL.BACKBONE.NAME", "build_d2b_vovnet_backbone", "MODEL.VOVNET.CONV_BODY",
                            "V-19-dw-eSE", "MODEL.VOVNET.STAGE_WITH_DCN", "[False, True, True, True]"))
    with pytest.raises(ConfigError, match=r"MODEL\.VOVNET\.DEFORMABLE_GROUPS=3"):
        build_backbone(_cfg("MODEL.BACKBONE.NAME", "build_d2b_vovnet_backbone",
                            "MODEL.VOVNET.STAGE_WITH_DCN", "[False, True, False, False]",
                            "MODEL.VOVNET.DEFORMABLE_GROUPS", 3))
    with pytest.raises(ConfigError, match="unknown fields"):
        VoVNet({"stem": [64, 64, 128], "width": 3})


def test_gn_mismatch_on_slim_variants():
    for name in ("V-19-slim-eSE", "V-19-slim-dw-eSE"):
        with pytest.raises(ConfigError, match=r"MODEL\.VOVNET\.NORM='GN'.*(80|112)-channel"):
            build_backbone(_cfg("MODEL.BACKBONE.NAME", "build_d2b_vovnet_backbone", "MODEL.VOVNET.CONV_BODY", name,
                                "MODEL.VOVNET.NORM", "GN"))
    model = VoVNet("V-19-eSE", norm="GN")  # every width of V-19-eSE is a multiple of 32
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


def test_custom_spec():
    spec = VoVNetSpec(stem=(16, 16, 32), stage_conv_ch=(16, 24, 32, 40), stage_out_ch=(32, 64, 96, 128),
                      layer_per_block=2, block_per_stage=(1, 2, 1, 1), depthwise=False, residual=True, ese="last")
    model = VoVNet(spec, norm="BN", out_features=["stage3", "stage5"])
    assert model.spec_name == "custom"
    assert {k: v.channels for k, v in model.output_shape().items()} == {"stage3": 64, "stage5": 128}
    assert model.stage3.OSA3_1.ese is None and model.stage3.OSA3_2.ese is not None and model.stage3.OSA3_2.identity


def test_vovnet_detectron2_style_yaml_builds_through_alias(tmp_path):
    # the keys vovnet-detectron2's Base-RCNN-VoVNet-FPN.yaml + faster_rcnn_V_19_slim_dw_FPNLite_3x.yaml set
    # (MODEL.WEIGHTS left out: its URL form is not loadable offline), plus centermask2's DCN keys
    (tmp_path / "Base.yaml").write_text(
        'MODEL:\n  META_ARCHITECTURE: "GeneralizedRCNN"\n  BACKBONE:\n    NAME: "build_vovnet_fpn_backbone"\n'
        '    FREEZE_AT: 0\n  VOVNET:\n    OUT_FEATURES: ["stage2", "stage3", "stage4", "stage5"]\n'
        '  FPN:\n    IN_FEATURES: ["stage2", "stage3", "stage4", "stage5"]\n'
        '  RPN:\n    IN_FEATURES: ["p2", "p3", "p4", "p5", "p6"]\n'
        '  ROI_HEADS:\n    NAME: "StandardROIHeads"\n    IN_FEATURES: ["p2", "p3", "p4", "p5"]\n')
    (tmp_path / "leaf.yaml").write_text(
        '_BASE_: "Base.yaml"\nMODEL:\n  MASK_ON: False\n  VOVNET:\n    CONV_BODY : "V-19-eSE"\n'
        '    STAGE_WITH_DCN: (False, False, False, True)\n    WITH_MODULATED_DCN: True\n    DEFORMABLE_GROUPS: 1\n'
        '  FPN:\n    OUT_CHANNELS: 128\n')
    assert "build_vovnet_fpn_backbone" not in BACKBONE_REGISTRY
    cfg = load_cfg(str(tmp_path / "leaf.yaml"))
    backbone = build_backbone(cfg)
    assert type(backbone.bottom_up) is VoVNet and backbone.bottom_up.spec_name == "V-19-eSE"
    assert {k: v.channels for k, v in backbone.output_shape().items()} == {f"p{i}": 128 for i in range(2, 7)}
    assert any(isinstance(m, DeformConvUnit) for m in backbone.bottom_up.stage5.modules())

    # when vovnet-detectron2 registers its own name, that one is used and nothing raises
    def build_vovnet_fpn_backbone(cfg, input_shape):
        return "theirs"

    BACKBONE_REGISTRY.register(build_vovnet_fpn_backbone)
    try:
        assert BACKBONE_REGISTRY.get("build_vovnet_fpn_backbone")(cfg, None) == "theirs"
    finally:
        del BACKBONE_REGISTRY._obj_map["build_vovnet_fpn_backbone"]

    # a MODEL.VOVNET node replaced by vovnet-detectron2's add_vovnet_config (its 5 keys) still builds
    cfg.defrost()
    from detectron2.config import CfgNode as CN
    cfg.MODEL.VOVNET = CN({"CONV_BODY": "V-19-slim-eSE", "OUT_FEATURES": ["stage2", "stage3", "stage4", "stage5"],
                           "NORM": "FrozenBN", "OUT_CHANNELS": 256, "BACKBONE_OUT_CHANNELS": 256})
    assert build_backbone(cfg).bottom_up.spec_name == "V-19-slim-eSE"


@pytest.mark.slow
@pytest.mark.parametrize("path", leaf_configs("VoVNet"), ids=os.path.basename)
def test_yaml_builds_and_runs_inference(path):
    cfg, model, out = build_and_infer(path, size=(128, 160))
    assert cfg.MODEL.BACKBONE.NAME == "build_d2b_vovnet_fpn_backbone"
    assert isinstance(model.backbone.bottom_up, VoVNet)
    assert model.backbone.bottom_up.spec_name == cfg.MODEL.VOVNET.CONV_BODY
    fpn_ch = {v.channels for v in model.backbone.output_shape().values()}
    assert fpn_ch == {128 if "FPNLite" in path else 256}
    assert "instances" in out
