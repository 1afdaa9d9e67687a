"""d2_backbones: ResNet (MMDetection options), VoVNetV2-eSE and GhostNet backbones for detectron2.

detectron2 itself is a prerequisite that pip cannot install from PyPI (it is not published
there); install it first, see README.md (scripts/setup.sh installs torch, detectron2 and this
package in one command).
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "d2_backbones", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _config_packages():
    """configs/ stays at the top of the checkout (as detectron2's model zoo) and ships inside the
    package as d2_backbones/configs: package_dir maps the folder at build time, so git holds one copy.
    Every folder is listed as a package (no setuptools warnings about unlisted folders); its *.yaml
    are package data, its LazyConfig *.py travel as modules of that package."""
    pkgs = []
    for d, dirs, _files in os.walk(os.path.join(HERE, "configs")):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        rel = os.path.relpath(d, os.path.join(HERE, "configs"))
        pkgs.append("d2_backbones.configs" + ("" if rel == "." else "." + rel.replace(os.sep, ".")))
    return pkgs


CONFIG_PACKAGES = _config_packages()


def _long_description():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


DEPLOY = ["onnx>=1.23", "onnxscript>=0.7", "onnxruntime>=1.31", "openvino>=2024.0"]

setup(
    name="d2_backbones",
    version=_version(),
    description="ResNet (MMDetection options), VoVNetV2-eSE and GhostNet backbones for detectron2",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["d2_backbones", "d2_backbones.*"]) + CONFIG_PACKAGES,
    package_dir={"d2_backbones.configs": "configs"},
    package_data={p: ["*.yaml", "*.py"] for p in CONFIG_PACKAGES},
    python_requires=">=3.8",
    # torch, torchvision and detectron2 (>=0.6,<1.0) are prerequisites installed by the user,
    # as detectron2 itself does: the right torch build depends on the machine (CPU/CUDA).
    install_requires=["numpy", "fvcore", "yacs>=0.1.8", "pyyaml"],
    # [test]: what the test suite needs beyond the above: pytest, timm (equivalence with timm's models),
    # onnx + onnxscript + onnxruntime (ONNX export and its numerical check).
    # [timm]: the timm family (any timm model as a backbone; optional: without it the family's builders say
    # "pip install timm").
    # [deploy]: the ONNX export and the inference runtimes behind TEST.RUNTIME (onnxruntime, openvino) and
    # int8 calibration; optional: without them the runtime switch says what to install.
    extras_require={"timm": ["timm>=1.0"],
                    "deploy": DEPLOY,
                    "test": ["pytest>=7", "timm>=1.0"] + DEPLOY},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
