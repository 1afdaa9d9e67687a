"""The inference runtime switch (TEST.RUNTIME x TEST.PRECISION), int8 calibration, the whole-detector benchmark.

Fast tier: the checks of the keys, the messages of a missing package, the CPU's ISA and what it says, the
stand-in backbone's interface. Slow tier (exports at startup, subprocesses): parity of every family's small
variant through ``make_predictor`` for each runtime in fp32, bf16, the calibration command and its cache,
train_net --eval-only with the switch, the benchmark's quick form.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import CONFIG_DIR, REPO, captured_logs, warnings_in

from d2_backbones import runtime as rt
from d2_backbones.config import get_cfg
from d2_backbones.errors import ConfigError

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from detector import compare, realistic_weights, synthetic_image  # noqa: E402

AVX2_ONLY = {"avx2": True, "avx512": False, "bf16": False, "amx": False, "vnni": False, "source": "test"}
SAPPHIRE = {"avx2": True, "avx512": True, "bf16": True, "amx": True, "vnni": True, "source": "test"}

# the small variant of every family, as a Mask R-CNN (Faster R-CNN for timm) at a small test size
FAMILY_CONFIGS = {
    "resnet": ("ResNet/mask_rcnn_R_50_FPN_1x.yaml", ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]),
    "vovnet": ("VoVNet/mask_rcnn_V_19_slim_dw_eSE_FPNLite_3x.yaml", []),
    "ghostnet": ("GhostNet/mask_rcnn_ghostnet_050_FPN_1x.yaml", []),
    "timm": ("Timm/faster_rcnn_timm_mobilenetv3_large_100_FPN_1x.yaml", []),
}
SIZE = (224, 288)


def _cfg(opts=()):
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"] + list(opts))
    return cfg


# ---------------------------------------------------------------------------------------------- keys
@pytest.mark.parametrize("opts,words", [
    (["TEST.RUNTIME", "tensorrt"], ["TEST.RUNTIME='tensorrt'", "'torch', 'onnxruntime', 'openvino'"]),
    (["TEST.PRECISION", "fp16"], ["TEST.PRECISION='fp16'", "'fp32', 'bf16', 'int8'"]),
    (["TEST.PRECISION", "int8"], ["TEST.RUNTIME onnxruntime", "d2_backbones.calibrate"]),
    (["TEST.RUNTIME", "onnxruntime", "TEST.PRECISION", "bf16"], ["TEST.RUNTIME openvino", "torch"]),
    (["TEST.RUNTIME", "openvino", "MODEL.DEVICE", "cuda"], ["MODEL.DEVICE='cuda'", "MODEL.DEVICE cpu"]),
])
def test_invalid_values_are_refused_with_the_fix(opts, words):
    with pytest.raises(ConfigError) as e:
        rt.check_runtime(_cfg(opts))
    for w in words:
        assert w in str(e.value)


def test_int8_is_refused_for_the_evaluations_during_training():
    cfg = _cfg(["TEST.RUNTIME", "onnxruntime", "TEST.PRECISION", "int8"])
    rt.check_runtime(cfg, eval_only=True, imports=False)
    with pytest.raises(ConfigError, match="--eval-only"):
        rt.check_runtime(cfg, eval_only=False, imports=False)


def test_defaults_are_pytorch_fp32_and_valid():
    cfg = _cfg()
    assert (cfg.TEST.RUNTIME, cfg.TEST.PRECISION) == ("torch", "fp32")
    assert not rt.is_switched(cfg)
    rt.check_runtime(cfg)
    assert rt.is_switched(_cfg(["TEST.PRECISION", "bf16"]))


@pytest.mark.parametrize("module", ["onnxruntime", "openvino"])
def test_missing_runtime_says_what_to_install(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    with pytest.raises(ImportError) as e:
        rt.check_runtime(_cfg(["TEST.RUNTIME", module]))
    msg = str(e.value)
    assert "pip install 'd2_backbones[deploy]'" in msg and f"pip install {module}" in msg
    assert "TEST.RUNTIME torch" in msg


def test_missing_runtime_fails_before_the_predictor_builds(monkeypatch):
    from d2_backbones.predictor import make_predictor

    monkeypatch.setitem(sys.modules, "openvino", None)
    cfg = _cfg(["TEST.RUNTIME", "openvino", "MODEL.WEIGHTS", "does_not_exist.pth"])
    with pytest.raises(ImportError, match=r"d2_backbones\[deploy\]"):
        make_predictor(cfg)


# ---------------------------------------------------------------------------------------------- the CPU
def test_precision_notes_follow_the_isa():
    assert "slower than fp32" in rt.precision_note("bf16", AVX2_ONLY)
    assert "VNNI" in rt.precision_note("int8", AVX2_ONLY)
    assert rt.precision_note("fp32", AVX2_ONLY) is None
    assert rt.precision_note("bf16", SAPPHIRE) is None and rt.precision_note("int8", SAPPHIRE) is None
    assert rt.describe_isa(AVX2_ONLY).startswith("AVX2")


def test_cpu_isa_reads_proc_cpuinfo_or_torch(monkeypatch):
    isa = rt.cpu_isa()
    assert set(isa) == {"avx2", "avx512", "bf16", "amx", "vnni", "source"}
    if os.path.exists("/proc/cpuinfo"):
        flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
        assert isa["avx512"] == ("avx512f" in flags)
        assert isa["bf16"] == bool({"avx512_bf16", "amx_bf16"} & set(flags))
        assert isa["vnni"] == bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))
    # without /proc/cpuinfo: torch's capability
    import builtins

    real_open = builtins.open

    def no_cpuinfo(path, *a, **k):
        if path == "/proc/cpuinfo":
            raise OSError("absent")
        return real_open(path, *a, **k)

    rt.cpu_isa.cache_clear()
    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    try:
        fallback = rt.cpu_isa()
    finally:
        monkeypatch.undo()
        rt.cpu_isa.cache_clear()
    assert "get_cpu_capability" in fallback["source"] and fallback["bf16"] is False
    assert fallback["avx512"] == (str(torch.backends.cpu.get_cpu_capability()).upper() == "AVX512")


def test_slower_precision_is_said_at_start(monkeypatch):
    rt.cpu_isa.cache_clear()
    monkeypatch.setattr(rt, "cpu_isa", lambda: AVX2_ONLY)
    with captured_logs(["d2_backbones"]) as records:  # whatever an earlier setup() did to propagation
        rt.check_runtime(_cfg(["TEST.PRECISION", "bf16"]))
    assert any("without AVX512-BF16 or AMX" in m for m in warnings_in(records))


# ---------------------------------------------------------------------------------------------- stand-ins
@pytest.mark.slow
def test_runtime_backbone_keeps_the_backbone_interface():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    cfg = _cfg(["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
                "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
                "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
                "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"]])
    bb = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    stand_in = rt._runtime_backbone(bb, "torch", "bf16")
    assert stand_in.output_shape() == bb.output_shape()
    assert stand_in.size_divisibility == bb.size_divisibility == 32
    assert stand_in.padding_constraints == bb.padding_constraints
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out, ref = stand_in(x), bb(x)
    assert list(out) == list(ref) and all(out[k].dtype == torch.float32 for k in out)
    assert max(float((out[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref) < 0.05


# ---------------------------------------------------------------------------------------------- predictors
def _predictors(config, opts, modes, weights):
    """detectron2's DefaultPredictor and make_predictor for each mode, sharing realistic random weights (saved to
    ``weights`` and loaded by our predictors as a user's checkpoint is)."""
    from detectron2.engine import DefaultPredictor
    from d2_backbones.predictor import make_predictor

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIG_DIR, config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", min(SIZE),
                         "INPUT.MAX_SIZE_TEST", max(SIZE)] + list(opts))
    torch.manual_seed(0)
    ref = DefaultPredictor(cfg)
    img = synthetic_image(SIZE)
    realistic_weights(ref.model, torch.as_tensor(img.transpose(2, 0, 1).astype("float32")))
    torch.save({"model": ref.model.state_dict()}, weights)
    ours = {}
    for runtime, precision in modes:
        c = cfg.clone()
        c.merge_from_list(["TEST.RUNTIME", runtime, "TEST.PRECISION", precision, "MODEL.WEIGHTS", weights,
                           "TEST.OPTIMIZE_FOR_INFERENCE", True])
        ours[(runtime, precision)] = make_predictor(c)
    return ref, ours, img


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_fp32_runtimes_equal_detectron2(tmp_path, family):
    config, opts = FAMILY_CONFIGS[family]
    weights = str(tmp_path / "model.pth")
    ref, ours, img = _predictors(config, opts, [("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32")],
                                 weights)
    with torch.no_grad():
        expected = ref(img)["instances"]
        assert len(expected) > 0
        for mode, p in ours.items():
            got = p(img)["instances"]
            d = compare(got, expected)
            assert d["count"] == 0 and d["unmatched"] == 0, (mode, len(got), len(expected), d)
            assert d["boxes"] <= 1e-4 * max(SIZE) and d["scores"] <= 1e-4, (mode, d)
            assert d["masks"] <= 1e-3, (mode, d)
            assert p.model.backbone.label == " ".join(mode)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_bf16_runs_and_is_close(tmp_path, runtime):
    config, opts = FAMILY_CONFIGS["resnet"]
    ref, ours, img = _predictors(config, opts, [(runtime, "bf16")], str(tmp_path / "model.pth"))
    p = ours[(runtime, "bf16")]
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        expected = ref(img)["instances"]
        got = p(img)["instances"]
        feats, ref_feats = p.model.backbone(x), ref.model.backbone(x)
    rel = max(float((feats[k] - ref_feats[k]).abs().max() / ref_feats[k].abs().max()) for k in ref_feats)
    assert 1e-4 < rel < 0.1  # bfloat16: visibly not fp32, still close
    assert len(got) > 0 and abs(len(got) - len(expected)) <= max(2, len(expected) // 5)
    assert got.pred_boxes.tensor.dtype == torch.float32 and got.scores.dtype == torch.float32
    # the top detections are found again: same place (IoU > 0.9), same class
    from detectron2.structures import pairwise_iou

    top = expected[:20]
    iou = pairwise_iou(top.pred_boxes, got.pred_boxes)
    found = (iou.max(dim=1).values > 0.9) & (got.pred_classes[iou.argmax(dim=1)] == top.pred_classes)
    assert float(found.float().mean()) >= 0.9, iou.max(dim=1).values


@pytest.mark.slow
def test_bf16_heads_survive_a_deepcopy():
    """The mask head's bf16 layers stay bound to their own head in a copy (evaluation copies the model)."""
    import copy

    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIG_DIR, "ResNet/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64])
    model = build_model(cfg).eval()
    done = rt._bf16_heads(model)
    assert "roi_heads.mask_head.layers" in done and "roi_heads.box_head" in done
    twin = copy.deepcopy(model)
    assert twin.roi_heads.mask_head.layers.__self__ is twin.roi_heads.mask_head
    x = torch.randn(2, 256, 14, 14)
    with torch.no_grad():
        out = twin.roi_heads.mask_head.layers(x)
    assert out.dtype == torch.float32 and out.shape == (2, 80, 28, 28)


# ---------------------------------------------------------------------------------------------- int8
QUICKSTART = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes_short.yaml")


def _int8_cfg(weights):
    cfg = get_cfg()
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights, "TEST.RUNTIME", "onnxruntime",
                         "TEST.PRECISION", "int8"])
    return cfg


