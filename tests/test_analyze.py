"""fvcore's / detectron2's model analysis (flops, activations, parameters, structure) for every family.

VoVNet's module names hold "/" (vovnet-detectron2's checkpoint names, ``stem_1/conv``), which fvcore's
tracing took for its scope separator: every flop or activation count of a VoVNet model stopped with a
``KeyError`` (:mod:`d2_backbones.analyze`). The counts are pinned to references computed independently: the
same networks as torchvision / timm build them (convolution GFLOPs equal, as the architectures are equal).
"""
import os
import subprocess
import sys

import pytest
import torch
from fvcore.nn import FlopCountAnalysis as FvFlops
from fvcore.nn.jit_analysis import JitModelAnalysis
from torch import nn

from conftest import CONFIG_DIR, REPO, load_cfg
import d2_backbones
from d2_backbones import GhostNet, VoVNet, build_resnet


def _conv_flops(model, x, module=""):
    flops = FvFlops(model.eval(), x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return flops.by_module_and_operator()[module].get("conv", 0)


def test_importing_the_package_installs_the_fix_once():
    assert JitModelAnalysis._analyze._d2b_scope_names
    d2_backbones.analyze.install_scope_names()
    assert not getattr(JitModelAnalysis._analyze.__wrapped__, "_d2b_scope_names", False)  # wrapped once


def test_vovnet_flops_by_real_module_names_and_fvcore_alone_fails():
    model = VoVNet("V-19-slim-dw-eSE").eval()
    x = torch.zeros(1, 3, 64, 64)
    flops = FvFlops(model, x).unsupported_ops_warnings(False)
    by_module = flops.by_module()
    assert flops.total() > 0
    for name in ("stem", "stage2", "stage3", "stage4", "stage5", "stem.stem_1/conv",
                 "stage2.OSA2_1.layers.0.OSA2_1_0/dw_conv3x3"):
        assert by_module.get(name, 0) > 0, name  # the real names, as in named_modules() and the state_dict
    assert not any("%2F" in k for k in by_module)
    assert by_module["stem.stem_1/conv"] == 32 * 32 * 3 * 9 * 64  # stride 2: 32x32 outputs of 3x3x3, 64 channels
    assert sum(by_module[s] for s in ("stem", "stage2", "stage3", "stage4", "stage5")) == flops.total()
    assert flops.total("stage2") == by_module["stage2"]  # a real name is accepted where fvcore takes one
    assert flops.uncalled_modules() == set()
    original = FvFlops(model, x)
    with pytest.raises(KeyError, match="not among the descendants"):  # what every VoVNet count did before
        JitModelAnalysis._analyze.__wrapped__(original)


def test_models_without_slashes_are_analysed_as_before():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.zeros(1, 3, 10, 10)
    ours = FvFlops(model, x)
    theirs = FvFlops(model, x)
    JitModelAnalysis._analyze.__wrapped__(theirs)
    assert ours.by_module() == theirs.by_module() == {"": 8 * 8 * (4 * 27 + 2 * 4), "0": 8 * 8 * 4 * 27, "1": 0,
                                                      "2": 8 * 8 * 2 * 4}


# ---------------------------------------------------------------------------------------------- references
@pytest.mark.slow
def test_flops_equal_the_reference_networks():
    """Convolution flops of our bottom-up networks equal those of torchvision / timm building the same network."""
    import timm
    import torchvision

    x = torch.zeros(1, 3, 224, 224)
    r50 = build_resnet(50, norm="BN", stride_in_1x1=False, out_features=["res2", "res3", "res4", "res5"])
    assert _conv_flops(r50, x) == _conv_flops(torchvision.models.resnet50(), x) == 4_087_136_256  # fvcore: 4.11 GFLOPs with BN and fc
    v39 = VoVNet("V-39-eSE")
    ref = timm.create_model("ese_vovnet39b", pretrained=False)
    # vovnet-detectron2 (ours) has an eSE in every block, timm only in each stage's last: V-39 has two blocks in
    # stage4 and stage5, so ours adds one eSE 1x1 conv on a pooled 1x1 map of 768 and of 1024 channels
    assert _conv_flops(v39, x) - _conv_flops(ref, x) == 768 * 768 + 1024 * 1024
    g = GhostNet(width=1.0)
    ref = timm.create_model("ghostnet_100", pretrained=False)
    head = _conv_flops(ref, x, "conv_head")  # timm's 1x1 conv after the global pool (a classifier, not a feature)
    assert _conv_flops(g, x) == _conv_flops(ref, x) - head


def _detector_flops(model, size=224):
    from detectron2.utils.analysis import FlopCountAnalysis

    flops = FlopCountAnalysis(model.eval(), [{"image": torch.rand(3, size, size) * 255}])
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return flops


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ResNet/faster_rcnn_R_50_V1d_FPN_1x.yaml", "VoVNet/faster_rcnn_V_39_eSE_FPN_3x.yaml",
                                    "GhostNet/faster_rcnn_ghostnet_100_FPN_1x.yaml",
                                    "Timm/faster_rcnn_timm_efficientnet_b0_FPN_1x.yaml"])
