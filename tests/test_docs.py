"""Every python/bash block of README.md and docs/*.md is run here, or says why it is not.

The line before such a block is one of ``<!-- run -->``, ``<!-- run: slow -->`` or
``<!-- not run: <reason> -->``. Python blocks run in a fresh process from an empty temporary
directory (they must work from anywhere); bash blocks run in a temporary directory that looks like
a checkout (links to configs/, benchmarks/, train_net.py), so their outputs land there.
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
    for name in ("configs", "benchmarks", "train_net.py"):
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


# ---- one place for each kind of fact -------------------------------------------------------------------------
def _pages():
    """{relative path: text} of README.md and docs/*.md."""
    paths = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
    return {os.path.relpath(p, REPO): open(p, encoding="utf-8").read() for p in paths}


def _prose(text):
    """The lines of a page, without the <!-- ... --> annotations (which say which test runs a block)."""
    return [(i + 1, line) for i, line in enumerate(text.split("\n")) if not line.lstrip().startswith("<!--")]


def test_registered_names_are_listed_once():
    """The table of MODEL.BACKBONE.NAME values is docs/configuration.md's ("Registered backbones"); other pages
    link to it (tests/test_config_and_registry.py checks the table against REGISTERED_NAMES)."""
    rows = [f"{page}:{n}" for page, text in _pages().items() for n, line in _prose(text)
            if re.match(r"^\| `build_\w+`", line) and page != os.path.join("docs", "configuration.md")]
    assert not rows, f"registered names listed outside docs/configuration.md: {rows}"


def test_test_matrices_are_on_the_testing_page():
    """Which test checks what is said on docs/testing.md; user pages say what works and link there. Outside it no
    table row names a test file and no line names a test function."""
    testing = os.path.join("docs", "testing.md")
    found = []
    for page, text in _pages().items():
        if page == testing:
            continue
        for n, line in _prose(text):
            if (line.startswith("|") and re.search(r"\btest_\w+\.py\b", line)) or re.search(r"\btest_\w+\b(?!\.py)", line):
                found.append(f"{page}:{n}: {line.strip()[:100]}")
    assert not found, "test names outside docs/testing.md:\n" + "\n".join(found)


def test_suite_counts_and_times_are_stated_on_the_testing_page_only():
    testing = os.path.join("docs", "testing.md")
    found = [f"{page}:{n}" for page, text in _pages().items() if page != testing for n, line in _prose(text)
             if re.search(r"\b\d[\d,]*\s+(?:tests|test items|items)\b|\b\d+ passed\b", line)]
    assert not found, f"test counts outside docs/testing.md (link to it instead): {found}"
    assert re.search(r"\(docs/testing\.md[#)]", _pages()["README.md"].split("## Tests")[1])


def test_removed_modules_are_not_mentioned():
    """Replaced: d2_backbones.checkpoint by d2_backbones.resnet.convert_*, d2_backbones.shapes by
    d2_backbones.data, tools/export.py by python -m d2_backbones.export, train.AtomicCheckpointer by
    d2_backbones.weights.Checkpointer."""
    gone = re.compile(r"d2_backbones[./]checkpoint\b(?!er)|d2_backbones[./]shapes\b|tools/export\.py|AtomicCheckpointer")
    found = [f"{page}:{n}: {m.group(0)}" for page, text in _pages().items()
             for n, line in enumerate(text.split("\n"), 1) for m in gone.finditer(line)]
    assert not found, found



def _anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    """Links to another page (and to a heading of it) resolve, so moving a section cannot leave a dead link."""
    pages = _pages()
    anchors = {page: {_anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.M)} for page, text in pages.items()}
    dead = []
    for page, text in pages.items():
        for n, line in enumerate(text.split("\n"), 1):
            for link in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"^[a-z]+:", link):
                    continue
                path, _, fragment = link.partition("#")
                target = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
                if not os.path.exists(os.path.join(REPO, target)):
                    dead.append(f"{page}:{n}: {link}")
                elif fragment and target in anchors and fragment not in anchors[target]:
                    dead.append(f"{page}:{n}: {link} (no such heading)")
    assert not dead, dead
