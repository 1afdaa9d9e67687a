"""Checkpoint converter and loading report: every format round-trips into our backbones.

References are built with random weights (torchvision, timm); MMDetection, vovnet-detectron2 and
Huawei GhostNet files are key-and-shape fixtures written from the facts of their source (module
names and parameter shapes), filled with random tensors. No downloads.
"""
import logging
import os

import pytest
import timm
import torch
import torchvision
from torch import nn

from conftest import CONFIG_DIR

from d2_backbones.config import get_cfg
from d2_backbones.convert import ConvertError, WeightsMismatchError, check_weights_metadata, main, read_checkpoint
from d2_backbones.ghostnet import GhostNet
from d2_backbones.resnet import build_resnet
from d2_backbones.weights import Checkpointer
from d2_backbones.vovnet import VoVNet
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

PREFIX = "backbone.bottom_up."
TOL = dict(rtol=1e-4, atol=1e-4)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights *and* BN statistics, so a mis-mapped norm cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _convert(tmp_path, sd_or_obj, *args, name="src.pth"):
    src, dst = str(tmp_path / name), str(tmp_path / ("d2_" + name))
    torch.save(sd_or_obj, src)
    assert main([src, dst, *args]) == 0
    ckpt = torch.load(dst, map_location="cpu", weights_only=True)
    assert ckpt["matching_heuristics"] is False
    assert all(k.startswith("backbone.") for k in ckpt["model"])
    bare = {k[len(PREFIX):]: v for k, v in ckpt["model"].items() if k.startswith(PREFIX)}
    return bare, ckpt["d2_backbones"], dst


def _strict(model: nn.Module, bare) -> nn.Module:
    result = model.load_state_dict(bare, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def _tv_features(m, x):
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    out = {}
    for i in range(1, 5):
        x = getattr(m, f"layer{i}")(x)
        out[f"res{i + 1}"] = x
    return out


def _timm_resnet_features(m, x):
    x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
    out = {}
    for i in range(1, 5):
        x = getattr(m, f"layer{i}")(x)
        out[f"res{i + 1}"] = x
    return out


def _assert_close(ours, ref):
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, **TOL)


X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- torchvision / timm
@pytest.mark.parametrize("name,kw,arch", [
    ("resnet18", dict(depth=18), "R-18"),
    ("resnet50", dict(depth=50), "R-50"),
    ("resnext50_32x4d", dict(depth=50, num_groups=32, width_per_group=4), "X-50-32x4d"),
])
def test_torchvision_resnet_equivalence(tmp_path, name, kw, arch):
    ref = _randomize(getattr(torchvision.models, name)())
    bare, meta, _ = _convert(tmp_path, ref.state_dict())
    assert meta["source_format"] == "torchvision-resnet" and meta["arch"] == arch
    assert meta["config"]["MODEL.RESNETS.STRIDE_IN_1X1"] is False and meta["config"]["INPUT.FORMAT"] == "RGB"
    ours = _strict(build_resnet(norm="BN", **kw), bare)
    with torch.no_grad():
        _assert_close(ours(X), _tv_features(ref, X))


def test_timm_resnet50d_equivalence(tmp_path):
    ref = _randomize(timm.create_model("resnet50d", pretrained=False))
    bare, meta, _ = _convert(tmp_path, ref.state_dict())
    assert meta["source_format"] == "timm-resnet" and meta["arch"] == "R-50-V1d"
    ours = _strict(build_resnet(50, deep_stem=True, avg_down=True, norm="BN"), bare)
    with torch.no_grad():
        _assert_close(ours(X), _timm_resnet_features(ref, X))


