"""Every python/bash block of README.md and docs/*.md is run here, or says why it is not.

The line before such a block is one of ``<!-- run -->``, ``<!-- run: slow -->`` or
``<!-- not run: <reason> -->``. Python blocks run in a fresh process from an empty temporary
directory (they must work from anywhere); bash blocks run in a temporary directory that looks like
a checkout (links to configs/, benchmarks/, tools/, train_net.py), so their outputs land there.
"""
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

_ANNOTATION = re.compile(r"^<!-- (run|run: slow|not run: .+) -->$")
_FENCE = re.compile(r"^```(python|bash|sh|shell)\s*$")


def _blocks():
    for path in [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))):
        lines = open(path, encoding="utf-8").read().split("\n")
        for i, line in enumerate(lines):
            m = _FENCE.match(line)
            if not m:
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            ann = _ANNOTATION.match(prev)
            yield (os.path.relpath(path, REPO), i + 1, m.group(1), ann.group(1) if ann else None,
                   "\n".join(lines[i + 1:end]))


BLOCKS = list(_blocks())
RUN = [b for b in BLOCKS if b[3] in ("run", "run: slow")]


def test_every_block_says_whether_it_runs():
    missing = [f"{f}:{n}" for f, n, _, ann, _ in BLOCKS if ann is None]
    assert not missing, f"code blocks without <!-- run --> / <!-- not run: reason -->: {missing}"
    assert len(RUN) >= 5  # the in-project snippets, the family examples and the quick commands


def _checkout_like(tmp_path):
    for name in ("configs", "benchmarks", "tools", "train_net.py"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)


@pytest.mark.parametrize("path,line,lang,ann,code", [
    pytest.param(*b, marks=[pytest.mark.slow], id=f"{b[0]}:{b[1]}") for b in RUN])  # fresh processes: slow tier
def test_block_runs(tmp_path, path, line, lang, ann, code):
    env = dict(os.environ, PYTHONPATH=REPO, D2B_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="2")
    if lang == "python":
        cmd = [sys.executable, "-c", code]
    else:
        _checkout_like(tmp_path)
        cmd = ["bash", "-euo", "pipefail", "-c", code.replace("python ", f"{sys.executable} ")]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, f"{path}:{line} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    for out in re.findall(r"--out (\S+)", code):  # the quick commands write their tables
        assert (tmp_path / out).stat().st_size > 0, out
    printed = re.findall(r"^# (\{.*\})$", code, re.M)  # an expected-output comment must match what ran
    if lang == "python" and printed:
        assert printed[-1] in p.stdout, (printed[-1], p.stdout[-500:])


def test_docstring_examples_write_nothing_into_the_working_directory(tmp_path, monkeypatch):
    """The CI command runs the docstring examples from the checkout: an example that writes files (the shapes
    dataset of :mod:`d2_backbones.data`) writes them into a temporary folder, never where it is run."""
    import doctest

    import d2_backbones.data

    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(d2_backbones.data, optionflags=doctest.ELLIPSIS)
    assert result.attempted and not result.failed, result
    assert os.listdir(tmp_path) == []
