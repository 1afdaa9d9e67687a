"""yaml configs run no code: a Python tag (``!!python/object/apply:os.system [...]``) is refused naming the file, the
line and the tag, in the file itself and through ``_BASE_``, in process and through train_net, lazy_train and export;
``--unsafe-yaml`` / ``d2_backbones.allow_unsafe_yaml()`` load a trusted file. Plain yaml (every shipped config and
detectron2's own) still loads.

Each payload would create a marker file: the tests check that it does not exist after a refusal.
"""
import glob
import os
import subprocess
import sys

import pytest

import d2_backbones
from d2_backbones import UnsafeYamlError, allow_unsafe_yaml

from conftest import CONFIG_DIR, REPO

QUICK = os.path.join(CONFIG_DIR, "quickstart", "faster_rcnn_R_18_FPN_shapes.yaml")


def _evil(tmp_path, name="evil.yaml", base=None, key="SOLVER.MAX_ITER"):
    """A yaml whose ``key`` is ``!!python/object/apply:os.system ["touch MARKER"]`` (os.system returns 0, an int,
    so a trusting load merges it); returns (path, marker, line of the tag)."""
    marker = tmp_path / f"{name}.ran"
    section, leaf = key.split(".")
    lines = ([f"_BASE_: {base!r}"] if base else []) + [
        f"{section}:", f"  {leaf}: !!python/object/apply:os.system [\"touch {marker}\"]"]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path), marker, len(lines)


def test_python_tag_is_refused_and_does_not_run(tmp_path):
    path, marker, line = _evil(tmp_path)
    cfg = d2_backbones.get_cfg()
    with pytest.raises(UnsafeYamlError) as e:
        cfg.merge_from_file(path)  # detectron2's default is allow_unsafe=True
    assert not marker.exists()
    msg = str(e.value)
    assert f"Config file {path}, line {line}, column " in msg, msg
    assert "refused the tag !!python/object/apply:os.system" in msg and "--unsafe-yaml" in msg, msg
    assert "d2_backbones.allow_unsafe_yaml()" in msg, msg
    with pytest.raises(UnsafeYamlError):  # an explicit allow_unsafe=True is no consent either (it is the default)
        cfg.merge_from_file(path, allow_unsafe=True)
    assert not marker.exists()


def test_python_tag_in_a_base_file_is_refused_naming_both_files(tmp_path):
    base, marker, line = _evil(tmp_path, "base.yaml")
    mid = tmp_path / "mid.yaml"
    mid.write_text("_BASE_: base.yaml\nSOLVER:\n  BASE_LR: 0.01\n")
    top = tmp_path / "top.yaml"
    top.write_text("_BASE_: mid.yaml\nSOLVER:\n  IMS_PER_BATCH: 2\n")
    with pytest.raises(UnsafeYamlError) as e:
        d2_backbones.get_cfg().merge_from_file(str(top))
    assert not marker.exists()
    msg = str(e.value)
    assert msg.startswith(f"Config file {base}, line {line}, column ") and f"(a _BASE_ of {mid})" in msg, msg


def test_allow_unsafe_yaml_loads_a_trusted_file(tmp_path):
    path, marker, _ = _evil(tmp_path)
    cfg = d2_backbones.get_cfg()
    with allow_unsafe_yaml():
        cfg.merge_from_file(path)
    assert marker.exists() and cfg.SOLVER.MAX_ITER == 0
    with allow_unsafe_yaml(False):  # the flag passed through: refused again
        with pytest.raises(UnsafeYamlError):
            d2_backbones.get_cfg().merge_from_file(path)


def test_lazy_yaml_is_read_safely(tmp_path):
    from d2_backbones.yaml_safety import load_lazy_config

    path, marker, line = _evil(tmp_path, key="train.max_iter")
    with pytest.raises(UnsafeYamlError, match=rf"Config file {path}, line {line}, column .*!!python/object/apply"):
        load_lazy_config(path)
    assert not marker.exists()
    assert load_lazy_config(path, unsafe=True).train.max_iter == 0 and marker.exists()


def test_unknown_tag_names_the_tag_and_the_fix(tmp_path):
    path = tmp_path / "tag.yaml"
    path.write_text("MODEL:\n  DEVICE: !cuda cpu\n")
    with pytest.raises(UnsafeYamlError, match=rf"{path}, line 2, column 11: refused the tag !cuda .*write the value "
                                              r"without the tag"):
        d2_backbones.get_cfg().merge_from_file(str(path))


