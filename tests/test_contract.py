"""The family contract, tested once for every family of FAMILIES x representative variants (timm's
tests/test_models.py pattern): the interface, exact output shapes, freezing isolation, norm_eval,
with_cp, every parameter learning, TorchScript, folding, and the yacs round trip through the
registered builders. Family test files keep only what is family-specific.

The ``check_*`` functions take ``(family, kwargs)`` so that a new family (tests/test_toy_family.py)
runs the same contract.
"""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import assert_same_outputs, bn_buffers, randomize_norms, train_step
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone

import d2_backbones
from d2_backbones import FAMILIES, FamilyBackbone, build_fpn, kwargs_from_cfg
from d2_backbones.export import export_torchscript

# family -> variant id -> constructor kwargs (norm "BN" unless given): each family's own ``contract_variants``
VARIANTS = {name: dict(fam.contract_variants) for name, fam in FAMILIES.items()}
# the heavier variants run in the slow tier; the development loop keeps one or two light ones per family
HEAVY = {v for fam in FAMILIES.values() for v in fam.heavy_variants}
CASES = [pytest.param((fam, vid), id=vid, marks=[pytest.mark.slow] if vid in HEAVY else [])
         for fam in VARIANTS for vid in VARIANTS[fam]]


def test_every_family_has_contract_variants():
    assert all(VARIANTS.values()) and set(VARIANTS) == set(FAMILIES)


def build(family, kwargs, **more):
    """The family's constructor with every feature requested, BN, offsets of about a pixel for DCN."""
    kw = {"norm": "BN", "out_features": list(family.feature_names), **kwargs, **more}
    model = family.build(**kw)
    for name, m in model.named_modules():  # zero-initialised offsets would hide the deformable path
        if "offset" in name.split(".")[-1] and isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.002)
    return model


def _units(model):
    return [(name, nn.ModuleList(mods)) for name, mods in model.named_stages()]


# ---------------------------------------------------------------------------------------------- checks
def check_interface(family, kwargs):
    model = build(family, kwargs)
    assert isinstance(model, FamilyBackbone)
    names = [n for n, _ in model.named_stages()]
    assert names == ["stem"] + list(model.stage_names)
    assert set(model.output_shape()) <= set(family.feature_names) and tuple(family.feature_names)[0] == "stem"
    assert isinstance(model.describe(), str) and model.describe()
    assert model.with_cp is False and model.norm_eval is False and model.freeze_at == 0
    assert build(family, kwargs, with_cp=True).with_cp is True
    assert model.freeze(0) is model
    for key in family.arg_keys.values():  # every key the builders read exists in the package's config
        node = d2_backbones.get_cfg()
        for part in key.split("."):
            node = node[part]


def check_output_shapes(family, kwargs, size):
    model = build(family, kwargs).eval()
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    shapes = model.output_shape()
    assert list(out) == list(shapes)
    divisible = h % 32 == 0 and w % 32 == 0
    for k, spec in shapes.items():
        n, c, oh, ow = out[k].shape
        assert (n, c) == (2, spec.channels), k
        for got, full in ((oh, h), (ow, w)):
            if divisible:  # what detectron2 feeds an FPN backbone: exact
                assert got == full // spec.stride, (k, got, full, spec.stride)
            else:  # strided layers round up or down, never further
                assert math.floor(full / spec.stride) <= got <= math.ceil(full / spec.stride), (k, got, spec.stride)


def check_freezing(family, kwargs, freeze_at):
    """``freeze_at=-1``: every unit (stem and all built stages)."""
    if freeze_at < 0:
        freeze_at = len(build(family, kwargs).named_stages())
    model = build(family, kwargs, freeze_at=freeze_at)
    units = _units(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable or [nn.Parameter(torch.zeros(1))], lr=0.1)
    train_step(model, torch.randn(2, 3, 64, 64))
    opt.step()
    after = model.state_dict()
    for idx, (name, unit) in enumerate(units):
        frozen = idx < freeze_at
        norms = [m for m in unit.modules() if isinstance(m, (_BatchNorm, FrozenBatchNorm2d))]
        assert norms and all(isinstance(m, FrozenBatchNorm2d) == frozen for m in norms), name
        assert all(p.requires_grad != frozen for p in unit.parameters()), name
        # every tensor of a frozen unit stays; every trainable unit changes
        ptrs = {t.data_ptr() for k, t in unit.state_dict().items() if not k.endswith("num_batches_tracked")}
        mine = [k for k, t in after.items() if t.data_ptr() in ptrs]
        changed = [k for k in mine if not torch.equal(before[k], after[k])]
        assert mine and ((not changed) if frozen else changed), (name, frozen, changed[:3])


