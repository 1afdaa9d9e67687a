"""The timm family: what is specific to it (the contract itself runs in tests/test_contract.py over its
contract_variants). Breadth: 28 timm models from 20 architecture families, each through shapes, freezing,
a Faster R-CNN training step and inference, TorchScript export of backbone + FPN and optimize_for_inference;
the models that cannot work are refused at build with the reason; timm weights round-trip through the
converter and the checkpointer; timm stays optional."""
import os
import subprocess
import sys
import time

import pytest
import timm
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import CONFIG_DIR, REPO, bn_buffers, load_cfg, max_rel_err
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import d2_backbones
from d2_backbones import ConfigError, optimize_for_inference
from d2_backbones.export import export_torchscript
from d2_backbones.timm import FrozenBatchNormAct2d, TimmBackbone, pixel_config

SIZE = (97, 131)  # odd, non-square

# model -> (architecture family, the features it has)
C2_C5 = ("stage2", "stage3", "stage4", "stage5")
BREADTH = {
    "resnet18": "resnet", "resnet50d": "resnet", "resnest14d": "resnest", "res2net50_26w_4s": "res2net",
    "efficientnet_b0": "efficientnet", "tf_efficientnet_lite0": "efficientnet", "mobilenetv2_100": "efficientnet",
    "mixnet_s": "efficientnet", "tinynet_a": "efficientnet", "mobilenetv3_large_100": "mobilenetv3",
    "lcnet_050": "mobilenetv3", "convnext_atto": "convnext", "regnety_002": "regnet", "regnetx_002": "regnet",
    "ghostnetv2_100": "ghostnet", "repvit_m1": "repvit", "efficientvit_b0": "efficientvit_mit",
    "fastvit_t8": "fastvit", "swin_tiny_patch4_window7_224": "swin_transformer", "edgenext_x_small": "edgenext",
    "mobileone_s0": "byobnet", "repvgg_a0": "byobnet", "hrnet_w18_small": "hrnet", "cspresnet50": "cspnet",
    "dla34": "dla", "densenet121": "densenet", "vit_small_patch16_224": "vision_transformer",
    "maxvit_tiny_rw_224": "maxxvit",
}
# one fixed input size only: refused at build, with the reason (docs/timm.md)
REFUSED = {"coatnet_0_rw_224": "runs only at a fixed input size"}


def test_breadth_covers_25_models_from_10_families():
    assert len(BREADTH) >= 25 and len(set(BREADTH.values())) >= 10
    docs = open(os.path.join(REPO, "docs", "timm.md"), encoding="utf-8").read()
    for name in list(BREADTH) + list(REFUSED):
        assert f"`{name}`" in docs, name


def test_default_config_builds_resnet18_with_exact_shapes():
    cfg = d2_backbones.get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_d2b_timm_backbone"
    net = build_backbone(cfg).eval()
    assert net.describe() == "timm resnet18"
    with torch.no_grad():
        out = net(torch.randn(1, 3, *SIZE))
    assert list(out) == list(C2_C5)
    for k, spec in net.output_shape().items():
        assert tuple(out[k].shape) == (1, spec.channels, -(-SIZE[0] // spec.stride), -(-SIZE[1] // spec.stride))
    # the default MODEL.TIMM.NORM is FrozenBN and FREEZE_AT 2: stem and stage2 frozen, the rest learns
    units = dict(net.named_stages())
    assert all(not p.requires_grad for m in units["stem"] + units["stage2"] for p in m.parameters())
    assert all(p.requires_grad for m in units["stage3"] for p in m.parameters(recurse=False)
               if not isinstance(m, FrozenBatchNorm2d))


def test_features_at_strides_the_model_has_and_clear_errors():
    with pytest.raises(ConfigError, match=r"out_features=\['stem'.*contains 'stem', which timm model convnext_atto "
                                          r"does not produce.*convnext_atto has stage2, stage3, stage4, stage5"):
        TimmBackbone("convnext_atto", out_features=["stem", "stage2"])
    with pytest.raises(ConfigError, match=r"name='efficientnet_bo' is not a timm model name\. Valid values: "
                                          r"'efficientnet_b\d'.*Fix: set name to a name from timm.list_models"):
        TimmBackbone("efficientnet_bo")
    with pytest.raises(ConfigError, match=r"norm='FrozenBn' is not supported\. Valid values: 'FrozenBN'"):
        TimmBackbone("resnet18", norm="FrozenBn")
    with pytest.raises(ConfigError, match=r"create_kwargs=\['drop_path_rate'\] must be a flat list"):
        TimmBackbone("resnet18", create_kwargs=["drop_path_rate"])
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_d2b_timm_backbone", "MODEL.TIMM.NAME", "resnet18",
                         "MODEL.BACKBONE.FREEZE_AT", 6])
    with pytest.raises(ConfigError, match=r"^MODEL\.BACKBONE\.FREEZE_AT=6 is out of range for this timm model "
                                          r"resnet18\. Valid values: 0, 1, 2, 3, 4, 5"):
        build_backbone(cfg)
    vit = TimmBackbone("vit_small_patch16_224", norm="BN")
    assert list(vit.output_shape()) == ["stage4"] and vit.output_shape()["stage4"].stride == 16


