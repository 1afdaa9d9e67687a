"""The weights layer's parts, one by one: safe reading, atomic files, checks, the checkpointer's saving rules.

End-to-end behaviour through train_net, the predictors, the converter and export is in
``test_weights_e2e.py``.
"""
import errno
import os
import pickle
import re
import shlex
import stat
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import d2_backbones
from d2_backbones.weights import (AtomicFile, AtomicPathManager, Checkpointer, CheckpointReadError,
                                  CheckpointWriteError, NonFiniteCheckpointError, PeriodicCheckpointer,
                                  UnsafeCheckpointError, WeightsMismatchError, check_weights_metadata, load_file,
                                  load_summary, overrides_string, remove_stale_temporaries)
from d2_backbones.weights.cli import config_yaml


# ---------------------------------------------------------------------------------------------- reading
def _pickle(obj, path, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_detectron_pkl_of_numpy_arrays_loads_and_equals(tmp_path, protocol):
    """A detectron2/Detectron model-zoo .pkl (numpy arrays in plain dicts) reads back equal, any protocol."""
    blobs = {"conv1_w": np.random.rand(4, 3, 7, 7).astype(np.float32), "res2_0_branch2a_b": np.arange(5.0),
             "lr": np.float32(0.1), "iters": 7}
    data = load_file(_pickle({"blobs": blobs, "__author__": "Detectron"}, tmp_path / "R-50.pkl", protocol))
    assert data["__author__"] == "Detectron" and set(data["blobs"]) == set(blobs)
    for k, v in blobs.items():
        np.testing.assert_array_equal(data["blobs"][k], v)


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("fn,args,name", [
    (os.system, ("touch {marker}",), r"'(posix|os)\.system'"),
    (subprocess.call, (["touch", "{marker}"],), r"'(subprocess|commands)\.call'"),  # pickle's py2 name mapping
    (eval, ("open('{marker}', 'w')",), r"'(builtins|__builtin__)\.eval'"),
    (torch.load, ("{marker}",), r"'torch(\.serialization)?\.load'"),
])
def test_code_running_pkl_is_refused_without_running(tmp_path, fn, args, name):
    """os.system / subprocess / eval / torch globals in a .pkl are refused, naming the file and the global."""
    marker = tmp_path / "ran"
    args = tuple([a.format(marker=marker) for a in x] if isinstance(x, list) else x.format(marker=marker)
                 for x in args)
    path = _pickle({"model": {"w": np.zeros(2)}, "x": _Reduce(fn, args)}, tmp_path / "evil.pkl")
    with pytest.raises(UnsafeCheckpointError) as e:
        load_file(path)
    assert path in str(e.value) and re.search(name, str(e.value)) and "Nothing from the file was executed" in str(e.value)
    assert not marker.exists()
    if fn is os.system:  # the payload is live: plain pickle (what detectron2 uses for .pkl) runs it
        with open(path, "rb") as f:
            pickle.load(f)
        assert marker.exists()


def test_pth_payload_refused_and_broken_files_named(tmp_path):
    """.pth goes through weights_only; truncated files and missing files get a clear error naming them."""
    marker = tmp_path / "ran"
    evil = str(tmp_path / "evil.pth")
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Reduce(os.system, (f"touch {marker}",))}, evil)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth: refused"):
        load_file(evil)
    assert not marker.exists()
    good = str(tmp_path / "good.pth")
    torch.save({"model": {"w": torch.ones(3)}}, good)
    cut = str(tmp_path / "cut.pth")
    with open(good, "rb") as f, open(cut, "wb") as g:
        g.write(f.read()[:100])
    with pytest.raises(CheckpointReadError, match="cut.pth: not a readable PyTorch checkpoint"):
        load_file(cut)
    with pytest.raises(CheckpointReadError, match="nope.pth: no such file"):
        load_file(str(tmp_path / "nope.pth"))
    # a torch.save archive named .pkl is read as what it is
    zipped = str(tmp_path / "zip.pkl")
    torch.save({"model": {"w": torch.ones(3)}}, zipped)
    assert torch.equal(load_file(zipped)["model"]["w"], torch.ones(3))