def test_every_shipped_and_detectron2_config_still_loads():
    """Plain yaml loads unchanged; detectron2's own files (its Base-RetinaNet.yaml computes anchors with
    !!python/object/apply:eval) are part of the installed detectron2 and load as before."""
    import detectron2

    d2_dir = os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs")
    ours = glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
    theirs = glob.glob(os.path.join(d2_dir, "**", "*.yaml"), recursive=True)
    assert len(ours) > 40 and len(theirs) > 40
    from detectron2.config import CfgNode

    for path in ours + theirs:  # what merge_from_file reads (the merges themselves: test_configs.py)
        assert isinstance(CfgNode.load_yaml_with_base(path), dict), path
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_file(os.path.join(d2_dir, "COCO-Detection", "retinanet_R_50_FPN_1x.yaml"))
    assert len(cfg.MODEL.ANCHOR_GENERATOR.SIZES) == 5


# ------------------------------------------------------------------------------------------ command lines
def _run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def _assert_refused(p, path, marker):
    assert p.returncode != 0, (p.stdout + p.stderr)[-3000:]
    assert not marker.exists()
    last = p.stderr.strip().splitlines()[-1]
    assert "UnsafeYamlError" in last and path in last and "!!python/object/apply:os.system" in last, last
    assert "--unsafe-yaml" in last, last


@pytest.mark.slow
def test_train_net_refuses_a_python_tag_and_loads_it_with_unsafe_yaml(tmp_path):
    path, marker, _ = _evil(tmp_path, base=QUICK)
    common = ["--config-file", path]
    opts = ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "out")]
    _assert_refused(_run([os.path.join(REPO, "train_net.py")] + common + opts), path, marker)
    # trusted: the file loads (the payload ran); --num-classes bogus then stops setup right after the merge
    p = _run([os.path.join(REPO, "train_net.py")] + common + ["--unsafe-yaml", "--num-classes", "bogus"] + opts)
    assert marker.exists(), p.stderr[-3000:]
    assert "UnsafeYamlError" not in p.stderr and "--num-classes='bogus'" in p.stderr, p.stderr[-3000:]


@pytest.mark.slow
def test_train_net_refuses_a_python_tag_in_a_base_file(tmp_path):
    base, marker, _ = _evil(tmp_path, "base.yaml", base=QUICK)
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: base.yaml\nSOLVER:\n  BASE_LR: 0.01\n")
    p = _run(["-m", "d2_backbones.train_net", "--config-file", str(child), "MODEL.DEVICE", "cpu",
              "OUTPUT_DIR", str(tmp_path / "out")])
    _assert_refused(p, base, marker)
    assert f"(a _BASE_ of {child})" in p.stderr


@pytest.mark.slow
def test_lazy_train_refuses_a_python_tag_and_loads_it_with_unsafe_yaml(tmp_path):
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "ResNet", "retinanet_R_50_FPN_1x.py"))
    saved = str(tmp_path / "saved.yaml")
    LazyConfig.save(cfg, saved)  # a LazyConfig yaml as detectron2 writes it (config.yaml of a run)
    marker = tmp_path / "lazy.ran"
    path = str(tmp_path / "evil.yaml")
    with open(saved) as f, open(path, "w") as g:
        g.write(f.read() + f"evil: !!python/object/apply:os.system [\"touch {marker}\"]\n")
    args = ["-m", "d2_backbones.lazy_train", "--config-file", path]
    opts = ["train.device=cpu", f"train.output_dir={tmp_path / 'out'}"]
    _assert_refused(_run(args + opts), path, marker)
    p = _run(args + ["--unsafe-yaml", "--num-classes", "bogus"] + opts)
    assert marker.exists(), p.stderr[-3000:]
    assert "UnsafeYamlError" not in p.stderr and "--num-classes='bogus'" in p.stderr, p.stderr[-3000:]


@pytest.mark.slow
def test_export_refuses_a_python_tag(tmp_path):
    path, marker, _ = _evil(tmp_path, base=os.path.join(CONFIG_DIR, "ResNet", "faster_rcnn_R_18_FPN_1x.yaml"))
    p = _run(["-m", "d2_backbones.export", "--config-file", path, "--output", str(tmp_path / "export")])
    _assert_refused(p, path, marker)