@pytest.mark.parametrize("name,reason", list(REFUSED.items()))
def test_fixed_size_models_are_refused_with_the_reason(name, reason):
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_d2b_timm_fpn_backbone", "MODEL.TIMM.NAME", name])
    with pytest.raises(ConfigError, match=rf"^MODEL\.TIMM\.NAME='{name}' {reason} \(224x224\)"):
        build_backbone(cfg)


def test_create_kwargs_reach_timm_and_norms_keep_fused_activations():
    net = TimmBackbone("efficientnet_b0", norm="BN", create_kwargs=["drop_path_rate", 0.2])
    assert net.create_kwargs == {"drop_path_rate": 0.2}
    assert any(type(m).__name__ == "DropPath" and m.drop_prob > 0 for m in net.modules())
    bn = TimmBackbone("mobilenetv3_large_100", norm="BN").eval()
    for m in bn.modules():  # non-trivial statistics, so a dropped activation would show
        if isinstance(m, _BatchNorm):
            m.running_mean.uniform_(-1, 1)
    x = torch.randn(1, 3, 64, 96)
    for norm in ("FrozenBN", "naiveSyncBN", "SyncBN"):
        other = TimmBackbone("mobilenetv3_large_100", norm=norm).eval()
        other.load_state_dict(bn.state_dict(), strict=False)
        acts = [m for m in other.modules() if hasattr(m, "act") and isinstance(m, (FrozenBatchNorm2d, _BatchNorm))]
        assert acts and all(type(m).__name__ != "BatchNormAct2d" for m in acts), norm
        if norm == "FrozenBN":
            assert all(isinstance(m, FrozenBatchNormAct2d) for m in acts)
            with torch.no_grad():
                a, b = bn(x), other(x)
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    with pytest.raises(ConfigError, match=r"norm='GN' uses GroupNorm with 32 groups, which does not divide a 16-ch"):
        TimmBackbone("mobilenetv3_large_100", norm="GN")


def test_pixel_config_from_the_pretrained_cfg():
    assert pixel_config("vit_small_patch16_224") == {"INPUT.FORMAT": "RGB", "MODEL.PIXEL_MEAN": [127.5] * 3,
                                                     "MODEL.PIXEL_STD": [127.5] * 3}
    assert pixel_config("resnet18")["MODEL.PIXEL_STD"] == [58.395, 57.12, 57.375]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_round_trip_through_the_converter_and_checkpointer(tmp_path, suffix):
    """A random-weight timm model saved in timm's names -> convert -> MODEL.WEIGHTS of a detector built from a
    timm config -> the backbone computes exactly what timm's features network computes with those weights."""
    from safetensors.torch import save_file

    from d2_backbones.weights.cli import main as convert

    name = "mobilenetv3_large_100"
    src_model = timm.create_model(name)
    for m in src_model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    sd = src_model.state_dict()
    src = str(tmp_path / f"{name}{suffix}")
    save_file(sd, src) if suffix == ".safetensors" else torch.save(sd, src)
    dst = str(tmp_path / "converted.pth")
    assert convert([src, dst, "--format", "timm", "--arch", name]) == 0
    written = torch.load(dst, weights_only=True)
    assert written["d2_backbones"]["config"]["MODEL.TIMM.NAME"] == name
    assert all(k.startswith("backbone.bottom_up.body.") for k in written["model"])
    cfg = load_cfg(os.path.join(CONFIG_DIR, "Timm", "faster_rcnn_timm_mobilenetv3_large_100_FPN_1x.yaml"))
    cfg.merge_from_file(dst[:-4] + ".yaml")
    model = build_model(cfg).eval()
    d2_backbones.Checkpointer(model, cfg=cfg).load(dst)
    reference = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    reference.load_state_dict({k: v for k, v in sd.items() if k in reference.state_dict()})
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ours, ref = model.backbone.bottom_up(x), reference(x)
    for (k, a), b in zip(ours.items(), ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    # the file cannot be recognised from its keys: without --format timm the converter says to name it
    assert convert([src, str(tmp_path / "x.pth")]) == 2


def test_folding_pairs_each_norm_with_the_conv_that_feeds_it():
    """mixnet_s concatenates mixed-kernel convs before its norms: the concat's tensor is freed after the norm, and
    a later conv output could take its id. Every fold must be the same on every copy and exact."""
    import copy

    torch.manual_seed(0)
    model = TimmBackbone(name="mixnet_s", norm="BN", out_features=["stage2", "stage3"]).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        ref = model(x)
    folds = []
    for _ in range(3):
        opt = optimize_for_inference(copy.deepcopy(model), channels_last=False)
        folds.append(sorted(opt._d2b_inference.folded))
        with torch.no_grad():
            got = opt(x)
        for k in ref:
            assert max_rel_err(got[k], ref[k]) <= 1e-4, k
    assert folds[0] == folds[1] == folds[2] and len(folds[0]) > 10


def test_timm_is_optional():
    code = ("import sys; sys.modules['timm'] = None\n"
            "import d2_backbones\n"
            "from detectron2.modeling import build_backbone\n"
            "cfg = d2_backbones.get_cfg(); cfg.MODEL.BACKBONE.NAME = 'build_d2b_timm_fpn_backbone'\n"
            "assert 'timm' in d2_backbones.FAMILIES and cfg.MODEL.TIMM.NAME == 'resnet18'\n"
            "try:\n    build_backbone(cfg)\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("MODEL.TIMM.NAME='resnet18' needs the timm package, which is not installed. "
                                       "Fix: pip install timm (or pip install 'd2_backbones[timm]').")


# ---------------------------------------------------------------------------------------------- breadth
def _instances(h, w):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 120.0, 90.0]]))
    inst.gt_classes = torch.tensor([0, 1])
    return inst