# ---------------------------------------------------------------------------------------------- writing
def test_atomic_file_permissions_and_failure_keep_old_content(tmp_path):
    """Files get 0666 minus the umask; a failed write leaves the old file and no temporary."""
    path = str(tmp_path / "model_final.pth")
    old = os.umask(0o022)
    try:
        with AtomicFile(path, "wb") as f:
            f.write(b"old")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    with pytest.raises(RuntimeError):
        with AtomicFile(path, "wb") as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["model_final.pth"]


def test_enospc_is_recorded_and_stale_temporaries_removed(tmp_path, monkeypatch):
    """A full disk is remembered on the path manager; only this package's temporaries are cleaned up."""
    from detectron2.utils.file_io import PathManager

    pm = AtomicPathManager(PathManager)
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    f = pm.open(str(tmp_path / "model_0000009.pth"), "wb")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        f.write(b"x" * 10)
    monkeypatch.setattr(os, "write", real_write)
    assert pm.last_enospc == str(tmp_path / "model_0000009.pth")
    f.discard()
    names = ["model_final.pth.d2b-0a1b2c3d.tmp", "last_checkpoint.d2b-ffffffff.tmp", "model_0000005.pth.ab12CD_9.tmp",
             "notes.tmp", "model_final.pth", "data.d2b-zz.tmp"]
    for n in names:
        (tmp_path / n).write_bytes(b"123")
    removed = remove_stale_temporaries(str(tmp_path))
    assert sorted(removed) == sorted(names[:3])
    assert sorted(os.listdir(tmp_path)) == sorted(names[3:])
    # reads and remote paths go to the wrapped manager
    assert pm.open(str(tmp_path / "notes.tmp"), "rb").read() == b"123"


# ---------------------------------------------------------------------------------------------- checkpointer
def _tiny(tmp_path, **kw):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    return model, Checkpointer(model, str(tmp_path), **kw)


def test_non_finite_model_is_not_saved_and_tag_keeps_last_finite(tmp_path):
    """save() refuses NaN/Inf state; last_checkpoint still names the last finite file."""
    model, cp = _tiny(tmp_path)
    cp.save("model_0000001")
    with torch.no_grad():
        model[1].running_var[0] = float("inf")
    with pytest.raises(NonFiniteCheckpointError, match=r"1 tensor\(s\) with NaN/Inf values \(1.running_var\); "
                                                       r"model_0000002.pth was not written.*model_0000001.pth"):
        cp.save("model_0000002")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert open(tmp_path / "last_checkpoint").read() == "model_0000001.pth"
    # our own checkpoints read back with weights_only
    assert "model" in load_file(str(tmp_path / "model_0000001.pth"))


def test_full_disk_message_names_file_size_and_last_checkpoint(tmp_path, monkeypatch):
    """ENOSPC during save ends with 'No space left on device while writing <file> (<size> MB); the last ...'."""
    model, cp = _tiny(tmp_path)
    cp.save("model_0000001")
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(CheckpointWriteError) as e:
        cp.save("model_0000002")
    monkeypatch.setattr(os, "write", real_write)
    msg = str(e.value)
    assert msg.startswith(f"No space left on device while writing {tmp_path / 'model_0000002.pth'} (0.0 MB); "
                          f"the last complete checkpoint is {tmp_path / 'model_0000001.pth'}"), msg
    assert e.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


def test_max_to_keep_counts_files_on_disk(tmp_path):
    """A fresh PeriodicCheckpointer (as after a resume) still prunes the older runs' periodic files."""
    model, cp = _tiny(tmp_path)
    for it in (0, 1, 2):  # an earlier run left three
        cp.save(f"model_{it:07d}")
    cp.save("model_final")
    p = PeriodicCheckpointer(cp, period=1, max_iter=100, max_to_keep=2)
    p.step(3)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000002.pth", "model_0000003.pth",
                                            "model_final.pth"]


