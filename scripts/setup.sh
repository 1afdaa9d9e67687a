#!/usr/bin/env bash
# Set up a machine for d2_backbones in one command (run from anywhere):
#
#   bash scripts/setup.sh [--check] [DETECTRON2_SOURCE_FOLDER]
#
#   1. torch + torchvision: kept if they import together (torchvision.ops.nms runs); otherwise
#      pip install torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION from the default index.
#   2. detectron2 (not on PyPI): kept if detectron2 and detectron2._C import; otherwise built from
#      source with pip install --no-build-isolation, from the local source folder given as the
#      argument or in $D2_SOURCE (machines that cannot reach its repository), else from the
#      official repository. Exits non-zero with a message if it still does not import.
#   3. this package, editable, with its test extras: pip install --no-build-isolation -e ".[test]"
#      (kept when this checkout is already installed with them).
#
# Idempotent: a second run keeps everything and installs nothing. --check only reports what it
# would keep or install (exit status 1 if something is missing). Environment:
#   PYTHON               interpreter to set up (default: python3)
#   TORCH_VERSION        default 2.14.1     TORCHVISION_VERSION   default 0.29.1 (a pair that matches)
#   D2_SOURCE            detectron2 source folder (the argument wins)
set -euo pipefail

CHECK=0
ARG_SOURCE=""
for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --check) CHECK=1 ;;
        -*) echo "[setup] ERROR: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) ARG_SOURCE="$arg" ;;
    esac
done

PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.14.1}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.29.1}"
D2_SOURCE="${ARG_SOURCE:-${D2_SOURCE:-}}"
D2_REPO="git+https://github.com/facebookresearch/detectron2.git"
MISSING=0

say() { echo "[setup] $*"; }
fail() { echo "[setup] ERROR: $*" >&2; exit 1; }
# run "$@" unless --check, where it only says what it would run
act() {
    if [ "$CHECK" = 1 ]; then
        say "   --check: would run: $*"
        MISSING=1
        return 1
    fi
    "$@"
}

if [ -n "$D2_SOURCE" ]; then  # resolve before changing directory
    [ -d "$D2_SOURCE" ] || fail "detectron2 source folder '$D2_SOURCE' does not exist."
    D2_SOURCE="$(cd "$D2_SOURCE" && pwd)"
fi
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

"$PY" -m pip --version >/dev/null 2>&1 || fail "'$PY -m pip' does not work. Install pip (e.g. $PY -m ensurepip) or set PYTHON."
say "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# --no-build-isolation builds (detectron2, this package) use the installed setuptools, which needs
# `wheel` for bdist_wheel unless it is >= 70.1 (it carries bdist_wheel itself since then).
if tools="$("$PY" - <<'PYCODE' 2>/dev/null
import importlib.util, setuptools
assert importlib.util.find_spec("setuptools.command.bdist_wheel") or importlib.util.find_spec("wheel")
print(f"setuptools {setuptools.__version__}")
PYCODE
)"; then
    say "0/3 build tools: kept $tools (it builds wheels)"
else
    say "0/3 build tools: setuptools missing or unable to build wheels; installing setuptools and wheel"
    act "$PY" -m pip install --quiet --upgrade setuptools wheel || true
fi

# ------------------------------------------------------------------------------------------ 1. torch
torch_pair() {
    "$PY" - <<'PYCODE' 2>/dev/null
import torch, torchvision, torchvision.ops
torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
print(f"torch {torch.__version__} + torchvision {torchvision.__version__}")
PYCODE
}
if pair="$(torch_pair)"; then
    say "1/3 torch: kept $pair (they import together)"
else
    say "1/3 torch: no torch/torchvision pair that imports together; installing torch==$TORCH_VERSION" \
        "torchvision==$TORCHVISION_VERSION from the default index"
    # The default index only: machine-local wheel folders may hold a torch that torchvision cannot import.
    if act env PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$PY" -m pip install --quiet \
            "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"; then
        pair="$(torch_pair)" || fail "torch==$TORCH_VERSION and torchvision==$TORCHVISION_VERSION were installed" \
            "but do not import together. Set TORCH_VERSION/TORCHVISION_VERSION to a matching pair (pytorch.org lists them)."
        say "1/3 torch: installed $pair"
    fi