# ---------------------------------------------------------------------------------------------- MMDetection
def _timm_to_mmdet_v1d(sd, pool_at_stride1=True):
    """timm resnet50d -> MMDetection ResNetV1d names (same architecture): conv1.{0,1,3,4,6} -> stem.{0,1,3,4,6},
    bn1 -> stem.7. MMDetection versions that skip the AvgPool at stride 1 number layer1.0's shortcut 0/1."""
    out = {}
    for k, v in sd.items():
        if k.startswith("conv1."):
            k = "stem." + k[len("conv1."):]
        elif k.startswith("bn1."):
            k = "stem.7." + k[len("bn1."):]
        elif not pool_at_stride1 and k.startswith("layer1.0.downsample."):
            i = int(k.split(".")[3])
            k = f"layer1.0.downsample.{i - 1}." + ".".join(k.split(".")[4:])
        out[k] = v
    return out


@pytest.mark.parametrize("pool_at_stride1", [True, False])
def test_mmdet_resnet_v1d_equivalence(tmp_path, pool_at_stride1):
    ref = _randomize(timm.create_model("resnet50d", pretrained=False))
    sd = _timm_to_mmdet_v1d(ref.state_dict(), pool_at_stride1)
    assert ("layer1.0.downsample.2.weight" in sd) is pool_at_stride1
    bare, meta, _ = _convert(tmp_path, sd)
    assert meta["source_format"] == "mmdet-resnet" and meta["arch"] == "R-50-V1d"
    assert meta["variant"]["style"] == "pytorch"
    ours = _strict(build_resnet(50, deep_stem=True, avg_down=True, norm="BN"), bare)
    with torch.no_grad():
        _assert_close(ours(X), _timm_resnet_features(ref, X))


