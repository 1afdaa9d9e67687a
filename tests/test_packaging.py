"""Packaging and first contact: configs shipped in wheel and sdist, get_config_file, python -m d2_backbones.train_net,
the one-command set-up script and .ci/run."""
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import d2_backbones
from d2_backbones import ConfigError

from conftest import CONFIG_DIR, REPO

SETUP_SH = os.path.join(REPO, "scripts", "setup.sh")
# one config of each family, small ones (build time)
FAMILY_CONFIGS = ["ResNet/faster_rcnn_R_18_FPN_1x.yaml", "VoVNet/faster_rcnn_V_19_slim_dw_eSE_FPNLite_3x.yaml",
                  "GhostNet/retinanet_ghostnet_050_FPN_1x.yaml"]


# ------------------------------------------------------------------------------------------ get_config_file
def _configs_on_disk():
    """yaml and LazyConfig .py files under configs/, as names relative to it."""
    return sorted(os.path.relpath(p, CONFIG_DIR).replace(os.sep, "/") for ext in ("yaml", "py")
                  for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*." + ext), recursive=True))


def test_get_config_file_finds_every_config_and_its_base_chain():
    on_disk = _configs_on_disk()
    assert d2_backbones.model_zoo.list_config_files() == on_disk
    for name in on_disk:
        assert d2_backbones.get_config_file(name) == os.path.join(CONFIG_DIR, *name.split("/"))
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_file(d2_backbones.get_config_file("VoVNet/faster_rcnn_V_39_eSE_FPN_3x.yaml"))
    assert cfg.MODEL.VOVNET.CONV_BODY == "V-39-eSE"  # the leaf
    assert cfg.MODEL.BACKBONE.NAME == "build_d2b_vovnet_fpn_backbone"  # Base-VoVNet-FPN.yaml
    assert cfg.MODEL.RPN.IN_FEATURES == ["p2", "p3", "p4", "p5", "p6"]  # ../Base-RCNN-FPN.yaml
    # paths as the README writes them
    assert d2_backbones.get_config_file("configs/ResNet/faster_rcnn_R_50_FPN_1x.yaml") == \
        os.path.join(CONFIG_DIR, "ResNet", "faster_rcnn_R_50_FPN_1x.yaml")


def test_unknown_config_name_lists_the_closest_names():
    with pytest.raises(ConfigError) as e:
        d2_backbones.get_config_file("VoVNet/faster_rcnn_V_39_eSE_FPN_1x.yaml")
    msg = str(e.value)
    assert "No config 'VoVNet/faster_rcnn_V_39_eSE_FPN_1x.yaml'" in msg
    assert msg.split("Closest: ")[1].startswith("VoVNet/faster_rcnn_V_39_eSE_FPN_3x.yaml, "), msg
    with pytest.raises(ConfigError, match=r"Closest: ResNet/mask_rcnn_R_50_FPN_1x.yaml"):
        d2_backbones.get_config_file("ResNet/mask_rcnn_R50_FPN_1x.yaml")
    with pytest.raises(ConfigError):  # only shipped files, nothing outside configs/
        d2_backbones.get_config_file("../setup.py")


# ------------------------------------------------------------------------------------------ train_net module
@pytest.mark.slow
def test_train_net_module_help_from_another_directory(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)  # this checkout, run from elsewhere
    p = subprocess.run([sys.executable, "-m", "d2_backbones.train_net", "--help"], capture_output=True, text=True,
                       cwd=str(tmp_path), env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for flag in ("--config-file", "--register-coco", "--skip-image-check", "--num-classes", "--num-gpus"):
        assert flag in p.stdout, flag


def test_gitignore_covers_build_outputs():
    p = subprocess.run(["git", "check-ignore", "build/lib/x.py", "dist/d2_backbones-0.1.0.tar.gz",
                        "d2_backbones-0.1.0-py3-none-any.whl"], capture_output=True, text=True, cwd=REPO)
    assert p.stdout.split() == ["build/lib/x.py", "dist/d2_backbones-0.1.0.tar.gz",
                                "d2_backbones-0.1.0-py3-none-any.whl"], p.stdout + p.stderr


# ------------------------------------------------------------------------------------------ set-up script
def _hide_detectron2(tmp_path):
    """A PYTHONPATH folder whose ``detectron2`` fails to import: a machine without detectron2."""
    shadow = tmp_path / "shadow" / "detectron2"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('detectron2 hidden by the test')\n")
    return str(tmp_path / "shadow")


def _script_env(tmp_path, **extra):
    """The environment for scripts/setup.sh and .ci/run: ``PYTHON`` is the interpreter running the suite, and a
    ``python3`` that is not it comes first on PATH (the suite started as ``venv/bin/python -m pytest`` without
    activating the venv): the scripts must inspect the interpreter they are given, not the first one on PATH."""
    other = tmp_path / "other_python"
    other.mkdir(exist_ok=True)
    shim = other / "python3"
    shim.write_text("#!/bin/sh\necho 'not the interpreter of the test suite' >&2\nexit 3\n")
    shim.chmod(0o755)
    return dict(os.environ, PYTHON=sys.executable, PATH=f"{other}{os.pathsep}{os.environ.get('PATH', '')}", **extra)


@pytest.mark.slow
def test_setup_script_keeps_a_working_installation(tmp_path):
    p = subprocess.run(["bash", SETUP_SH, "--check"], capture_output=True, text=True, cwd=str(tmp_path), timeout=600,
                       env=_script_env(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "1/3 torch: kept torch" in out and "2/3 detectron2: kept 0.6" in out, out
    assert "3/3 d2_backbones: kept d2_backbones" in out and "from this checkout, with the [test] extras" in out, out
    assert "would run" not in out


@pytest.mark.slow
def test_setup_script_fails_clearly_when_detectron2_cannot_be_installed(tmp_path):
    empty_source = tmp_path / "not_detectron2"
    empty_source.mkdir()
    env = _script_env(tmp_path, PYTHONPATH=_hide_detectron2(tmp_path))
    p = subprocess.run(["bash", SETUP_SH, str(empty_source)], capture_output=True, text=True, cwd=str(tmp_path),
                       env=env, timeout=600)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1/3 torch: kept" in p.stdout
    assert f"2/3 detectron2: not importable; building it from {empty_source}" in p.stdout
    assert (f"[setup] ERROR: detectron2 is not importable (import detectron2, detectron2._C failed) after trying to "
            f"install it from {empty_source}.") in p.stderr
    assert "3/3" not in p.stdout  # stopped there


@pytest.mark.slow
def test_ci_run_sets_up_with_the_script_and_stops_without_detectron2(tmp_path):
    empty_source = tmp_path / "not_detectron2"
    empty_source.mkdir()
    env = _script_env(tmp_path, PYTHONPATH=_hide_detectron2(tmp_path))
    p = subprocess.run(["bash", os.path.join(REPO, ".ci", "run"), str(empty_source)], capture_output=True, text=True,
                       cwd=str(tmp_path), env=env, timeout=600)
    assert p.returncode != 0
    assert f"2/3 detectron2: not importable; building it from {empty_source}" in p.stdout
    assert "ERROR: the set-up failed" in p.stderr and "== tests" not in p.stdout


# ------------------------------------------------------------------------------------------ wheel + sdist
def _copy_checkout(dst):
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "datasets", "output", ".benchmarks", ".pytest_cache"))


@pytest.mark.slow
def test_wheel_and_sdist_ship_the_configs_and_work_outside_the_checkout(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info into the source folder
    _copy_checkout(src)
    (src / "configs" / "LazyProbe").mkdir()
    (src / "configs" / "LazyProbe" / "probe_lazy.py").write_text("value = 1  # stands for a LazyConfig file\n")
    shipped = _configs_on_disk() + ["LazyProbe/probe_lazy.py"]  # the probe: .py ship even in a new folder

    run = dict(capture_output=True, text=True, timeout=900)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "wheels"), "."], cwd=str(src), **run)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    wheel, = glob.glob(str(tmp_path / "wheels" / "d2_backbones-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in shipped if f"d2_backbones/configs/{n}" not in names]
    assert not missing, missing
    assert not [n for n in names if n.startswith(("configs/", "tests/"))]

    p = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "sdist")], cwd=str(src), **run)
    assert p.returncode == 0, p.stderr[-3000:]
    sdist, = glob.glob(str(tmp_path / "sdist" / "d2_backbones-*.tar.gz"))
    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    missing = [n for n in shipped if f"configs/{n}" not in members]
    assert not missing, missing

    target = tmp_path / "target"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), wheel], **run)
    assert p.returncode == 0, p.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="2")  # the installed wheel, not the checkout
    script = f"""
import os, sys, torch
import d2_backbones
from detectron2.modeling import build_model
target = {str(target)!r}
assert d2_backbones.__file__.startswith(target), d2_backbones.__file__
for name in {FAMILY_CONFIGS!r}:
    path = d2_backbones.get_config_file(name)
    assert path == os.path.join(target, "d2_backbones", "configs", *name.split("/")), path
    cfg = d2_backbones.get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{{"image": torch.randint(0, 255, (3, 128, 160)).float(), "height": 128, "width": 160}}])
    print("built", name, cfg.MODEL.BACKBONE.NAME, type(out[0]["instances"]).__name__, out[0]["instances"].image_size)
print("lazy", d2_backbones.get_config_file("LazyProbe/probe_lazy.py"))
from detectron2.config import LazyConfig  # a Python config and the common.py it imports, from the wheel
lazy = LazyConfig.load(d2_backbones.get_config_file("VoVNet/retinanet_V_39_eSE_FPN_3x.py"))
print("lazy bottom_up", lazy.model.backbone.bottom_up.spec, list(lazy.model.backbone.bottom_up.out_features))
try:
    d2_backbones.get_config_file("VoVNet/faster_rcnn_V_39_eSE_FPN_1x.yaml")
except d2_backbones.ConfigError as e:
    print("unknown:", e)
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=str(elsewhere), env=env, **run)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    out = p.stdout
    for name, builder in zip(FAMILY_CONFIGS, ["resnet", "vovnet", "ghostnet"]):
        assert f"built {name} build_d2b_{builder}_fpn_backbone Instances (128, 160)" in out, out
    assert f"lazy {target}" in out
    assert "lazy bottom_up V-39-eSE ['stage3', 'stage4', 'stage5']" in out, out
    assert "unknown: No config" in out and "Closest: VoVNet/faster_rcnn_V_39_eSE_FPN_3x.yaml" in out

    p = subprocess.run([sys.executable, "-m", "d2_backbones.train_net", "--help"], cwd=str(elsewhere), env=env, **run)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "--register-coco" in p.stdout and "--skip-image-check" in p.stdout
