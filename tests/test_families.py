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


def _module_name(path):
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _package_modules():
    """Every module of the package, subpackages included: dotted name -> path."""
    out = {}
    for root, _, files in os.walk(os.path.join(REPO, "d2_backbones")):
        for f in files:
            if f.endswith(".py"):
                out[_module_name(os.path.join(root, f))] = os.path.join(root, f)
    return out


def _imports(name, path, modules):
    """The package modules ``name`` imports, in every form (``import d2_backbones.x``, ``from d2_backbones.x
    import y``, ``from . import x``, ``from .x import y``, ``from .. import x``, at module level or inside a
    function); importing ``a.b.c`` also runs the packages ``a.b`` and ``a``."""
    tree = ast.parse(open(path).read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        explicit = [t for t in targets if t in modules]
        if isinstance(node, ast.ImportFrom):  # ``from pkg import a, b``: pkg itself counts only if a name is no module
            mod = targets[0]
            if all(t in modules for t in targets[1:]) and mod in [t.rpartition(".")[0] for t in targets[1:]]:
                explicit = [t for t in explicit if t != mod or mod != "d2_backbones"]
        for t in explicit:
            parts = t.split(".")
            for k in range(2, len(parts) + 1):  # importing a.b.c runs a.b too; the root only when named itself
                cand = ".".join(parts[:k])
                if cand in modules and cand != name and not name.startswith(cand + "."):  # own packages: running
                    found.add(cand)
            if t == "d2_backbones" and name != "d2_backbones":
                found.add(t)
    return found


def _graph():
    modules = _package_modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_import_graph_sees_every_form_and_subpackage():
    graph = _graph()
    assert "d2_backbones.weights.checks" in graph and "d2_backbones.weights.formats" in graph["d2_backbones.weights.checks"]
    assert "d2_backbones.families" in graph["d2_backbones.weights.formats"]          # from ..families import
    assert "d2_backbones.weights.formats" in graph["d2_backbones.resnet"]             # from .weights.formats import
    assert "d2_backbones.weights" in graph["d2_backbones.resnet"]                     # ... which runs weights/__init__
    assert "d2_backbones.build" in graph["d2_backbones"]                               # from . import build


def test_no_import_cycle_between_package_modules():
    """No cycle in the graph of every module (the root package, which imports everything, aside), and no module
    imports the root package (``import d2_backbones`` inside a function is a cycle too)."""
    graph = _graph()
    assert "d2_backbones.train" not in graph["d2_backbones.data"] and "d2_backbones.data" in graph["d2_backbones.train"]
    importers_of_root = sorted(m for m, deps in graph.items() if "d2_backbones" in deps and m != "d2_backbones")
    assert not importers_of_root, importers_of_root

    def reach(a, seen):
        for b in graph.get(a, ()):
            if b != "d2_backbones" and b not in seen:
                seen.add(b)
                reach(b, seen)
        return seen

    cycles = [m for m in graph if m != "d2_backbones" and m in reach(m, set())]
    assert not cycles, cycles


# The shared machinery: it reads FAMILIES and knows no family by name.
SHARED = ["d2_backbones.families", "d2_backbones.config", "d2_backbones.build", "d2_backbones.weights",
          "d2_backbones.weights.formats", "d2_backbones.weights.checks", "d2_backbones.weights.checkpointer",
          "d2_backbones.weights.read", "d2_backbones.weights.write", "d2_backbones.weights.cli",
          "d2_backbones.layers", "d2_backbones.fpn", "d2_backbones.errors"]


def _family_modules():
    return {f.build.__module__ for f in FAMILIES.values() if f.build.__module__.startswith("d2_backbones.")}


def _code_strings(path):
    """String constants and names of a module's code (docstrings and comments left out)."""
    tree = ast.parse(open(path).read())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                docstrings.add(id(body[0].value))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append(node.value)
        elif isinstance(node, ast.Name):
            out.append(node.id)
        elif isinstance(node, ast.Attribute):
            out.append(node.attr)
    return out


def test_shared_modules_know_no_family_by_name():
    """A family's home is the only module that names it: the shared modules import no family module and their
    code holds none of a family's config nodes, builder names or its class name."""
    homes = _family_modules()
    assert {"d2_backbones.resnet", "d2_backbones.vovnet", "d2_backbones.ghostnet"} <= homes
    graph = _graph()
    modules = _package_modules()
    for shared in SHARED:
        assert not (graph[shared] & homes), (shared, graph[shared] & homes)
        words = " ".join(_code_strings(modules[shared]))
        for fam in FAMILIES.values():
            if not fam.build.__module__.startswith("d2_backbones."):
                continue
            for needle in (fam.config_node, *fam.builder_names, fam.build.__name__, fam.config_dir):
                assert needle not in words, (shared, needle)


def test_family_homes_import_only_lower_layers():
    """Imports point one way: the family homes never import config/build or anything above them."""
    graph = _graph()
    lower = {"d2_backbones.errors", "d2_backbones.layers", "d2_backbones.fpn", "d2_backbones.families",
             "d2_backbones.weights", "d2_backbones.weights.formats", "d2_backbones.weights.read",
             "d2_backbones.weights.write", "d2_backbones.weights.checks", "d2_backbones.weights.checkpointer",
             "d2_backbones.yaml_safety", "d2_backbones.rundir"}
    for home in _family_modules():
        assert graph[home] <= lower, (home, graph[home] - lower)


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