def test_missing_calibration_says_the_command(tmp_path):
    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"weights")
    cfg = _int8_cfg(str(weights))
    with pytest.raises(ConfigError) as e:
        rt.find_calibration(cfg)
    assert "python -m d2_backbones.calibrate" in str(e.value) and str(weights) in str(e.value)
    assert "no calibration exists" in str(e.value)
    # a calibration made for other weights or another config is stale: refused, named, same command
    (tmp_path / "model_final.int8-0123456789abcdef-0123456789abcdef.onnx").write_bytes(b"old")
    with pytest.raises(ConfigError, match="stale") as e:
        rt.find_calibration(cfg)
    assert "model_final.int8-0123456789abcdef" in str(e.value)
    cfg.MODEL.WEIGHTS = ""
    with pytest.raises(ConfigError, match="MODEL.WEIGHTS is empty"):
        rt.find_calibration(cfg)


def test_calibration_name_follows_weights_and_backbone_keys(tmp_path):
    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"weights")
    cfg = _int8_cfg(str(weights))
    path = rt.calibration_path(cfg)
    assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith("model_final.int8-")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.3  # the heads do not change the backbone's calibration
    assert rt.calibration_path(cfg) == path
    cfg.MODEL.FPN.OUT_CHANNELS = 128
    assert rt.calibration_path(cfg) != path
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    weights.write_bytes(b"other weights")
    assert rt.calibration_path(cfg) != path