def _mmdet_resnet_fixture(depth=50, norm="gn", dcn_stages=(False, True, True, True), modulated=True, seed=0):
    """Keys and shapes of MMDetection's ResNet (Bottleneck, pytorch/caffe style alike): stem conv1 + norm1
    (``bn1``/``gn1``), ``layer{i}.{j}.conv{1,2,3}`` + ``{bn,gn}{1,2,3}``, ``downsample.0`` (1x1 conv) +
    ``downsample.1`` (norm); with DCN, conv2 is an mmcv ``*DeformConv2dPack``: ``conv2.weight`` and
    ``conv2.conv_offset.{weight,bias}`` with 18 (v1) / 27 (v2) channels per deformable group."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, cout, cin, k, bias=False):
        sd[name + ".weight"] = torch.randn(cout, cin, k, k, generator=g) * 0.05
        if bias:
            sd[name + ".bias"] = torch.randn(cout, generator=g) * 0.01

    def normlayer(name, c):
        sd[name + ".weight"] = torch.rand(c, generator=g) + 0.5
        sd[name + ".bias"] = torch.randn(c, generator=g) * 0.1
        if norm == "bn":
            sd[name + ".running_mean"] = torch.randn(c, generator=g) * 0.1
            sd[name + ".running_var"] = torch.rand(c, generator=g) + 0.5
            sd[name + ".num_batches_tracked"] = torch.tensor(0)

    conv("conv1", 64, 3, 7)
    normlayer(f"{norm}1", 64)
    cin = 64
    for i, n in enumerate(blocks):
        planes = 64 * 2 ** i
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            conv(f"{p}.conv1", planes, cin, 1)
            normlayer(f"{p}.{norm}1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            if dcn_stages[i]:
                conv(f"{p}.conv2.conv_offset", 27 if modulated else 18, planes, 3, bias=True)
            normlayer(f"{p}.{norm}2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1)
            normlayer(f"{p}.{norm}3", planes * 4)
            if j == 0:
                conv(f"{p}.downsample.0", planes * 4, cin, 1)
                normlayer(f"{p}.downsample.1", planes * 4)
            cin = planes * 4
    sd["fc.weight"] = torch.randn(1000, 2048, generator=g)
    sd["fc.bias"] = torch.randn(1000, generator=g)
    return sd


def test_mmdet_resnet_gn_dcn_fixture(tmp_path):
    sd = _mmdet_resnet_fixture()
    bare, meta, _ = _convert(tmp_path, {"meta": {}, "state_dict": sd}, "--style", "caffe")
    assert meta["source_format"] == "mmdet-resnet"
    cfg = meta["config"]
    assert cfg["MODEL.RESNETS.NORM"] == "GN" and cfg["MODEL.RESNETS.STRIDE_IN_1X1"] is True
    assert cfg["MODEL.RESNETS.DEFORM_ON_PER_STAGE"] == [False, True, True, True]
    assert cfg["MODEL.RESNETS.DEFORM_MODULATED"] is True
    assert cfg["INPUT.FORMAT"] == "BGR" and cfg["MODEL.PIXEL_STD"] == [1.0, 1.0, 1.0]
    model = build_resnet(50, norm="GN", stride_in_1x1=True, deform_on_per_stage=[False, True, True, True],
                         deform_modulated=True)
    _strict(model, bare)
    torch.testing.assert_close(model.res3[0].conv2_offset.weight, sd["layer2.0.conv2.conv_offset.weight"])
    torch.testing.assert_close(model.res4[2].conv1.norm.weight, sd["layer3.2.gn1.weight"])


def _mmdet_neck(g, in_channels, out=256, extra_in=(2048, 256)):
    """MMDetection FPN (ConvModule without norm): lateral_convs.i.conv (1x1), fpn_convs.i.conv (3x3), then the
    extra fpn_convs (3x3 stride 2; the first takes C5 with add_extra_convs='on_input')."""
    sd = {}
    for i, c in enumerate(in_channels):
        sd[f"neck.lateral_convs.{i}.conv.weight"] = torch.randn(out, c, 1, 1, generator=g) * 0.01
        sd[f"neck.lateral_convs.{i}.conv.bias"] = torch.randn(out, generator=g) * 0.01
        sd[f"neck.fpn_convs.{i}.conv.weight"] = torch.randn(out, out, 3, 3, generator=g) * 0.01
        sd[f"neck.fpn_convs.{i}.conv.bias"] = torch.randn(out, generator=g) * 0.01
    for j, c in enumerate(extra_in):
        i = len(in_channels) + j
        sd[f"neck.fpn_convs.{i}.conv.weight"] = torch.randn(out, c, 3, 3, generator=g) * 0.01
        sd[f"neck.fpn_convs.{i}.conv.bias"] = torch.randn(out, generator=g) * 0.01
    return sd


def test_mmdet_detector_retinanet(tmp_path, capsys):
    g = torch.Generator().manual_seed(3)
    backbone = {"backbone." + k: v for k, v in _mmdet_resnet_fixture(norm="bn", dcn_stages=(False,) * 4).items()
                if not k.startswith("fc.")}
    heads = {"bbox_head.retina_cls.weight": torch.randn(720, 256, 3, 3, generator=g),
             "bbox_head.retina_cls.bias": torch.randn(720, generator=g)}
    ckpt = {"meta": {"config": "model = dict(backbone=dict(type='ResNet', depth=50, style='caffe'))"},
            "state_dict": {**backbone, **_mmdet_neck(g, (512, 1024, 2048)), **heads}}
    src, dst = str(tmp_path / "retina.pth"), str(tmp_path / "retina_d2.pth")
    torch.save(ckpt, src)
    assert main([src, dst]) == 0  # the `python -m d2_backbones.convert` entry point, in process
    assert "bbox_head.retina_cls.weight" in capsys.readouterr().out  # heads are dropped and listed
    out = torch.load(dst, weights_only=True)
    meta = out["d2_backbones"]
    assert meta["source_format"] == "mmdet-detector" and meta["variant"]["style"] == "caffe"
    c = meta["config"]
    assert c["MODEL.FPN.IN_FEATURES"] == ["res3", "res4", "res5"] and c["MODEL.FPN.TOP_BLOCK"] == "p6p7"
    assert c["MODEL.FPN.TOP_BLOCK_SOURCE"] == "on_input" and c["MODEL.FPN.TOP_BLOCK_RELU"] is False
    torch.testing.assert_close(out["model"]["backbone.fpn_lateral3.weight"],
                               ckpt["state_dict"]["neck.lateral_convs.0.conv.weight"])
    torch.testing.assert_close(out["model"]["backbone.top_block.p7.weight"],
                               ckpt["state_dict"]["neck.fpn_convs.4.conv.weight"])

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIG_DIR, "ResNet", "retinanet_R_50_FPN_1x.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.FPN.TOP_BLOCK_RELU", False])
    cfg.merge_from_list(["MODEL.RESNETS.STRIDE_IN_1X1", True])
    model = build_model(cfg)
    inc = DetectionCheckpointer(model)._load_model(torch.load(dst, weights_only=True))
    assert not inc.unexpected_keys and not inc.incorrect_shapes
    assert not [k for k in inc.missing_keys if k.startswith("backbone.")]  # bottom-up, FPN and P6/P7 all load
    assert [k for k in inc.missing_keys if k.startswith("head.")]  # the RetinaNet head starts from scratch
    torch.testing.assert_close(model.backbone.top_block.p6.weight, ckpt["state_dict"]["neck.fpn_convs.3.conv.weight"])
    # with TOP_BLOCK_RELU False the caffe-style yaml agrees with everything the file asks for
    assert check_weights_metadata(cfg, out) == []


# ---------------------------------------------------------------------------------------------- VoVNet
def _vovnet_d2_fixture(seed=0):
    """vovnet-detectron2 V-39-eSE with FrozenBN (module names of its vovnet.py): stem.stem_{1,2,3}/conv + /norm,
    stage{n}.OSA{n}_{b}.layers.{i}.OSA{n}_{b}_{i}/conv + /norm, .concat.OSA{n}_{b}_concat/conv + /norm,
    .ese.fc (1x1 conv with bias) in every module. FrozenBN: weight, bias, running_mean, running_var."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def unit(name, cout, cin, k):
        sd[f"{name}/conv.weight"] = torch.randn(cout, cin, k, k, generator=g) * 0.05
        sd[f"{name}/norm.weight"] = torch.rand(cout, generator=g) + 0.5
        sd[f"{name}/norm.bias"] = torch.randn(cout, generator=g) * 0.1
        sd[f"{name}/norm.running_mean"] = torch.randn(cout, generator=g) * 0.1
        sd[f"{name}/norm.running_var"] = torch.rand(cout, generator=g) + 0.5

    unit("stem.stem_1", 64, 3, 3)
    unit("stem.stem_2", 64, 64, 3)
    unit("stem.stem_3", 128, 64, 3)
    cin = 128
    for n, conv_ch, out_ch, blocks in zip((2, 3, 4, 5), (128, 160, 192, 224), (256, 512, 768, 1024), (1, 1, 2, 2)):
        for b in range(1, blocks + 1):
            p = f"stage{n}.OSA{n}_{b}"
            c = cin
            for i in range(5):
                unit(f"{p}.layers.{i}.OSA{n}_{b}_{i}", conv_ch, c, 3)
                c = conv_ch
            unit(f"{p}.concat.OSA{n}_{b}_concat", out_ch, cin + 5 * conv_ch, 1)
            sd[f"{p}.ese.fc.weight"] = torch.randn(out_ch, out_ch, 1, 1, generator=g) * 0.05
            sd[f"{p}.ese.fc.bias"] = torch.randn(out_ch, generator=g) * 0.05
            cin = out_ch
    return sd


