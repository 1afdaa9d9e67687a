"""Whole-detector export (``python -m d2_backbones.export --whole-model``): the exported files against eager.

Every meta-architecture the export covers (Faster / Mask / Cascade Mask R-CNN, Panoptic FPN, RetinaNet,
FCOS from a Python config) is exported to ONNX and TorchScript and run on pictures of the synthetic shapes
dataset. The ONNX files run in a fresh process in which ``detectron2``, ``d2_backbones``, ``torch`` and
``torchvision`` cannot be imported (onnxruntime and numpy only). Mask R-CNN is checked for every family.

Models have random weights scaled so that every layer's output has std 1 on the first picture
(:func:`_spread`), so scores and boxes spread out: detectron2's initialisation (classifier std 0.01) makes
every score nearly equal, and plain 1/sqrt(fan-in) weights saturate some families (scores of 1.0), so
the comparison would be about ties. The score threshold is set to the 30% quantile of the scores of the first picture, so pictures give
different numbers of detections (the files must not keep the first picture's count).

Tolerances (docs/export.md): boxes within 0.05 px, scores within 1e-3, masks differing on at most 1% of
the pixels in either mask (or 4 pixels), semantic maps on at most 1% of the pixels. A detection may be
unmatched when its score is within the score tolerance of where the other output was cut, and up to 20%
of an image's detections (10% over all pictures) may differ as a whole: a near-tie in the RPN's top-k or
NMS sends another proposal to the box head (seen with timm's resnet18: 11 of 82 on one picture, while
the matched ones agreed within 1e-4 px). TorchScript runs
torch's own kernels: it must be exact.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from d2_backbones.data import make_shapes
from d2_backbones.export import main
from d2_backbones.export_model import (DetectorExport, build_detector, export_detector_onnx,
                                       export_detector_torchscript, match_detections, paste_masks, runner)

from conftest import CONFIG_DIR, REPO

SIZE = ["INPUT.MIN_SIZE_TEST", "192", "INPUT.MAX_SIZE_TEST", "256"]
LAZY_SIZE = ["dataloader.test.mapper.augmentations.0.short_edge_length=192",
             "dataloader.test.mapper.augmentations.0.max_size=256", "train.init_checkpoint="]
CASES = {
    # name: (config, overrides)
    "mask_rcnn-R-18": ("ResNet/faster_rcnn_R_18_FPN_1x.yaml", ["MODEL.MASK_ON", "True"]),
    "mask_rcnn-V-19-slim": ("VoVNet/faster_rcnn_V_19_slim_dw_eSE_FPNLite_3x.yaml", ["MODEL.MASK_ON", "True"]),
    "mask_rcnn-GhostNet-0.5": ("GhostNet/mask_rcnn_ghostnet_050_FPN_1x.yaml", []),
    # timm resnet18: with these random weights timm's mobilenetv3_small_050 is ill-conditioned (scores of
    # 1.0, boxes 0.06 px and masks 5% apart on one picture), which says nothing about the export
    "mask_rcnn-timm-resnet18": ("Timm/mask_rcnn_timm_efficientnet_b0_FPN_1x.yaml", ["MODEL.TIMM.NAME", "resnet18"]),
    "faster_rcnn-R-18": ("ResNet/faster_rcnn_R_18_FPN_1x.yaml", []),
    "cascade_mask_rcnn-V-19-slim": ("VoVNet/cascade_mask_rcnn_V_19_slim_dw_eSE_FPNLite_3x.yaml", []),
    "retinanet-GhostNet-0.5": ("GhostNet/retinanet_ghostnet_050_FPN_1x.yaml", []),
    "panoptic_fpn-GhostNet-1.0": ("GhostNet/panoptic_fpn_ghostnet_100_3x.yaml", []),
    "fcos-R-18-python-config": ("ResNet/fcos_R_50_FPN_1x.py", ["model.backbone.bottom_up.depth=18"]),
}
OUTPUTS = {"mask_rcnn": ["boxes", "scores", "classes", "masks"], "faster_rcnn": ["boxes", "scores", "classes"],
           "cascade_mask_rcnn": ["boxes", "scores", "classes", "masks"], "retinanet": ["boxes", "scores", "classes"],
           "panoptic_fpn": ["boxes", "scores", "classes", "masks", "sem_seg"], "fcos": ["boxes", "scores", "classes"]}
TOL = dict(box_tol=0.05, score_tol=1e-3)


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Three shapes pictures of three sizes (128x128, 128x96, 100x128), uint8 RGB."""
    root = make_shapes(str(tmp_path_factory.mktemp("export_model") / "shapes"), n_train=3, n_val=1, size=128, seed=2)
    imgs = [np.asarray(Image.open(os.path.join(root, "train", f"train_{i:05d}.png")).convert("RGB")) for i in range(3)]
    return [torch.from_numpy(a.copy()) for a in (imgs[0], imgs[1][:, :96], imgs[2][:100])]