def test_load_summary_counts_parameters_and_buffers_apart(tmp_path):
    """An empty checkpoint loads 0 of everything (num_batches_tracked is not counted)."""
    keys = ["backbone.bottom_up.conv.weight", "backbone.bottom_up.bn.weight", "backbone.bottom_up.bn.running_mean",
            "backbone.bottom_up.bn.num_batches_tracked", "pixel_mean"]
    params = {"backbone.bottom_up.conv.weight", "backbone.bottom_up.bn.weight"}
    assert load_summary(keys, params, not_loaded=set(keys)) == \
        "backbone.bottom_up: 0/2 parameters, 0/1 buffers (initialised)"
    assert load_summary(keys, params, not_loaded=set()) == "backbone.bottom_up: 2/2 parameters, 1/1 buffers loaded"


# ---------------------------------------------------------------------------------------------- metadata
def _meta(**config):
    return {"d2_backbones": {"family": "ghostnet", "arch": "ghostnet width 1", "source_format": "ghostnet",
                             "config": config, "partial": False}}


def test_architecture_mismatch_is_an_error_preprocessing_a_warning(caplog):
    """WIDTH differs -> error naming both values and the override; FORMAT differs -> warning; 'warn' opts out."""
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_d2b_ghostnet_fpn_backbone", "MODEL.GHOSTNET.WIDTH", 1.3])
    meta = _meta(**{"MODEL.GHOSTNET.WIDTH": 1.0, "INPUT.FORMAT": "RGB"})
    with pytest.raises(WeightsMismatchError) as e:
        check_weights_metadata(cfg, meta)
    assert "MODEL.GHOSTNET.WIDTH: the weights need 1.0, the config has 1.3" in str(e.value)
    assert "Fix: add these overrides: MODEL.GHOSTNET.WIDTH 1.0" in str(e.value)
    assert "INPUT.FORMAT" not in str(e.value)
    cfg.merge_from_list(["MODEL.GHOSTNET.WIDTH", 1.0])
    assert check_weights_metadata(cfg, meta) == [("INPUT.FORMAT", "RGB", "BGR")]
    cfg.merge_from_list(["MODEL.GHOSTNET.WIDTH", 0.5, "MODEL.WEIGHTS_CHECK", "warn"])
    check_weights_metadata(cfg, meta)  # no raise
    # weights of another family
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_d2b_vovnet_fpn_backbone", "MODEL.WEIGHTS_CHECK", "error"])
    with pytest.raises(WeightsMismatchError, match="hold a ghostnet backbone .* builds a vovnet backbone"):
        check_weights_metadata(cfg, meta)


def test_override_string_and_yaml_round_trip_through_yacs(tmp_path):
    """The printed overrides survive the shell and yacs; the .yaml merges into a config."""
    config = {"MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.STRIDE_IN_1X1": False, "INPUT.FORMAT": "RGB",
              "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53], "MODEL.VOVNET.CONV_BODY": "V-39-eSE",
              "MODEL.VOVNET.ESE_PLACEMENT": "last", "MODEL.FPN.IN_FEATURES": ["res3", "res4", "res5"],
              "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, True, True, True]}
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_list(shlex.split(overrides_string(config)))
    path = tmp_path / "w.yaml"
    path.write_text(config_yaml(config, "src.pth"))
    cfg2 = d2_backbones.get_cfg()
    cfg2.merge_from_file(str(path))
    for c in (cfg, cfg2):
        for k, v in config.items():
            node = c
            for part in k.split("."):
                node = node[part]
            assert node == v and type(node) is type(v) or isinstance(node, (list, tuple)) and list(node) == v, (k, node)