KNOWN = {}  # model -> reason, for a check a model is known to fail (strict xfail); none today


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.xfail(reason=KNOWN[n], strict=True)])
                                  if n in KNOWN else n for n in BREADTH])
def test_breadth(name):
    t0 = time.time()
    cfg = load_cfg(os.path.join(CONFIG_DIR, "Timm", "Base-Timm-FPN.yaml"), [
        "MODEL.TIMM.NAME", name, "MODEL.TIMM.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", 2,
        "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        32, "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128])
    # OUT_FEATURES [] = every one of stage2..stage5 the model has; FPN IN_FEATURES [] = all of them
    cfg.merge_from_list(["MODEL.TIMM.OUT_FEATURES", [], "MODEL.FPN.IN_FEATURES", []])
    if name.startswith("vit_"):  # a plain ViT: one stride-16 map (p4, p5 = max-pool)
        cfg.merge_from_list(["MODEL.RPN.IN_FEATURES", ["p4", "p5"], "MODEL.ROI_HEADS.IN_FEATURES", ["p4"],
                             "MODEL.ANCHOR_GENERATOR.SIZES", [[64], [128]]])
    model = build_model(cfg)
    body = model.backbone.bottom_up

    # 1) shapes at an odd, non-square size equal output_shape() (ceil(size / stride))
    body.eval()
    with torch.no_grad():
        out = body(torch.randn(2, 3, *SIZE))
    assert list(out) == list(body.output_shape())
    for k, spec in body.output_shape().items():
        assert tuple(out[k].shape) == (2, spec.channels, -(-SIZE[0] // spec.stride), -(-SIZE[1] // spec.stride)), k

    # 2) one Faster R-CNN training step with finite losses; freezing isolation across it
    units = [(n, mods) for n, mods in body.named_stages() if mods]
    before = {k: v.clone() for k, v in body.state_dict().items()}
    model.train()
    with EventStorage(0):
        losses = model([{"image": torch.rand(3, 96, 128) * 255, "instances": _instances(96, 128)}] * 2)
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad
    after = body.state_dict()
    by_ptr = {t.data_ptr(): k for k, t in after.items()}
    for idx, (uname, mods) in enumerate(units):
        frozen = uname in [n for n, _ in body.named_stages()][:2]
        params = [p for m in mods for p in m.parameters(recurse=False)]
        keys = [by_ptr[t.data_ptr()] for m in mods for t in list(m.parameters(recurse=False)) +
                list(m.buffers(recurse=False)) if t.data_ptr() in by_ptr and not by_ptr[t.data_ptr()].endswith("tracked")]
        if frozen:
            assert all(p.grad is None for p in params), uname
            assert all(torch.equal(before[k], after[k]) for k in keys), uname  # weights and BN statistics
            assert not any(isinstance(m, _BatchNorm) for m in mods), uname  # only FrozenBN left
        else:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), uname
            assert any(not torch.equal(before[k], after[k]) for k in keys), uname

    # 3) one inference
    model.eval()
    with torch.no_grad():
        (res,) = model([{"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128}])
    assert res["instances"].image_size == (96, 128)

    # 4) TorchScript (tracing) of backbone + FPN equals eager
    fpn = model.backbone
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref = fpn(x)
        traced = export_torchscript(fpn, x, "tracing")(x)
    assert list(traced) == list(ref)
    for k in ref:
        assert max_rel_err(traced[k], ref[k]) <= 1e-4, k

    # 5) optimize_for_inference (re-parameterisation, folding, channels_last) equals eager within 1e-4
    opt = optimize_for_inference(model.backbone)
    with torch.no_grad():
        got = opt(x)
    for k in ref:
        assert max_rel_err(got[k], ref[k]) <= 1e-4, (k, max_rel_err(got[k], ref[k]))
    print(f"{name}: {time.time() - t0:.1f}s, folded {len(opt._d2b_inference.folded)}")
