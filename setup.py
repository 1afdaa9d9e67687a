"""d2_backbones: ResNet (MMDetection options), VoVNetV2-eSE and GhostNet backbones for detectron2.

detectron2 itself is a prerequisite that pip cannot install from PyPI (it is not published
there); install it first, see README.md.
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "d2_backbones", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _long_description():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


setup(
    name="d2_backbones",
    version=_version(),
    description="ResNet (MMDetection options), VoVNetV2-eSE and GhostNet backbones for detectron2",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["d2_backbones", "d2_backbones.*"]),
    python_requires=">=3.8",
    # torch, torchvision and detectron2 (>=0.6,<1.0) are prerequisites installed by the user,
    # as detectron2 itself does: the right torch build depends on the machine (CPU/CUDA).
    install_requires=["numpy", "fvcore", "yacs>=0.1.8", "pyyaml"],
    extras_require={"test": ["pytest>=7", "timm>=0.9", "onnx>=1.23", "onnxscript>=0.7", "onnxruntime>=1.31"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