@pytest.mark.slow
def test_calibrate_command_writes_a_cache_the_predictor_uses(tmp_path):
    from d2_backbones.predictor import make_predictor
    from detectron2.modeling import build_model

    weights = str(tmp_path / "model_final.pth")
    cfg = _int8_cfg(weights)
    cfg.MODEL.MASK_ON = True  # Mask R-CNN: the mask head is calibrated too
    torch.manual_seed(0)
    model = build_model(cfg)
    img = synthetic_image((256, 256))
    realistic_weights(model, torch.as_tensor(img.transpose(2, 0, 1).astype("float32")))
    torch.save({"model": model.state_dict()}, weights)
    with pytest.raises(ConfigError, match="d2_backbones.calibrate"):
        make_predictor(cfg)
    env = dict(os.environ, PYTHONPATH=REPO, D2B_DATASETS=str(tmp_path / "datasets"))
    cmd = [sys.executable, "-m", "d2_backbones.calibrate", "--config-file", QUICKSTART, "--num-images", "4",
           "MODEL.WEIGHTS", weights, "MODEL.MASK_ON", "True"]
    p = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    path = rt.calibration_path(cfg)
    assert os.path.isfile(path) and f"Wrote {path}" in p.stdout
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
    meta = rt.read_calibration_meta(path)
    assert meta["d2b_images"] == "4" and meta["d2b_datasets"] == "shapes_train"
    mask_path = rt.mask_calibration_path(path)
    assert os.path.isfile(mask_path) and f"Wrote {mask_path}" in p.stdout
    mask_meta = rt.read_calibration_meta(mask_path)
    assert mask_meta["d2b_mask_head_hash"] == rt.mask_head_hash(cfg) and int(mask_meta["d2b_rois"]) > 0
    # the next start uses it: int8 (quantized) backbone outputs, close to fp32 but not equal
    ours = make_predictor(cfg)
    assert ours.model.backbone.label == "onnxruntime int8"
    c = cfg.clone()
    c.merge_from_list(["TEST.PRECISION", "fp32"])
    ref = make_predictor(c)
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        a, b = ours.model.backbone(x), ref.model.backbone(x)
        assert len(ours(img)["instances"]) > 0
    rel = max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)
    assert 1e-4 < rel < 0.5
    # other weights: the cache is stale, refused with the command
    model.roi_heads.box_predictor.cls_score.bias.data += 1  # any change of the file's bytes
    torch.save({"model": model.state_dict()}, weights)
    with pytest.raises(ConfigError, match="stale"):
        make_predictor(cfg)