def _spread(model: nn.Module, image: torch.Tensor, wrapper_args, seed: int = 0) -> nn.Module:
    """Random weights under which every layer's output has std 1 on ``image`` (data-dependent init, as LSUV):
    scores spread over (0, 1), boxes move, nothing saturates. Normal weights, std 1/sqrt(fan-in), biases std
    0.1, then, in one forward pass in execution order, each conv/linear layer is divided by the std of its
    output (a layer run several times, e.g. a head shared by the FPN levels, on its first run)."""
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d))]
    done = set()

    def normalise(m, args, out):
        if m in done:
            return None
        done.add(m)
        std = float(out.std()) if out.numel() > 1 else 0.0
        if std > 0:
            m.weight.div_(std)
            if m.bias is not None:
                m.bias.div_(std)
            return out / std
        return None

    with torch.no_grad():
        for m in layers:
            fan_in = m.weight[:, 0].numel() if isinstance(m, nn.ConvTranspose2d) else m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * fan_in ** -0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        hooks = [m.register_forward_hook(normalise) for m in layers]
        try:
            DetectorExport(model, **wrapper_args)(image)
        finally:
            for h in hooks:
                h.remove()
    return model.eval()


def _set_score_threshold(model: nn.Module, value: float) -> None:
    heads = getattr(model, "roi_heads", None)
    if heads is None:
        model.test_score_thresh = value
        return
    predictors = heads.box_predictor if isinstance(heads.box_predictor, nn.ModuleList) else [heads.box_predictor]
    for p in predictors:
        p.test_score_thresh = value


def _wrapper(name: str, pictures) -> DetectorExport:
    rel, opts = CASES[name]
    path = os.path.join(CONFIG_DIR, rel)
    if rel.endswith(".py"):
        opts = opts + LAZY_SIZE + ["model.num_classes=3"]
    else:
        opts = opts + SIZE + ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.RETINANET.NUM_CLASSES", "3"]
    torch.manual_seed(0)
    model, st = build_detector(path, opts)
    args = dict(min_size=st.min_size, max_size=st.max_size, model_format=st.model_format)
    _spread(model, pictures[0], args)
    wrapper = DetectorExport(model, **args)
    _set_score_threshold(model, 0.0)
    with torch.no_grad():
        scores = wrapper(pictures[0])[1]
    _set_score_threshold(model, float(scores.quantile(0.3)))
    return wrapper


def _eager(wrapper, pictures):
    with torch.no_grad():
        return [{k: v.numpy() for k, v in zip(wrapper.names, wrapper(p))} for p in pictures]


_CHILD = r"""
import importlib.abc, json, sys

BLOCKED = ("detectron2", "d2_backbones", "torch", "torchvision")


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not importable here: the exported file must run without it")


sys.meta_path.insert(0, Block())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} could be imported: the block does not work")

import numpy as np
import onnxruntime as ort

model, images, out = sys.argv[1:4]
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
names = [o.name for o in sess.get_outputs()]
results = {}
with np.load(images) as data:
    for i in range(len(data.files)):
        for k, v in zip(names, sess.run(None, {"image": data[str(i)]})):
            results[f"{i}/{k}"] = v
np.savez(out, **results)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"inputs": [(i.name, i.type, i.shape) for i in sess.get_inputs()], "outputs": names,
                  "blocked_modules_loaded": loaded}))
"""


