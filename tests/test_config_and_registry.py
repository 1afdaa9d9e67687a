"""Package integration: config keys, registry names, import behaviour, error hints, README sync."""
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg as d2_get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, build_model

import d2_backbones
from d2_backbones.config import add_config, cfg_get, our_keys
from d2_backbones.errors import nearest_first

from conftest import CONFIG_DIR, REPO

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
# where config keys are documented: the configuration page and the family pages
KEY_DOCS = "\n".join(open(os.path.join(REPO, "docs", f), encoding="utf-8").read()
                     for f in ("configuration.md", "resnet.md", "vovnet.md", "ghostnet.md", "timm.md"))
FOREIGN = ["build_resnet_backbone", "build_resnet_fpn_backbone", "build_retinanet_resnet_fpn_backbone",
           "build_vovnet_backbone", "build_vovnet_fpn_backbone", "build_fcos_resnet_fpn_backbone",
           "build_fcos_vovnet_fpn_backbone", "build_mnv2_backbone", "build_mobilenetv2_fpn_backbone"]


def test_registered_names_present_and_not_colliding():
    names = d2_backbones.REGISTERED_NAMES
    assert {"build_d2b_resnet_backbone", "build_d2b_resnet_fpn_backbone"} <= set(names)
    for n in names:
        assert n in BACKBONE_REGISTRY
        assert n not in FOREIGN
        assert BACKBONE_REGISTRY.get(n).__module__ == "d2_backbones.build"


def test_every_registered_name_is_in_the_readme_table():
    table = README.split("## Families and registered backbones")[1].split("<!-- registered-names-end -->")[0]
    for n in d2_backbones.REGISTERED_NAMES:
        assert f"| `{n}` |" in table, n


def test_import_twice_and_reload_never_raise():
    import d2_backbones as again  # noqa: F401
    importlib.reload(importlib.import_module("d2_backbones.build"))
    importlib.reload(d2_backbones)
    assert "build_d2b_resnet_fpn_backbone" in BACKBONE_REGISTRY


