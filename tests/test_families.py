"""The table of families and what reads it: builders from defaults, head-feature checks where heads are
built, config coercions, FPN levels, the import graph, and exactly what importing changes in detectron2."""
import ast
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

import d2_backbones
from d2_backbones import FAMILIES, REGISTERED_NAMES, ConfigError, build_fpn, build_resnet
from d2_backbones.build import build_model
from d2_backbones.model_table import VARIANTS


def test_every_family_is_registered_configured_and_tabled():
    cfg = d2_backbones.get_cfg()
    for fam in FAMILIES.values():
        assert set(fam.builder_names) <= set(REGISTERED_NAMES)
        node = cfg
        for part in fam.config_node.split("."):
            node = node[part]
        assert {VARIANTS[v][0] for v in fam.variants} == {fam.name}
        assert fam.weight_formats, fam.name  # the weights layer converts into every family
        assert os.path.isdir(os.path.join(REPO, "configs", fam.config_dir))


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("fpn", [False, True], ids=["backbone", "fpn"])
def test_build_backbone_from_get_cfg_defaults(name, fpn):
    """Only MODEL.BACKBONE.NAME set: the backbone builds (head keys are not the backbone's business)."""
    cfg = d2_backbones.get_cfg()
    cfg.MODEL.BACKBONE.NAME = FAMILIES[name].builder_names[fpn]
    model = build_backbone(cfg)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert list(out) == list(model.output_shape()) and out


def test_head_features_are_checked_where_heads_are_built_with_the_familys_key():
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_d2b_vovnet_backbone", "MODEL.DEVICE", "cpu"])
    build_backbone(cfg)  # fine
    with pytest.raises(ConfigError) as e:
        build_model(cfg)  # RPN asks for detectron2's default 'res4'
    msg = str(e.value)
    assert msg.startswith("MODEL.RPN.IN_FEATURES=['res4'] contains 'res4', which the backbone")
    assert "MODEL.VOVNET.OUT_FEATURES (valid: stem, stage2, stage3, stage4, stage5)" in msg and "res2" not in msg
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_d2b_resnet_fpn_backbone",
                         "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"],
                         "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"]])
    with pytest.raises(ConfigError, match=r"MODEL.RPN.IN_FEATURES=\['res4'\].*p2 \(stride 4, 256 ch\).*"
                                          r"MODEL.FPN.IN_FEATURES \(from the stages of MODEL.RESNETS.OUT_FEATURES"):
        build_model(cfg)


def test_fpn_input_hint_names_the_familys_key_or_says_it_is_no_feature():
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_d2b_vovnet_fpn_backbone",
                         "MODEL.VOVNET.OUT_FEATURES", ["stage3", "stage4", "stage5"],
                         "MODEL.FPN.IN_FEATURES", ["stage2", "stage3", "stage4", "stage5"]])
    with pytest.raises(ConfigError, match=r"MODEL.FPN.IN_FEATURES=.*contains 'stage2'.*add 'stage2' to "
                                          r"MODEL.VOVNET.OUT_FEATURES"):
        build_backbone(cfg)
    cfg.merge_from_list(["MODEL.FPN.IN_FEATURES", ["res2", "res3"]])
    with pytest.raises(ConfigError, match=r"'res2' is no feature of this backbone, whose features are stem, stage2"):
        build_backbone(cfg)


@pytest.mark.parametrize("value", ["1", 1])
def test_float_keys_accept_ints_from_command_line_and_yaml(tmp_path, value):
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_list(["MODEL.GHOSTNET.WIDTH", value])
    assert cfg.MODEL.GHOSTNET.WIDTH == 1.0 and isinstance(cfg.MODEL.GHOSTNET.WIDTH, float)
    path = tmp_path / "w.yaml"
    path.write_text("MODEL:\n  GHOSTNET:\n    WIDTH: 2\nVERSION: 2\n")
    cfg.merge_from_file(str(path))
    assert cfg.MODEL.GHOSTNET.WIDTH == 2.0 and isinstance(cfg.MODEL.GHOSTNET.WIDTH, float)
    with pytest.raises(ValueError, match="Type mismatch"):  # other mismatches are still yacs' errors
        cfg.merge_from_list(["MODEL.GHOSTNET.WIDTH", "'wide'"])


def test_mmdet_num_outs_with_max_pool_levels():
    """MMDetection FPN(add_extra_convs=False, num_outs=5) on C3-C5: P6 and P7 by repeated stride-2 max-pool."""
    body = build_resnet(18, norm="BN", out_features=["res3", "res4", "res5"])
    fpn = build_fpn(body, ["res3", "res4", "res5"], 32, top_block="maxpool", top_block_levels=2).eval()
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, 128, 96))
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
    assert fpn.output_shape()["p7"] == ShapeSpec(channels=32, stride=128)
    torch.testing.assert_close(out["p6"], torch.nn.functional.max_pool2d(out["p5"], 1, stride=2))
    torch.testing.assert_close(out["p7"], torch.nn.functional.max_pool2d(out["p6"], 1, stride=2))
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_d2b_ghostnet_fpn_backbone", "MODEL.FPN.TOP_BLOCK", "p6p7",
                         "MODEL.FPN.TOP_BLOCK_LEVELS", 2])
    with pytest.raises(ConfigError, match=r"MODEL.FPN.TOP_BLOCK_LEVELS=2 applies to top block 'maxpool' only"):
        build_backbone(cfg)


def _imports(path):
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_import_cycle_between_package_modules():
    pkg = os.path.join(REPO, "d2_backbones")
    graph = {f[:-3]: _imports(os.path.join(pkg, f)) for f in os.listdir(pkg) if f.endswith(".py")}
    assert "train" not in graph["data"] and "data" in graph["train"]

    def reach(a, seen):
        for b in graph.get(a, ()):
            if b not in seen:
                seen.add(b)
                reach(b, seen)
        return seen

    cycles = [m for m in graph if m != "__init__" and m in reach(m, set())]
    assert not cycles, cycles


@pytest.mark.slow
def test_import_changes_exactly_what_the_docstring_lists():
    code = """
import detectron2.config, detectron2.modeling
from detectron2.config import CfgNode
from detectron2.modeling import BACKBONE_REGISTRY
def snap():
    out = {f"CfgNode.{k}": v for k, v in vars(CfgNode).items()}
    out.update({f"BACKBONE_REGISTRY.{k}": v for k, v in vars(BACKBONE_REGISTRY).items() if k != "_obj_map"})
    return out, dict(BACKBONE_REGISTRY._obj_map), detectron2.config.get_cfg()
before, reg, cfg = snap()
import d2_backbones
after, reg2, cfg2 = snap()
# __slotnames__ is copyreg's cache, written by any copy.deepcopy of a CfgNode
print(sorted(k for k in set(before) | set(after) if before.get(k) is not after.get(k) and k != "CfgNode.__slotnames__"))
print(sorted(set(reg2) - set(reg)), cfg == cfg2)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    changed, registered = out.strip().splitlines()[-2:]
    assert changed == ("['BACKBONE_REGISTRY.get', 'CfgNode.load_yaml_with_base', 'CfgNode.merge_from_list', "
                       "'CfgNode.merge_from_other_cfg']")
    assert registered == f"{sorted(REGISTERED_NAMES)} True"
    doc = d2_backbones.__doc__
    for name in ("BACKBONE_REGISTRY.get", "CfgNode.merge_from_other_cfg", "CfgNode.merge_from_list",
                 "CfgNode.load_yaml_with_base", "REGISTERED_NAMES"):
        assert name in doc