# ---------------------------------------------------------------------------------------------- command lines
def _random_quickstart_weights(path):
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(QUICKSTART)
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    img = synthetic_image((256, 256))
    realistic_weights(model, torch.as_tensor(img.transpose(2, 0, 1).astype("float32")))
    torch.save({"model": model.state_dict()}, path)


@pytest.mark.slow
def test_train_net_eval_only_honours_the_switch(tmp_path):
    weights = str(tmp_path / "model.pth")
    _random_quickstart_weights(weights)
    env = dict(os.environ, PYTHONPATH=REPO, D2B_DATASETS=str(tmp_path / "datasets"))

    def eval_only(*opts):
        cmd = [sys.executable, "-m", "d2_backbones.train_net", "--config-file", QUICKSTART, "--eval-only",
               "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / "out"), "--overwrite"]
        cmd = cmd[:6] + cmd[-1:] + cmd[6:-1] + list(opts)  # flags before the overrides
        return subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=1200)

    p = eval_only("TEST.RUNTIME", "onnxruntime")
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert "backbone + FPN in onnxruntime fp32" in log and "copypaste: Task: bbox" in log
    p = eval_only("TEST.RUNTIME", "onnxruntime", "TEST.PRECISION", "int8")
    assert p.returncode != 0 and "python -m d2_backbones.calibrate" in p.stderr
    p = eval_only("TEST.RUNTIME", "tensorrt")
    assert p.returncode != 0 and "TEST.RUNTIME='tensorrt'" in p.stderr