def run_onnx_without_detectron2(path: str, pictures, tmp_path):
    """Run ``path`` on ``pictures`` in a fresh process that cannot import detectron2, d2_backbones, torch."""
    np.savez(tmp_path / "images.npz", **{str(i): p.numpy() for i, p in enumerate(pictures)})
    child = tmp_path / "child.py"
    child.write_text(_CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, str(child), path, str(tmp_path / "images.npz"), str(tmp_path / "out.npz")],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["blocked_modules_loaded"] == []
    with np.load(tmp_path / "out.npz") as data:
        outs = [{k: data[f"{i}/{k}"] for k in info["outputs"]} for i in range(len(pictures))]
    return info, outs


def _assert_match(ref, got, wrapper, exact=False):
    counts, unmatched_total = [], 0
    for i, (r, g) in enumerate(zip(ref, got)):
        assert list(g) == wrapper.names
        if exact:
            for k in r:
                np.testing.assert_array_equal(g[k], r[k], err_msg=f"picture {i}: {k}")
        thresh = _score_thresh(wrapper.model)
        rep = match_detections(r, g, score_thresh=thresh, **TOL)
        assert rep.ok, f"picture {i}: {rep}"
        unmatched_total += rep.unmatched
        counts.append(len(r["scores"]))
    assert sum(counts) >= 30, counts  # the comparison is about detections
    assert unmatched_total <= 0.1 * sum(counts), (unmatched_total, counts)  # near-ties stay rare over all pictures
    assert len(set(counts)) > 1, counts  # different numbers of detections: none baked into the file


def _score_thresh(model):
    heads = getattr(model, "roi_heads", None)
    if heads is None:
        return model.test_score_thresh
    p = heads.box_predictor
    return (p[-1] if isinstance(p, nn.ModuleList) else p).test_score_thresh


