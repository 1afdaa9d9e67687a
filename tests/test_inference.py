"""optimize_for_inference: folded norms and channels_last give the eager outputs, on every family and
on whole detectron2 models; it is idempotent, refuses training mode, and keeps output_shape()."""
import copy
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import RTOL, CONFIG_DIR, assert_same_outputs, load_cfg, max_rel_err, randomize_norms
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model

import d2_backbones
from d2_backbones import OptimizedPredictor, build_fpn, build_resnet, is_optimized_for_inference, optimize_for_inference
from d2_backbones.ghostnet import GhostNet
from d2_backbones.vovnet import VoVNet

def _fpn(bottom_up, feats, **kw):
    return build_fpn(bottom_up, feats, 64, **kw)


def test_channels_last_can_be_turned_off():
    net = randomize_norms(GhostNet(width=0.5, norm="BN", out_features=["stage3", "stage4"]))
    opt = assert_same_outputs(net, torch.randn(1, 3, 64, 96), channels_last=False)
    assert all(p.is_contiguous() for p in opt.parameters())


def test_groupnorm_is_kept_and_reported():
    body = build_resnet(18, norm="GN", res2_channels=64, out_features=["res4"])
    model = randomize_norms(body).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)["res4"]
    opt = optimize_for_inference(copy.deepcopy(model))
    with torch.no_grad():
        assert max_rel_err(opt(x)["res4"], ref) <= RTOL
    report = opt._d2b_inference
    assert report.folded == [] and len(report.kept) == sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert "each input's statistics" in report.kept[0]


def test_idempotent():
    net = randomize_norms(VoVNet("V-19-slim-eSE", norm="BN")).eval()
    x = torch.randn(1, 3, 64, 64)
    opt = optimize_for_inference(net)
    state = {k: v.clone() for k, v in opt.state_dict().items()}
    with torch.no_grad():
        first = opt(x)
    assert is_optimized_for_inference(opt)
    assert optimize_for_inference(opt) is opt
    again = optimize_for_inference(opt, channels_last=False)
    assert again is opt
    assert opt.state_dict().keys() == state.keys()
    assert all(torch.equal(opt.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        second = opt(x)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_refuses_training_mode_and_names_the_fix():
    net = GhostNet(width=0.5, norm="BN")
    with pytest.raises(RuntimeError, match=r"eval mode.*model\.eval\(\)"):
        optimize_for_inference(net)
    net.eval()
    net.blocks[3].train()  # one submodule left in training mode is enough to refuse
    with pytest.raises(RuntimeError, match=r"'blocks\.3' and \d+ other modules are in training mode"):
        optimize_for_inference(net)
    assert not is_optimized_for_inference(net)
    assert any(isinstance(m, _BatchNorm) for m in net.modules())  # nothing was changed


def test_optimized_model_cannot_be_trained_or_loaded_into(tmp_path):
    net = randomize_norms(build_resnet(18, norm="BN", res2_channels=64, out_features=["res3"])).eval()
    sd = copy.deepcopy(net.state_dict())
    opt = optimize_for_inference(net)
    opt.train()
    with pytest.raises(RuntimeError, match="cannot be trained"):
        opt(torch.randn(1, 3, 32, 32))
    opt.eval()
    with pytest.raises(RuntimeError, match=r"Load the weights first, then optimize"):
        opt.load_state_dict(sd)


def test_weights_load_before_folding_through_detectron2_checkpointer(tmp_path):
    """Folding happens after loading: a checkpoint saved from one model loads into a fresh one, then folds."""
    cfg = load_cfg(os.path.join(CONFIG_DIR, "VoVNet", "faster_rcnn_V_19_slim_dw_eSE_FPNLite_3x.yaml"))
    src = randomize_norms(build_backbone(cfg))
    DetectionCheckpointer(src, save_dir=str(tmp_path)).save("w")
    dst = build_backbone(cfg)
    DetectionCheckpointer(dst).load(str(tmp_path / "w.pth"))
    x = torch.randn(1, 3, 96, 128)
    src.eval()
    with torch.no_grad():
        ref = src(x)
        out = optimize_for_inference(dst.eval())(x)
    assert all(max_rel_err(out[k], ref[k]) <= RTOL for k in ref)


def _images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, 120 + 17 * i, 160 - 9 * i), generator=g, dtype=torch.uint8)}
            for i in range(n)]


