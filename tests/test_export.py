"""Export parity: TorchScript (tracing, scripting) and ONNX (onnxruntime) against eager, per family.

Models are built from the shipped yamls through the registered builders (d2_backbones.get_cfg()
first), with BatchNorm whose running statistics are first calibrated on random batches, so the
features are O(1) and absolute tolerances are meaningful.
"""
import os
import subprocess
import sys

import onnxruntime as ort  # the "test" extra (with onnx and onnxscript); export parity is required, never skipped
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from d2_backbones.export import (build_export_model, check_input_size, export_onnx, export_torchscript, main,
                                 max_rel_diff, run_onnx, setup_cfg)

from conftest import CONFIG_DIR, REPO


FAMILIES = {
    # name: (yaml, config overrides)
    "R-18": ("ResNet/faster_rcnn_R_18_FPN_1x.yaml", ["MODEL.RESNETS.NORM", "BN"]),
    "V-19-slim-dw-eSE": ("VoVNet/faster_rcnn_V_19_slim_dw_eSE_FPNLite_3x.yaml", ["MODEL.VOVNET.NORM", "BN"]),
    "V-39-eSE": ("VoVNet/faster_rcnn_V_39_eSE_FPN_3x.yaml", ["MODEL.VOVNET.NORM", "BN"]),
    "GhostNet-1.0": ("GhostNet/faster_rcnn_ghostnet_100_FPN_1x.yaml", ["MODEL.GHOSTNET.NORM", "BN"]),
}
EXPORT_SIZE = (64, 96)
OTHER_SIZE = (96, 64)  # a second size: traced / dynamic-shape graphs must not have the first baked in
# TorchScript runs the same ATen kernels as eager: differences are float reassociation only.
TS_TOL = dict(rtol=1e-5, atol=1e-5)
# onnxruntime has its own conv/GEMM kernels (different summation order). Their float32 round-off
# grows with the magnitude of the sums, so the bound is relative to the feature's largest value:
# max |eager - onnx| <= 1e-4 * max(1, max |eager|) (measured: ~1e-6 .. 2e-5).
ONNX_REL_TOL = 1e-4


def _calibrate(model, steps=3):
    """Give every BatchNorm the running statistics of random inputs (cumulative average), then eval."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(2, 3, *EXPORT_SIZE))
    return model.eval()


_CACHE = {}


def _model(name):
    if name not in _CACHE:
        yaml, opts = FAMILIES[name]
        torch.manual_seed(0)
        cfg = setup_cfg(os.path.join(CONFIG_DIR, yaml), opts + ["MODEL.BACKBONE.FREEZE_AT", 0])
        model = _calibrate(build_export_model(cfg))
        assert any(isinstance(m, _BatchNorm) for m in model.modules())
        _CACHE[name] = model
    return _CACHE[name]


def _inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 3, *s, generator=g) for s in (EXPORT_SIZE, OTHER_SIZE)]


def _assert_same(eager, got, tol=None):
    assert list(got) == list(eager)
    for k in eager:
        assert eager[k].abs().max() > 0.05, f"{k} is (near) zero: the comparison would be vacuous"
        if tol is not None:
            torch.testing.assert_close(got[k], eager[k], **tol, msg=lambda m: f"{k}: {m}")
    if tol is None:
        diffs = max_rel_diff(eager, got)
        assert max(diffs.values()) <= ONNX_REL_TOL, diffs


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tracing", "scripting"])
@pytest.mark.parametrize("name", ["R-18", "V-19-slim-dw-eSE", "GhostNet-1.0"])
def test_torchscript_matches_eager(name, method, tmp_path):
    model = _model(name)
    path = str(tmp_path / f"{name}.ts")
    export_torchscript(model, _inputs()[0], method, path)
    loaded = torch.jit.load(path)  # the saved file, not the in-memory module
    for x in _inputs():
        with torch.no_grad():
            eager = model(x)
            _assert_same(eager, loaded(x), TS_TOL)
    expected = ["p2", "p3", "p4", "p5", "p6"]
    assert list(eager) == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", ["R-18", "V-19-slim-dw-eSE", "GhostNet-1.0"])
def test_onnx_dynamo_matches_eager(name, tmp_path):
    model = _model(name)
    path = str(tmp_path / f"{name}.onnx")
    names = export_onnx(model, _inputs()[0], path, exporter="dynamo")
    assert names == list(model.output_shape())
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == names and sess.get_inputs()[0].name == "images"
    for x in _inputs():  # the second size checks the dynamic H/W axes
        with torch.no_grad():
            _assert_same(model(x), run_onnx(path, x))


@pytest.mark.slow
def test_onnx_legacy_exporter_matches_eager(tmp_path):
    model = _model("V-39-eSE")  # residual OSA modules and eSE in every module
    path = str(tmp_path / "v39.onnx")
    export_onnx(model, _inputs()[0], path, exporter="torchscript")
    assert not model.training  # the exporter must leave the model in eval mode
    for x in _inputs():
        with torch.no_grad():
            _assert_same(model(x), run_onnx(path, x))


def test_max_rel_diff_detects_a_difference():
    a = {"p2": torch.ones(1, 2, 4, 4)}
    b = {"p2": torch.ones(1, 2, 4, 4)}
    b["p2"][0, 0, 0, 0] = 1.5
    assert max_rel_diff(a, b)["p2"] == pytest.approx(0.5)
    with pytest.raises(AssertionError, match="differ from eager outputs"):
        max_rel_diff(a, {"p3": b["p2"]})


def test_input_size_not_divisible_is_refused_with_fix():
    with pytest.raises(ValueError, match=r"500x500 is not divisible by backbone.size_divisibility=32.*512x512"):
        check_input_size(500, 500)


@pytest.mark.slow
def test_main_with_normalization_inside(tmp_path):
    report = main(["--config-file", os.path.join(CONFIG_DIR, "GhostNet/retinanet_ghostnet_050_FPN_1x.yaml"),
                   "--format", "torchscript", "--export-method", "scripting", "--include-normalization",
                   "--height", "96", "--width", "64", "--output", str(tmp_path)])
    assert set(report) == {"96x64", "128x32"}
    assert list(report["96x64"]) == ["p3", "p4", "p5", "p6", "p7"]  # RetinaNet FPN: P6/P7 top block
    assert max(max(d.values()) for d in report.values()) <= 1e-5
    assert (tmp_path / "backbone_fpn_scripting.ts").is_file()


@pytest.mark.slow
def test_export_entry_point(tmp_path):
    """python -m d2_backbones.export in a fresh process: applies our config keys first, exports ONNX, checks parity."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "d2_backbones.export",
           "--config-file", os.path.join(CONFIG_DIR, "VoVNet/faster_rcnn_V_19_slim_dw_eSE_FPNLite_3x.yaml"),
           "--format", "onnx", "--onnx-exporter", "torchscript", "--height", "64", "--width", "96",
           "--output", str(tmp_path), "MODEL.VOVNET.NORM", "BN"]
    res = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Exported build_d2b_vovnet_fpn_backbone" in res.stdout, res.stdout
    assert res.stdout.count("max rel diff") == 2
    assert (tmp_path / "backbone_fpn.onnx").is_file()