# ---------------------------------------------------------------------------------------------- pieces (fast)
def test_paste_masks_equals_detectron2():
    from detectron2.layers.mask_ops import _do_paste_mask, paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    n, h, w = 30, 60, 80
    masks = torch.rand(n, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 5.0, h - 5.0]) - 10  # some boxes cross the border
    wh = torch.rand(n, 2, generator=g) * 50 + 0.5
    boxes = torch.cat([xy, xy + wh], dim=1)
    ours = paste_masks(masks, boxes, h, w, threshold=-1)
    ref, _ = _do_paste_mask(masks[:, None], boxes, h, w, skip_empty=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    binary = paste_masks(masks, boxes, h, w)
    d2 = paste_masks_in_image(masks, boxes, (h, w)).to(torch.uint8)
    near = (ours - 0.5).abs() < 1e-5  # float error can flip these
    assert binary.dtype == torch.uint8 and binary.shape == (n, h, w)
    assert torch.equal(binary[~near], d2[~near])
    assert binary.sum() > 1000  # not vacuous


@pytest.mark.parametrize("hw", [(128, 128), (100, 160), (480, 640), (801, 1333), (333, 2000), (3, 7)])
@pytest.mark.parametrize("sizes", [(800, 1333), (192, 256), (320, 320)])
def test_resize_size_equals_detectron2(hw, sizes):
    from detectron2.data.transforms import ResizeShortestEdge

    wrapper = DetectorExport.__new__(DetectorExport)
    wrapper.min_size, wrapper.max_size = sizes
    ours = DetectorExport.target_size(wrapper, torch.tensor(hw, dtype=torch.float64)).tolist()
    assert tuple(ours) == ResizeShortestEdge.get_output_shape(*hw, *sizes)


def _dets(n=10, seed=0):
    rng = np.random.RandomState(seed)
    xy = rng.rand(n, 2) * 100
    boxes = np.concatenate([xy, xy + 5 + rng.rand(n, 2) * 30], axis=1).astype(np.float32)
    return {"boxes": boxes, "scores": np.linspace(0.9, 0.5, n).astype(np.float32),
            "classes": rng.randint(0, 3, n).astype(np.int64)}


def test_match_detections_accepts_reordering_and_float_error():
    ref = _dets()
    perm = np.random.RandomState(1).permutation(10)
    got = {k: v[perm].copy() for k, v in ref.items()}
    got["boxes"] += 0.01
    rep = match_detections(ref, got)
    assert rep.ok and rep.matched == 10 and rep.max_box_diff == pytest.approx(0.01, abs=1e-5)


def test_match_detections_flags_what_differs():
    ref = _dets()
    moved = {k: v.copy() for k, v in ref.items()}
    moved["boxes"][3, 0] += 0.5
    rep = match_detections(ref, moved, max_unmatched=0)
    assert not rep.ok and rep.matched == 9 and "eager #3" in str(rep) and "|d box| 5.00e-01" in str(rep)
    relabelled = {k: v.copy() for k, v in ref.items()}
    relabelled["classes"][0] = (relabelled["classes"][0] + 1) % 3
    assert not match_detections(ref, relabelled, max_unmatched=0).ok
    missing = {k: v[1:] for k, v in ref.items()}  # the best detection lost: not a near-tie
    assert not match_detections(ref, missing, max_unmatched=0).ok
    rescored = {k: v.copy() for k, v in ref.items()}
    rescored["scores"][5] += 0.01
    assert not match_detections(ref, rescored, max_unmatched=0).ok
    assert match_detections(ref, rescored, max_unmatched=0.1).ok  # 1 of 10 differing as a whole: accepted
    masks = np.zeros((10, 50, 50), np.uint8)
    masks[:, 10:40, 10:40] = 1
    other = masks.copy()
    other[2, 10:20, 10:40] = 0
    assert not match_detections(dict(ref, masks=masks), dict(ref, masks=other), max_unmatched=0).ok
    other[2] = masks[2]
    other[2, 10, 10:13] = 0  # 3 boundary pixels
    assert match_detections(dict(ref, masks=masks), dict(ref, masks=other)).ok


def test_match_detections_allows_only_near_ties_at_the_cut():
    ref = _dets()
    cut = {k: v[:-1] for k, v in ref.items()}  # the lowest one (0.5) not reached the file's top-9
    assert not match_detections(ref, cut, max_dets=100, max_unmatched=0).ok  # 9 < max_dets: the cut is the threshold 0
    assert match_detections(ref, cut, score_thresh=0.5).ok  # at the threshold: may fall either side
    assert match_detections(ref, cut, max_dets=9, score_tol=0.05).ok  # within tol of the other's last score


class RetinaNet(nn.Module):
    """A stand-in that passes DetectorExport's meta-architecture check (the resize test runs no model)."""


def test_unsupported_meta_architecture_is_refused():
    with pytest.raises(ValueError, match=r"supports the meta-architectures GeneralizedRCNN, PanopticFPN, "
                                         r"RetinaNet, FCOS .*got Linear"):
        DetectorExport(nn.Linear(2, 2), min_size=0, max_size=0)


@pytest.mark.parametrize("flag", [["--static"], ["--bottom-up"], ["--export-method", "scripting"],
                                  ["--onnx-exporter", "dynamo"]])
def test_whole_model_refuses_backbone_only_flags(flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--whole-model", "--config-file", os.path.join(CONFIG_DIR, CASES["faster_rcnn-R-18"][0])] + flag)
    assert e.value.code == 2
    assert f"{' '.join(flag)} cannot be used with --whole-model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- models (slow)
@pytest.mark.slow
def test_eager_wrapper_equals_detectron2_postprocess(pictures):
    """Given the same resized image, DetectorExport returns what detectron2's model(...) returns."""
    wrapper = _wrapper("mask_rcnn-R-18", pictures)
    for p in pictures:
        x = wrapper.preprocess(p)
        with torch.no_grad():
            ours = dict(zip(wrapper.names, wrapper(p)))
            d2 = wrapper.model([{"image": x, "height": p.shape[0], "width": p.shape[1]}])[0]["instances"]
        assert len(d2) >= 5
        torch.testing.assert_close(ours["boxes"], d2.pred_boxes.tensor, atol=1e-4, rtol=0)
        assert torch.equal(ours["scores"], d2.scores) and torch.equal(ours["classes"], d2.pred_classes)
        differ = (ours["masks"].bool() ^ d2.pred_masks).sum()
        assert differ <= 4 * len(d2), differ  # pixels at the 0.5 threshold within float error


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_onnx_runs_without_detectron2_and_matches_eager(name, pictures, tmp_path):
    wrapper = _wrapper(name, pictures)
    assert wrapper.names == OUTPUTS[name.split("-")[0]]
    path = str(tmp_path / "model.onnx")
    assert export_detector_onnx(wrapper, pictures[0], path) == wrapper.names
    info, got = run_onnx_without_detectron2(path, pictures, tmp_path)
    assert info["inputs"] == [["image", "tensor(uint8)", ["height", "width", 3]]]
    ref = _eager(wrapper, pictures)
    for r, g, p in zip(ref, got, pictures):
        if "masks" in g:
            assert g["masks"].dtype == np.uint8 and g["masks"].shape[1:] == tuple(p.shape[:2])
        if "sem_seg" in g:
            assert g["sem_seg"].shape == tuple(p.shape[:2])
        assert g["boxes"].dtype == np.float32 and g["classes"].dtype == np.int64
        assert (g["boxes"][:, 2] <= p.shape[1]).all() and (g["boxes"][:, 3] <= p.shape[0]).all()
    _assert_match(ref, got, wrapper)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mask_rcnn-GhostNet-0.5", "cascade_mask_rcnn-V-19-slim", "retinanet-GhostNet-0.5",
                                  "panoptic_fpn-GhostNet-1.0", "fcos-R-18-python-config"])