def _assert_same_instances(a, b):
    for ia, ib in zip(a, b):
        ia, ib = ia["instances"], ib["instances"]
        assert len(ia) == len(ib) and len(ia) > 0
        assert torch.equal(ia.pred_classes, ib.pred_classes)
        # the features agree within 1e-4 (asserted separately); ROIAlign's bilinear sampling at
        # box corners that moved by ~1e-4 px adds a little on top, hence 1e-3 here
        torch.testing.assert_close(ib.scores, ia.scores, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(ib.pred_boxes.tensor, ia.pred_boxes.tensor, rtol=1e-3, atol=1e-2)
        if ia.has("pred_masks"):
            assert (ia.pred_masks != ib.pred_masks).float().mean() < 1e-3


@pytest.mark.parametrize("rel, opts", [
    # Mask R-CNN, GhostNet backbone, conv box head with BN (folded inside the ROI head too)
    ("GhostNet/mask_rcnn_ghostnet_050_FPN_1x.yaml",
     ["MODEL.ROI_BOX_HEAD.NUM_CONV", 2, "MODEL.ROI_BOX_HEAD.NORM", "BN", "MODEL.ROI_BOX_HEAD.NUM_FC", 1]),
    ("ResNet/faster_rcnn_R_18_FPN_1x.yaml", []),
    ("VoVNet/retinanet_V_19_slim_dw_eSE_FPNLite_3x.yaml", []),
])
@pytest.mark.slow
def test_whole_detectron2_models(rel, opts):
    cfg = load_cfg(os.path.join(CONFIG_DIR, rel), opts + ["MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
                                                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    model = randomize_norms(build_model(cfg)).eval()
    with torch.no_grad():
        ref = model(_images())
    opt = optimize_for_inference(copy.deepcopy(model))
    assert opt.backbone.output_shape() == model.backbone.output_shape()
    with torch.no_grad():
        out = opt(_images())
        images = model.preprocess_image(_images())
        feats_ref, feats = model.backbone(images.tensor), opt.backbone(images.tensor)
    assert all(max_rel_err(feats[k], feats_ref[k]) <= RTOL for k in feats_ref)
    _assert_same_instances(ref, out)
    left = [n for n, m in opt.named_modules() if isinstance(m, (FrozenBatchNorm2d, _BatchNorm))]
    assert left == []


@pytest.mark.slow
def test_optimized_predictor_matches_default_predictor(tmp_path):
    cfg = load_cfg(os.path.join(CONFIG_DIR, "ResNet", "faster_rcnn_R_18_FPN_1x.yaml"),
                   ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 160])
    model = randomize_norms(build_model(cfg))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    image = np.random.RandomState(0).randint(0, 256, (120, 150, 3), dtype=np.uint8)
    plain, fast = DefaultPredictor(cfg), OptimizedPredictor(cfg)
    assert is_optimized_for_inference(fast.model) and not is_optimized_for_inference(plain.model)
    _assert_same_instances([plain(image)], [fast(image)])


def test_exported_names():
    assert d2_backbones.optimize_for_inference is optimize_for_inference
    assert "optimize_for_inference" in d2_backbones.__all__


@pytest.mark.slow
def test_benchmark_script_runs_and_checks_equality(tmp_path):
    """benchmarks/inference.py in its quick form: every row is produced and the outputs agree."""
    import re
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "bench.md"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "inference.py"), "--variants", "R-18",
           "V-19-slim-dw-eSE", "GhostNet-0.5", "--sizes", "64x96", "--large-sizes", "--runs", "1", "--warmup", "0",
           "--train-variants", "GhostNet-0.5", "--train-size", "64", "--train-runs", "1", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    table = out.read_text()
    rows = [line for line in table.splitlines() if re.match(r"\| (R-18|V-19-slim-dw-eSE|GhostNet-0\.5) \| 64×96", line)]
    assert len(rows) == 3, table
    assert "detectron2 ResNet-FPN" in rows[0] and "timm GhostNet + detectron2 FPN" in rows[2]
    assert all(float(r.rstrip(" |").split("|")[-1]) <= RTOL for r in rows), rows  # max rel. diff column
    assert re.search(r"\| GhostNet-0\.5 \| 2×3×64×64 \| \d+ \| \d+ \| [\d.]+× \| \d+ \| \d+ \| \*\*[\d.]+\*\* \|", table)
    assert re.search(r"Best conv at the start of the run: \d+ GFLOP/s", table)

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- inference-benchmark-start -->\nold\n<!-- inference-benchmark-end -->\noutro\n")
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import inference as bench
    finally:
        sys.path.pop(0)
    bench.update_readme(table, str(readme))
    text = readme.read_text()
    assert "old" not in text and table in text and text.startswith("intro\n") and text.endswith("outro\n")


def test_plain_torch_modules_and_non_affine_bn():
    """Any nn.Sequential conv -> BN pair folds, including BatchNorm without affine parameters."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d(8))
    model = randomize_norms(model).eval()
    x = torch.randn(2, 3, 15, 17)
    with torch.no_grad():
        ref = model(x)
    opt = optimize_for_inference(copy.deepcopy(model))
    with torch.no_grad():
        assert max_rel_err(opt(x), ref) <= RTOL
    assert isinstance(opt[1], nn.Identity) and isinstance(opt[4], nn.Identity)
    assert opt._d2b_inference.folded == ["1", "4"]