@pytest.mark.slow
def test_import_next_to_other_packages_names_in_a_fresh_process():
    """detectron2's own builders are registered; a package registering vovnet-detectron2's /
    centermask2's names after us must not collide with anything we registered."""
    code = (
        "import d2_backbones, d2_backbones\n"
        "from detectron2.modeling import BACKBONE_REGISTRY\n"
        "for n in ['build_vovnet_backbone', 'build_vovnet_fpn_backbone', 'build_fcos_vovnet_fpn_backbone']:\n"
        "    f = lambda cfg, s: None\n"
        "    f.__name__ = n\n"
        "    BACKBONE_REGISTRY.register(f)\n"
        "assert 'build_resnet_fpn_backbone' in BACKBONE_REGISTRY\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_add_config_is_idempotent_and_keeps_values():
    cfg = add_config(d2_get_cfg())
    cfg.MODEL.RESNETS.DEEP_STEM = True
    cfg.MODEL.FPN.TOP_BLOCK = "p6p7"
    dump = cfg.dump()
    add_config(cfg)
    assert cfg.dump() == dump
    assert cfg.MODEL.RESNETS.DEEP_STEM is True and cfg.MODEL.FPN.TOP_BLOCK == "p6p7"
    frozen = d2_get_cfg()
    frozen.freeze()
    add_config(frozen)
    assert frozen.is_frozen() and "DEEP_STEM" in frozen.MODEL.RESNETS


def test_add_config_never_touches_detectron2_defaults():
    add_config(d2_get_cfg())
    d2_backbones.get_cfg()
    plain = d2_get_cfg()
    assert "DEEP_STEM" not in plain.MODEL.RESNETS and "TOP_BLOCK" not in plain.MODEL.FPN


def test_added_keys_are_new_and_documented():
    plain = d2_get_cfg()
    for key, default in our_keys().items():
        node = plain
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.get(p, {}) if hasattr(node, "get") else {}
        assert parts[-1] not in node, f"{key} already exists in detectron2"
        assert re.search(rf"^\| `{re.escape(key)}` \|", KEY_DOCS, re.M), f"{key} has no row in docs/"
        assert f"`{default!r}`".replace("'", '"') in KEY_DOCS or f"`{default}`" in KEY_DOCS, (key, default)


def test_every_added_key_has_a_comment_where_it_is_added():
    """Every key has a comment above it in the module that adds it: config.py for the shared sections, the
    family's home for its own section."""
    import inspect

    from d2_backbones.families import FAMILIES

    homes = {f.config_node: inspect.getsource(inspect.getmodule(f.add_config_keys)) for f in FAMILIES.values()}
    shared = open(os.path.join(REPO, "d2_backbones", "config.py")).read()
    for key in our_keys():
        node = key.rsplit(".", 1)[0]
        src = homes.get(node, shared)
        leaf = key.split(".")[-1]
        m = re.search(rf"((?:^\s*#.*\n)+)\s*_C\.{re.escape(node)}\.{leaf} = ", src, re.M)
        assert m, f"{key} has no comment above it where it is added"


def test_yaml_with_our_keys_before_add_config_says_what_to_call():
    cfg = d2_get_cfg()
    with pytest.raises(KeyError, match=r"belongs to d2_backbones.*d2_backbones.add_config\(cfg\)"):
        cfg.merge_from_file(os.path.join(CONFIG_DIR, "ResNet", "faster_rcnn_R_50_V1d_FPN_1x.yaml"))
    with pytest.raises(AssertionError, match=r"d2_backbones.add_config"):
        d2_get_cfg().merge_from_list(["MODEL.FPN.TOP_BLOCK", "p6p7"])


def test_misspelt_key_suggests_the_closest():
    with pytest.raises(AssertionError, match=r"MODEL.RESNETS.AVGDOWN.*Did you mean: MODEL.RESNETS.AVG_DOWN"):
        d2_backbones.get_cfg().merge_from_list(["MODEL.RESNETS.AVGDOWN", True])


def test_unrelated_merge_errors_are_unchanged():
    with pytest.raises(AssertionError, match=r"^Non-existent key: FOO.BAR$"):
        d2_get_cfg().merge_from_list(["FOO.BAR", 1])


def test_unregistered_backbone_lists_our_names_nearest_first():
    cfg = d2_backbones.get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_d2b_resnet_fpn_backbon"
    with pytest.raises(KeyError) as e:
        build_model(cfg)
    msg = str(e.value)
    assert "MODEL.BACKBONE.NAME='build_d2b_resnet_fpn_backbon' is not a registered backbone" in msg
    listed = re.search(r"registers \(nearest first\): (.*?)\.", msg).group(1)
    assert listed.startswith("'build_d2b_resnet_fpn_backbone'")
    assert "import d2_backbones" in msg


def test_registered_lookup_unchanged():
    assert BACKBONE_REGISTRY.get("build_resnet_fpn_backbone").__module__.startswith("detectron2.")


def test_cfg_get_falls_back_when_another_package_replaced_a_node():
    from detectron2.config import CfgNode as CN
    cfg = d2_backbones.get_cfg()
    cfg.MODEL.RESNETS = CN({"DEPTH": 50})  # as another add_*_config might do
    assert cfg_get(cfg, "MODEL.RESNETS.DEEP_STEM") is False
    assert cfg_get(cfg, "MODEL.RESNETS.DEPTH") == 50
    with pytest.raises(KeyError):
        cfg_get(cfg, "MODEL.NOPE.X")


def test_nearest_first():
    assert nearest_first("V-39", ["V-99-eSE", "V-39-eSE", "V-19-eSE"])[0] == "V-39-eSE"


def test_readme_test_command_is_what_ci_runs():
    marker = re.search(r"<!-- test-command: (.*) -->", README).group(1)
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert any(line.split("  #")[0].strip() == marker for b in blocks for line in b.splitlines())
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert "test-command" in ci


def test_full_model_from_package_cfg_runs():
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_file(os.path.join(CONFIG_DIR, "ResNet", "faster_rcnn_R_18_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 64, 96)}])
    assert out[0]["instances"].image_size == (64, 96)


@pytest.mark.slow
def test_detectron2_version_range_is_checked_at_import():
    code = ("import detectron2; detectron2.__version__ = '0.2'\n"
            "try:\n    import d2_backbones\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "ERR d2_backbones" in out.stdout and "requires detectron2 >= 0.6 and < 1.0 (found 0.2)" in out.stdout, \
        out.stdout + out.stderr[-2000:]


def test_backbone_summary_names_frozen_stages_and_norms():
    from d2_backbones import GhostNet, build_resnet, summarize_backbone
    s = summarize_backbone(build_resnet(50, norm="BN", freeze_at=2, norm_eval=True), "ResNet-50")
    assert s.startswith("ResNet-50 | frozen: stem (FrozenBatchNorm2d), res2 (FrozenBatchNorm2d) | trainable: "
                        "res3 BatchNorm2d, res4 BatchNorm2d, res5 BatchNorm2d | norm_eval=True")
    assert "out: res2 s4 256ch, res3 s8 512ch, res4 s16 1024ch, res5 s32 2048ch" in s
    g = summarize_backbone(GhostNet(1.0, norm="BN", freeze_at=3))
    assert "frozen: stem (FrozenBatchNorm2d), stage2 (FrozenBatchNorm2d), stage3 (FrozenBatchNorm2d)" in g
    assert "trainable: stage4 BatchNorm2d, stage5 BatchNorm2d" in g
