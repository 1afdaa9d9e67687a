"""Every yaml in configs/ merges, builds the full detectron2 model on CPU and runs one inference."""
import os

import pytest
import yaml

from conftest import CONFIG_DIR, all_yaml_configs, build_and_infer, leaf_configs

LEAVES = leaf_configs()


def test_there_are_configs_for_every_family():
    dirs = {os.path.relpath(p, CONFIG_DIR).split(os.sep)[0] for p in LEAVES}
    assert "ResNet" in dirs


@pytest.mark.parametrize("path", all_yaml_configs(), ids=lambda p: os.path.relpath(p, CONFIG_DIR))
def test_yaml_is_versioned_and_self_contained(path):
    with open(path) as f:
        data = yaml.safe_load(f)  # safe: no python tags in our configs
    assert data.get("VERSION") == 2, path
    base = data.get("_BASE_")
    if base:
        target = os.path.normpath(os.path.join(os.path.dirname(path), base))
        assert target.startswith(CONFIG_DIR) and os.path.isfile(target), base


@pytest.mark.slow
@pytest.mark.parametrize("path", LEAVES, ids=lambda p: os.path.relpath(p, CONFIG_DIR))
def test_config_builds_and_runs_inference_on_cpu(path):
    cfg, model, out = build_and_infer(path, size=(96, 128), opts=["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128])
    assert "instances" in out
    inst = out["instances"]
    assert inst.image_size == (96, 128)
    if cfg.MODEL.MASK_ON:
        assert inst.has("pred_masks")
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 1_000_000