@pytest.mark.slow
def test_detector_benchmark_quick_form(tmp_path):
    out = tmp_path / "table.md"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "detector.py"), "--models", "R-50", "--sizes", "192x256",
           "--modes", "torch-fp32", "onnxruntime-fp32", "onnxruntime-int8", "--rounds", "1", "--warmup", "0",
           "--detections", "20", "--calib-images", "2", "--out", str(out)]
    p = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    table = out.read_text()
    assert "ISA: " in table and "threads" in table
    rows = [ln for ln in table.splitlines() if ln.startswith("| R-50 |")]
    assert [r.split(" | ")[2] for r in rows] == ["detectron2", "torch-fp32", "onnxruntime-fp32", "onnxruntime-int8"]
    for r in rows[1:3]:  # fp32: the same instances as detectron2's
        assert "unmatched" not in r and "boxes " in r


# ---------------------------------------------------------------------------------------------- exact head speed-ups
def test_separable_mask_pasting_equals_detectron2():
    from detectron2.layers.mask_ops import paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 28, 28, generator=g)
    xy = torch.rand(40, 2, generator=g) * torch.tensor([300.0, 200.0])  # some boxes reach past the border
    boxes = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 150 + 0.5], 1)
    ours, ref = rt.paste_masks(masks, boxes, (240, 320)), paste_masks_in_image(masks, boxes, (240, 320))
    assert ours.dtype == ref.dtype == torch.bool and ours.shape == ref.shape
    assert int((ours != ref).sum()) <= 5 and int(ref.sum()) > 10000  # float32 rounding at the threshold only
    assert rt.paste_masks(masks[:0], boxes[:0], (240, 320)).shape == (0, 240, 320)