@pytest.mark.parametrize("wrapped", [True, False])
def test_vovnet_detectron2_fixture(tmp_path, wrapped):
    sd = _vovnet_d2_fixture()
    assert len(sd) == 207  # the V-39 FrozenBN key count of the reference checkpoints
    obj = {"model": {PREFIX + k: v for k, v in sd.items()}, "iteration": 5} if wrapped else sd
    if wrapped:
        obj["model"]["backbone.fpn_lateral2.weight"] = torch.zeros(256, 256, 1, 1)
    bare, meta, _ = _convert(tmp_path, obj)
    assert meta["source_format"] == "vovnet-d2" and meta["arch"] == "V-39-eSE"
    assert meta["config"]["MODEL.VOVNET.ESE_PLACEMENT"] == "all" and meta["config"]["INPUT.FORMAT"] == "BGR"
    model = _strict(VoVNet("V-39-eSE", norm="BN"), bare)
    torch.testing.assert_close(model.stage4.OSA4_2.ese.fc.weight, sd["stage4.OSA4_2.ese.fc.weight"])


def test_timm_vovnet_equivalence(tmp_path):
    ref = _randomize(timm.create_model("ese_vovnet19b_dw", pretrained=False))
    bare, meta, _ = _convert(tmp_path, ref.state_dict())
    assert meta["source_format"] == "timm-vovnet" and meta["arch"] == "V-19-dw-eSE"
    ours = _strict(VoVNet("V-19-dw-eSE", norm="BN", ese_placement=meta["config"]["MODEL.VOVNET.ESE_PLACEMENT"]),
                   bare)
    with torch.no_grad():
        got = ours(X)
        x = ref.stem(X)
        for i, stage in enumerate(ref.stages):
            x = stage(x)
            torch.testing.assert_close(got[f"stage{i + 2}"], x, **TOL)