def check_norm_eval(family, kwargs):
    x = torch.randn(2, 3, 64, 64) * 3 + 1
    model = build(family, kwargs, norm_eval=True)
    before = bn_buffers(model)
    train_step(model, x)
    assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    assert all(torch.equal(before[k], v) for k, v in bn_buffers(model).items())
    assert any(m.weight.grad is not None for m in model.modules() if isinstance(m, _BatchNorm))
    control = build(family, kwargs)
    before = bn_buffers(control)
    train_step(control, x)
    assert not all(torch.equal(before[k], v) for k, v in bn_buffers(control).items())


def check_with_cp(family, kwargs):
    ref = build(family, kwargs)
    cp = build(family, kwargs, with_cp=True)
    cp.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for model in (ref, cp):
        model.train()
        out = model(x)
        sum(v.pow(2).mean() for v in out.values()).backward()
        outs.append(out)
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k])
    grads = dict(cp.named_parameters())
    for n, p in ref.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6)
    buffers = bn_buffers(cp)
    for k, v in bn_buffers(ref).items():
        torch.testing.assert_close(v, buffers[k])


def check_every_parameter_learns(family, kwargs):
    model = build(family, kwargs)
    with torch.no_grad():  # zero-initialised layers (GC's last conv) pass no gradient upstream at the first step
        for p in model.parameters():
            if not p.abs().sum() > 0:
                p.normal_(std=0.01)
    train_step(model, torch.randn(2, 3, 64, 64))
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad[:5]


def scriptable(family, kwargs) -> bool:
    """VoVNet's deformable unit looks its children up by checkpoint name at run time: traced, not scripted
    (docs/export.md's coverage table)."""
    return not (family.name == "vovnet" and any(kwargs.get("stage_with_dcn", ())))


def check_torchscript(family, kwargs):
    body = build(family, kwargs)
    model = build_fpn(body, list(body.stage_names), 32).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        for method in ("tracing", "scripting") if scriptable(family, kwargs) else ("tracing",):
            out = export_torchscript(model, x, method)(x)
            assert list(out) == list(ref)
            for k in ref:
                torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5)


def check_folding(family, kwargs):
    body = build(family, kwargs, norm="FrozenBN", freeze_at=2)
    model = randomize_norms(build_fpn(body, list(body.stage_names), 64, top_block="p6p7"))
    assert_same_outputs(model, torch.randn(1, 3, 96, 64), odd=(1, 3, 97, 75))


def check_yacs_round_trip(family, kwargs):
    """kwargs -> config keys -> registered builders: the same network (names, shapes, outputs)."""
    kw = {"norm": "BN", "out_features": list(family.feature_names), **kwargs}
    cfg = d2_backbones.get_cfg()
    opts = []
    for arg, value in kw.items():
        opts += [family.arg_keys[arg], value]
    cfg.merge_from_list(opts + ["MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.BACKBONE.NAME", family.builder_names[0]])
    read = kwargs_from_cfg(family, cfg, ShapeSpec(channels=3))
    assert {k: v for k, v in read.items() if k in kw} == {k: (list(v) if isinstance(v, tuple) else v)
                                                         for k, v in kw.items()}
    torch.manual_seed(0)
    from_cfg = build_backbone(cfg).eval()
    torch.manual_seed(0)
    direct = family.build(**read).eval()  # the other arguments at the config's defaults
    assert {k: v.shape for k, v in from_cfg.state_dict().items()} == {k: v.shape for k, v in direct.state_dict().items()}
    from_cfg.load_state_dict(direct.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = from_cfg(x), direct(x)
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    stages = list(direct.stage_names)
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", family.builder_names[1], "MODEL.FPN.IN_FEATURES", stages])
    levels = [f"p{int(math.log2(direct.output_shape()[f].stride))}" for f in stages]
    assert list(build_backbone(cfg).output_shape()) == levels + [f"p{int(levels[-1][1:]) + 1}"]


# ---------------------------------------------------------------------------------------------- the tests
@pytest.fixture(params=CASES)
def case(request):
    fam, vid = request.param
    return FAMILIES[fam], copy.deepcopy(VARIANTS[fam][vid])


def test_interface(case):
    check_interface(*case)


@pytest.mark.parametrize("size", [(64, 96), (65, 79)], ids=["divisible", "odd"])
def test_output_shapes(case, size):
    check_output_shapes(*case, size)


@pytest.mark.parametrize("freeze_at", [0, 1, 2, -1], ids=["none", "stem", "stem+1", "all"])
def test_freezing_isolates_exactly_the_frozen_stages(case, freeze_at):
    check_freezing(*case, freeze_at)


def test_norm_eval_keeps_statistics(case):
    check_norm_eval(*case)


def test_with_cp_same_outputs_gradients_and_statistics(case):
    check_with_cp(*case)


def test_every_parameter_learns(case):
    check_every_parameter_learns(*case)


def test_torchscript_trace_and_script(case):
    check_torchscript(*case)


def test_optimize_for_inference_equivalence(case):
    check_folding(*case)


def test_yacs_round_trip_through_registered_builders(case):
    check_yacs_round_trip(*case)