fi

# ------------------------------------------------------------------------------------------ 2. detectron2
d2_version() { (cd / && "$PY" -c "import detectron2, detectron2._C; print(detectron2.__version__)" 2>/dev/null); }
if v="$(d2_version)"; then
    say "2/3 detectron2: kept $v (detectron2 and detectron2._C import)"
else
    src="${D2_SOURCE:-$D2_REPO}"
    say "2/3 detectron2: not importable; building it from $src (pip install --no-build-isolation;" \
        "compiling its C++ ops takes a few minutes)"
    if act "$PY" -m pip install --quiet --no-build-isolation "$src" || [ "$CHECK" = 1 ]; then :; else
        say "2/3 detectron2: pip failed (its output is above)"
    fi
    if [ "$CHECK" = 0 ]; then
        if ! v="$(d2_version)"; then
            echo "[setup] ERROR: detectron2 is not importable (import detectron2, detectron2._C failed) after trying" \
                 "to install it from $src." >&2
            if [ -z "$D2_SOURCE" ]; then
                echo "[setup] Without access to its repository, copy detectron2's source to this machine and run:" \
                     "bash scripts/setup.sh /path/to/detectron2 (or set D2_SOURCE)." >&2
            fi
            echo "[setup] detectron2's INSTALL.md lists what a source build needs (a C++ compiler; for GPUs, CUDA" \
                 "matching torch)." >&2
            exit 1
        fi
        say "2/3 detectron2: installed $v from $src"
    fi
fi

# ------------------------------------------------------------------------------------------ 3. d2_backbones
# Kept when `import d2_backbones` (from outside the checkout) is this checkout and the [test] extras are met.
package_state() {
    (cd / && "$PY" - "$ROOT" <<'PYCODE' 2>/dev/null
import importlib.metadata as md, os, sys


def no(reason):  # stdout carries the reason; stderr (import warnings) is dropped
    print(reason)
    sys.exit(1)


try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
try:
    import d2_backbones
except Exception as e:
    no(f"not importable ({type(e).__name__}: {e})")
where = os.path.dirname(os.path.dirname(os.path.abspath(d2_backbones.__file__)))
if where != sys.argv[1]:
    no(f"imports from {where}, not from this checkout")
if md.version("d2_backbones") != d2_backbones.__version__:
    no(f"installed metadata {md.version('d2_backbones')} is older than the checkout's {d2_backbones.__version__}")
for r in md.requires("d2_backbones") or []:
    req = Requirement(r)
    if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
        continue
    try:
        found = md.version(req.name)
    except md.PackageNotFoundError:
        no(f"{req.name} (needed: {req}) is missing")
    if not req.specifier.contains(found, prereleases=True):
        no(f"{req.name} {found} does not satisfy {req}")
print(f"d2_backbones {d2_backbones.__version__} from this checkout, with the [test] extras")
PYCODE
    )
}
if state="$(package_state)"; then
    say "3/3 d2_backbones: kept $state"
else
    say "3/3 d2_backbones: ${state##*$'\n'}; installing: pip install --no-build-isolation -e \".[test]\""
    if act "$PY" -m pip install --quiet --no-build-isolation -e ".[test]"; then
        state="$(package_state)" || fail "d2_backbones is still not usable after installing it: ${state##*$'\n'}"
        say "3/3 d2_backbones: installed $state"
    fi
fi
if [ "$CHECK" = 1 ]; then
    [ "$MISSING" = 0 ] && say "--check: everything is in place" && exit 0
    say "--check: something is missing (above); run without --check to install it"
    exit 1
fi
say "done: python -m pytest tests -q runs the test suite"