def test_torchscript_equals_eager(name, pictures, tmp_path):
    wrapper = _wrapper(name, pictures)
    path = str(tmp_path / "model.ts")
    export_detector_torchscript(wrapper, pictures[0], path)
    _assert_match(_eager(wrapper, pictures), [runner("torchscript", path, wrapper.names)(p) for p in pictures],
                  wrapper, exact=True)


@pytest.mark.slow
def test_export_whole_model_entry_point(tmp_path):
    """python -m d2_backbones.export --whole-model in a fresh process: exports, checks on two pictures."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "d2_backbones.export", "--whole-model", "--format", "onnx",
           "--config-file", os.path.join(CONFIG_DIR, "GhostNet/mask_rcnn_ghostnet_050_FPN_1x.yaml"),
           "--output", str(tmp_path / "out")] + SIZE
    res = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Exported the whole detector (boxes, scores, classes, masks) to" in res.stdout, res.stdout
    assert res.stdout.count("detections matched") == 2, res.stdout
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.onnx"]  # no temporary file left


@pytest.mark.slow
def test_export_whole_model_fails_when_outputs_differ(tmp_path, capsys):
    """The check is real: with a negative box tolerance no detection can match, and the tool exits 1."""
    with pytest.raises(SystemExit) as e:
        main(["--whole-model", "--format", "torchscript", "--box-tolerance", "-1", "--max-unmatched", "0.5",
              "--config-file", os.path.join(CONFIG_DIR, "ResNet/fcos_R_50_FPN_1x.py"), "--output", str(tmp_path)]
             + LAZY_SIZE + ["model.backbone.bottom_up.depth=18", "model.test_score_thresh=0.0"])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert "FAILED: the exported file's detections differ" in captured.err
    assert "unmatched (accepted: 50%): eager #" in captured.out


@pytest.mark.parametrize("hw", [(100, 128), (128, 96), (37, 53)])
def test_resize_equals_interpolate(hw):
    wrapper = DetectorExport(RetinaNet(), min_size=192, max_size=256)
    image = torch.randint(0, 256, (*hw, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = image.permute(2, 0, 1).float()[None]
    size = DetectorExport.target_size(wrapper, torch.tensor(hw, dtype=torch.float64)).tolist()
    torch.testing.assert_close(wrapper.preprocess(image)[None], F.interpolate(x, size=size, mode="bilinear",
                                                                              align_corners=False), atol=2e-3, rtol=0)  # of 255