def test_rpn_decodes_only_the_kept_anchors_with_the_same_proposals():
    import types

    from detectron2.layers import ShapeSpec
    from detectron2.modeling.proposal_generator import build_proposal_generator

    cfg = _cfg(["MODEL.RPN.IN_FEATURES", ["p2", "p3"], "MODEL.RPN.PRE_NMS_TOPK_TEST", 50,
                "MODEL.RPN.POST_NMS_TOPK_TEST", 30, "MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64]]])
    rpn = build_proposal_generator(cfg, {"p2": ShapeSpec(channels=8, stride=4),
                                         "p3": ShapeSpec(channels=8, stride=8)}).eval()
    g = torch.Generator().manual_seed(0)
    anchors = rpn.anchor_generator([torch.zeros(1, 8, 16, 20), torch.zeros(1, 8, 8, 10)])
    logits = [torch.randn(2, 16 * 20 * 3, generator=g), torch.randn(2, 8 * 10 * 3, generator=g)]
    deltas = [torch.randn(2, 16 * 20 * 3, 4, generator=g) * 0.2, torch.randn(2, 8 * 10 * 3, 4, generator=g) * 0.2]
    sizes = [(64, 80), (60, 70)]
    ref = rpn.predict_proposals(anchors, logits, deltas, sizes)
    fast = types.MethodType(rt._rpn_predict_topk_first, rpn)(anchors, logits, deltas, sizes)
    for a, b in zip(fast, ref):
        assert len(a) == len(b) == 30
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
        assert torch.equal(a.objectness_logits, b.objectness_logits)


@pytest.mark.parametrize("sampling_ratio,aligned", [(0, True), (2, True), (0, False)])
def test_gather_roi_align_equals_torchvision(sampling_ratio, aligned):
    """The row-gather ROIAlign against torchvision's kernel: two images, boxes of every size (adaptive sample
    grids from 1x1 to 9x9), boxes across and beyond the borders, degenerate and inverted boxes."""
    from detectron2.layers import ROIAlign

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 40, 48, generator=g) * 3
    xy = torch.rand(300, 2, generator=g) * 220 - 30
    wh = torch.rand(300, 2, generator=g) ** 2 * 250
    boxes = torch.cat([xy, xy + wh], 1)
    edge = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 10.0, 10.0, 10.0], [50.0, 40.0, 20.0, 10.0],
                         [-80.0, -80.0, -5.0, -6.0], [185.0, 150.0, 400.0, 300.0], [-20.0, 30.0, 400.0, 31.0]])
    boxes = torch.cat([boxes, edge])
    rois = torch.cat([torch.randint(0, 2, (len(boxes), 1), generator=g).float(), boxes], 1)
    op = ROIAlign((7, 7), 0.25, sampling_ratio, aligned)
    with torch.no_grad():
        ref = op(x, rois)
        out = rt.GatherROIAlign(op)(x, rois)
        # channels_last features (what the runtimes hand back) and a 14x14 output (the mask pooler)
        out_cl = rt.GatherROIAlign(op)(x.contiguous(memory_format=torch.channels_last), rois)
        op14 = ROIAlign((14, 14), 0.25, sampling_ratio, aligned)
        ref14, out14 = op14(x, rois[:40]), rt.GatherROIAlign(op14)(x, rois[:40])
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(out_cl, ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(out14, ref14, rtol=0, atol=2e-5)
    assert (ref.abs() > 0.5).float().mean() > 0.3  # the comparison is of real values, not of zeros
    assert torch.equal(out[-6:-3].abs().amax(dim=(1, 2, 3)) == 0, ref[-6:-3].abs().amax(dim=(1, 2, 3)) == 0)
    with torch.no_grad():  # no boxes
        assert rt.GatherROIAlign(op)(x, rois[:0]).shape == (0, 16, 7, 7)
    x.requires_grad_(True)  # autograd: the wrapped op
    assert rt.GatherROIAlign(op)(x, rois).grad_fn is not None


def test_gather_pooler_equals_detectron2_roi_pooler():
    """The multi-level pooler after ``_fast_heads``: same boxes to the same FPN levels, same values as
    detectron2's ``ROIPooler`` (two images, boxes of every level, an image without boxes)."""
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.structures import Boxes

    g = torch.Generator().manual_seed(1)
    pooler = ROIPooler((7, 7), (1 / 4, 1 / 8, 1 / 16, 1 / 32), 0, "ROIAlignV2")
    feats = [torch.randn(3, 8, 512 // s, 640 // s, generator=g) for s in (4, 8, 16, 32)]
    boxes = []
    for n in (90, 40, 0):
        xy = torch.rand(n, 2, generator=g) * 300
        wh = 2 + torch.rand(n, 2, generator=g) ** 2 * 640  # sizes of every level
        boxes.append(Boxes(torch.cat([xy, xy + wh], 1)))
    with torch.no_grad():
        ref = pooler(feats, boxes)
        holder = torch.nn.Module()
        holder.pooler = pooler
        assert "ROIAlign as a row gather" in rt._fast_heads(holder)
        out = holder.pooler(feats, boxes)
    assert holder.pooler.forward.__func__ is rt._gather_pooler_forward
    assert out.shape == ref.shape == (130, 8, 7, 7)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    assert (ref.abs() > 0.1).float().mean() > 0.3  # real values, not zeros
    from detectron2.modeling.poolers import assign_boxes_to_levels

    assert set(assign_boxes_to_levels(boxes, 2, 5, 224, 4).tolist()) == {0, 1, 2, 3}  # every level used


@pytest.mark.slow
def test_int8_mask_and_box_heads(tmp_path):
    """openvino int8 on Mask R-CNN: the calibration's mask head file runs in int8, the box head's fully connected
    layers are dynamically quantized; detections stay close to fp32. A mask head calibrated for other head keys
    is not used: a warning names the command, the head runs in bf16 / fp32 as without the file."""
    from detectron2.modeling import build_model
    from detectron2.engine import DefaultPredictor
    import copy as _copy

    from detector import calibrate_in_process

    cfg = get_cfg()
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.MASK_ON", True, "INPUT.MIN_SIZE_TEST", 256,
                         "INPUT.MAX_SIZE_TEST", 320])
    torch.manual_seed(0)
    model = build_model(cfg)
    img = synthetic_image((256, 320))
    realistic_weights(model, torch.as_tensor(img.transpose(2, 0, 1).astype("float32")))
    path = str(tmp_path / "w.int8-x.onnx")
    calibrate_in_process(cfg, _copy.deepcopy(model).eval(), [synthetic_image((256, 320), s) for s in (1, 2, 3)], path)
    mask_path = rt.mask_calibration_path(path)
    assert os.path.isfile(mask_path) and rt.read_calibration_meta(mask_path)["d2b_mask_head_hash"] == rt.mask_head_hash(cfg)

    def predictor(precision, c=cfg):
        p = DefaultPredictor(c)
        p.model.load_state_dict(model.state_dict())
        c = c.clone()
        c.merge_from_list(["TEST.RUNTIME", "openvino", "TEST.PRECISION", precision])
        with captured_logs(["d2_backbones"]) as records:
            p.model = rt.prepare_model(p.model, c, int8_path=path if precision == "int8" else None)
        return p, " ".join(r.getMessage() for r in records), warnings_in(records)

    ref, _, _ = predictor("fp32")
    ours, log, warned = predictor("int8")
    assert "roi_heads.mask_head.layers (int8)" in log and "int8 (dynamic) in roi_heads.box_head" in log, log
    assert not warned
    assert type(ours.model.roi_heads.box_head.fc1).__module__.startswith("torch.ao.nn.quantized")
    out = ours(img)["instances"]
    assert len(out) > 10 and out.pred_masks.shape[1:] == img.shape[:2]
    # the int8 heads on the features of real detections: close to fp32 (relative to the largest value), not equal
    from d2_backbones.calibrate import mask_head_inputs

    rois = torch.from_numpy(mask_head_inputs(_copy.deepcopy(model).eval(), cfg, [img])[0])
    boxes = torch.randn(64, 64, 7, 7).abs()
    with torch.no_grad():
        for head, x in ((lambda m: m.roi_heads.mask_head.layers, rois), (lambda m: m.roi_heads.box_head, boxes)):
            a, b = head(ours.model)(x), head(ref.model)(x.contiguous(memory_format=torch.channels_last))
            rel = float((a - b).abs().max() / b.abs().max())
            assert 1e-4 < rel < 0.15, rel
    # other mask head keys: the file is not used, with a warning naming the command
    other = cfg.clone()
    other.merge_from_list(["MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", 2])
    _, log, warned = predictor("int8", other)
    assert "mask_head.layers (int8)" not in log
    assert any("calibrated for other ROI_MASK_HEAD" in w and "d2_backbones.calibrate" in w for w in warned), warned