def test_detectron2_analysis_of_every_family(config):
    """detectron2's FlopCountAnalysis, flop_count_operators, activation_count_operators, parameter_count_table and
    the structure print on a whole detector of each family (yaml); the backbone's share is its own count."""
    from detectron2.modeling import build_model
    from detectron2.utils.analysis import activation_count_operators, flop_count_operators, parameter_count_table

    model = build_model(load_cfg(os.path.join(CONFIG_DIR, config))).eval()
    flops = _detector_flops(model)
    by_module = flops.by_module()
    bottom_up = model.backbone.bottom_up
    stages = [n for n, _ in bottom_up.named_children()]
    for name in ["backbone", "backbone.bottom_up", "proposal_generator", "roi_heads"]:
        assert by_module["model." + name] > 0, name
    assert sum(by_module[f"model.backbone.bottom_up.{s}"] for s in stages) == by_module["model.backbone.bottom_up"]
    standalone = _conv_flops(bottom_up, torch.zeros(1, 3, 224, 224))
    assert flops.by_module_and_operator()["model.backbone.bottom_up"]["conv"] == standalone
    assert 0.5e9 < flops.total() < 40e9
    ops = flop_count_operators(model, [{"image": torch.rand(3, 224, 224) * 255}])
    assert ops["conv"] > standalone / 1e9
    assert sum(activation_count_operators(model, [{"image": torch.rand(3, 224, 224) * 255}]).values()) > 0
    table = parameter_count_table(model, max_depth=5)
    first = next(n for n, _ in bottom_up.named_modules() if n)
    assert f"backbone.bottom_up.{first}" in table
    assert type(bottom_up).__name__ in str(model)


@pytest.mark.slow
def test_vovnet_python_config_counts_as_its_yaml_twin():
    from detectron2.config import LazyConfig
    from detectron2.modeling import build_model

    from d2_backbones.lazy import instantiate_model

    lazy = LazyConfig.load(os.path.join(CONFIG_DIR, "VoVNet", "mask_rcnn_V_39_eSE_FPN_3x.py"))
    py = _detector_flops(instantiate_model(lazy.model)).by_module()
    yaml = _detector_flops(build_model(load_cfg(os.path.join(CONFIG_DIR, "VoVNet", "mask_rcnn_V_39_eSE_FPN_3x.yaml"))))
    yaml = yaml.by_module()
    for name in ("model.backbone", "model.backbone.bottom_up", "model.backbone.bottom_up.stage4",
                 "model.backbone.bottom_up.stem.stem_1/conv"):
        assert py[name] == yaml[name] > 0, name


@pytest.mark.slow
def test_analyze_model_command_line(tmp_path):
    from d2_backbones.data import make_shapes

    root = make_shapes(str(tmp_path / "shapes"), n_train=1, n_val=2, size=64)
    cmd = [sys.executable, "-m", "d2_backbones.analyze_model", "--config-file", "configs/VoVNet/faster_rcnn_V_19_eSE_FPN_3x.yaml",
           "--tasks", "flop", "activation", "parameter", "structure", "-n", "2",
           "--register-coco", "analysis_val", os.path.join(root, "annotations", "val.json"), os.path.join(root, "val"),
           "MODEL.DEVICE", "cpu", "DATASETS.TEST", "('analysis_val',)", "INPUT.MIN_SIZE_TEST", "64",
           "MODEL.ROI_HEADS.NUM_CLASSES", "3"]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="2")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "Total GFlops:" in log and "over 2 image(s)" in log and "Total (million) activations:" in log
    assert "| backbone.bottom_up.stage2 " in log and "backbone.bottom_up.stem.stem_1/conv" in log
    assert "(stem_1/conv): Conv2d" in log  # the structure print
    r = subprocess.run(cmd[:5] + ["--tasks", "parameter", "-n", "1", "MODEL.DEVICE=cpu"], capture_output=True, text=True,
                       env=env, cwd=str(tmp_path), timeout=300)
    assert r.returncode != 0 and "MODEL.DEVICE cpu" in r.stderr  # key=value on a yaml: the KEY VALUE spelling