# ---------------------------------------------------------------------------------------------- GhostNet
def _ghost_ref_features(m, x):
    x = m.act1(m.bn1(m.conv_stem(x)))
    outs = []
    for blk in m.blocks:
        x = blk(x)
        outs.append(x)
    return {"stage3": outs[4], "stage4": outs[6], "stage5": outs[9]}


@pytest.mark.parametrize("huawei", [False, True])
def test_ghostnet_equivalence(tmp_path, huawei):
    ref = _randomize(timm.create_model("ghostnet_100", pretrained=False))
    sd = dict(ref.state_dict())
    if huawei:  # thop's profiler leaves total_ops/total_params buffers on every module of Huawei's file
        for name, _ in ref.named_modules():
            p = name + "." if name else ""
            sd[p + "total_ops"] = torch.zeros(1, dtype=torch.float64)
            sd[p + "total_params"] = torch.zeros(1, dtype=torch.float64)
    src, dst = str(tmp_path / "g.pth"), str(tmp_path / "g_d2.pth")
    torch.save(sd, src)
    assert main([src, dst]) == 0
    out = torch.load(dst, weights_only=True)
    assert out["d2_backbones"]["source_format"] == "ghostnet"
    assert out["d2_backbones"]["config"]["MODEL.GHOSTNET.WIDTH"] == 1.0
    assert not any("total_" in k for k in out["model"])
    bare = {k[len(PREFIX):]: v for k, v in out["model"].items()}
    ours = _strict(GhostNet(1.0, norm="BN"), bare)
    with torch.no_grad():
        _assert_close(ours(X), _ghost_ref_features(ref, X))


# ---------------------------------------------------------------------------------------------- errors
def test_wrong_architecture_fails_naming_keys(tmp_path, capsys):
    src = str(tmp_path / "r18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), src)
    assert main([src, str(tmp_path / "out.pth"), "--arch", "R-34"]) == 2
    err = capsys.readouterr().err
    assert "does not fit R-34 (from --arch)" in err and "are not in the checkpoint: res2.2.conv1" in err
    assert not os.path.exists(tmp_path / "out.pth")

    g = str(tmp_path / "g050.pth")
    torch.save(timm.create_model("ghostnet_050", pretrained=False).state_dict(), g)
    assert main([g, str(tmp_path / "g_out.pth"), "--arch", "ghostnet_130"]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "conv_stem.weight" in err and "(8, 3, 3, 3)" in err

    # experts may write what matches
    assert main([src, str(tmp_path / "partial.pth"), "--arch", "R-34", "--allow-partial"]) == 0
    assert torch.load(tmp_path / "partial.pth", weights_only=True)["d2_backbones"]["partial"] is True


def test_unknown_keys_and_corrupted_file(tmp_path, capsys):
    bad = str(tmp_path / "weird.pth")
    torch.save({"foo.weight": torch.zeros(1)}, bad)
    assert main([bad, str(tmp_path / "o.pth")]) == 2
    assert "cannot tell the checkpoint's format" in capsys.readouterr().err

    src = str(tmp_path / "r18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), src)
    data = open(src, "rb").read()
    cut = str(tmp_path / "cut.pth")
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ConvertError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(cut)
    assert main([cut, str(tmp_path / "o.pth")]) == 2

    pkl = str(tmp_path / "R-50.pkl")
    with open(pkl, "wb") as f:
        f.write(b"\x80\x04N.")
    with pytest.raises(ConvertError, match="need no conversion.*reads it safely"):
        read_checkpoint(pkl)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch "{self.marker}"',)


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = str(tmp_path / "evil.pth")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": _Payload(str(marker))}, evil)
    with pytest.raises(ConvertError, match="refused.*Nothing from it was run"):
        read_checkpoint(evil)
    assert main([evil, str(tmp_path / "o.pth")]) == 2
    assert not marker.exists()
    # the payload is live: an unrestricted load does run it
    torch.load(evil, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------- load-time checks
class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _cfg(rel, *opts):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIG_DIR, rel))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def test_metadata_mismatch_warning_names_keys(tmp_path):
    _, _, dst = _convert(tmp_path, torchvision.models.resnet18().state_dict())
    cfg = _cfg("ResNet/faster_rcnn_R_18_FPN_1x.yaml", "INPUT.FORMAT", "BGR", "MODEL.PIXEL_STD", [1.0, 1.0, 1.0])
    model = build_model(cfg)
    cp = Checkpointer(model, cfg=cfg)
    cap = _Capture()
    cp.logger.addHandler(cap)
    level = cp.logger.level
    cp.logger.setLevel(logging.INFO)
    try:
        cp.load(dst)
    finally:
        cp.logger.removeHandler(cap)
        cp.logger.setLevel(level)
    warnings = [r.getMessage() for r in cap.records if r.levelno == logging.WARNING and "expect other" in
                r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in cap.records]
    assert 'Set: INPUT.FORMAT RGB MODEL.PIXEL_STD "[58.395, 57.12, 57.375]"' in warnings[0]
    assert "MODEL.PIXEL_MEAN" not in warnings[0]  # the yaml already has the right mean
    summary = [r.getMessage() for r in cap.records if "Weights loading summary" in r.getMessage()]
    assert summary and "backbone.bottom_up: " in summary[0]
    assert "backbone.fpn_lateral2" not in "\n".join(r.getMessage() for r in cap.records)  # no per-key lines
    params = {k for k, _ in model.named_parameters() if k.startswith(PREFIX)}
    buffers = [k for k in model.state_dict() if k.startswith(PREFIX) and k not in params
               and not k.endswith("num_batches_tracked")]
    assert f"backbone.bottom_up: {len(params)}/{len(params)} parameters, {len(buffers)}/{len(buffers)} buffers " \
           f"loaded" in summary[0]
    # the same check from any script
    assert check_weights_metadata(cfg, dst, log=logging.getLogger("test")) == [
        ("INPUT.FORMAT", "RGB", "BGR"), ("MODEL.PIXEL_STD", [58.395, 57.12, 57.375], [1.0, 1.0, 1.0])]
    cfg2 = _cfg("ResNet/faster_rcnn_R_18_FPN_1x.yaml")
    assert check_weights_metadata(cfg2, dst) == []


def test_loading_report_fails_on_wrong_width(tmp_path):
    _, _, dst = _convert(tmp_path, timm.create_model("ghostnet_050", pretrained=False).state_dict())
    model = build_model(_cfg("GhostNet/faster_rcnn_ghostnet_100_FPN_1x.yaml"))
    with pytest.raises(WeightsMismatchError, match=r"other shapes.*ghostnet width 0.5.*MODEL.GHOSTNET.WIDTH 0.5"):
        Checkpointer(model).load(dst)
