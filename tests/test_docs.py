"""The README and the docs site: the site builds with warnings as errors, and every ```python block is run by a
test as written or is a fragment of an example script that is (docs/development.md says how a block is marked)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import single_thread

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^( *)```python\n(.*?)^\1```$", re.S | re.M)
MARKER = re.compile(r"<!-- test: (\S+) -->")
FRAGMENT = re.compile(r"fragment of `(examples/[\w/]+\.py)`")
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$')


@dataclass
class Block:
    page: Path
    line: int
    heading: str  # the nearest heading line above the block
    code: str
    marker: str | None  # "run", a test file, or None
    fragment_of: str | None  # an example script the block is a fragment of

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            before = text[: m.start()]
            lines_before = before.rstrip("\n").splitlines()
            marker = MARKER.fullmatch(lines_before[-1].strip()) if lines_before else None
            paragraph = before.rstrip().rsplit("\n\n", 1)[-1]
            fragment = FRAGMENT.search(paragraph.replace("\n", " "))
            heading = next((l for l in reversed(lines_before) if re.match(r"#{1,6} ", l)), "")
            code = "\n".join(l[len(m.group(1)) :] for l in m.group(2).splitlines())  # an indented block, dedented
            found.append(Block(page, before.count("\n") + 1, heading, code, marker and marker.group(1),
                               fragment and fragment.group(1)))  # fmt: skip
    return found


BLOCKS = blocks()
RUN = [b for b in BLOCKS if b.marker == "run"]
# Blocks that build and train or prune full-size networks: over a few seconds each on two busy cores.
SLOW = {"guides/pruning.md", "guides/dense-prediction.md", "guides/rollback.md"}


def _normal(line: str) -> str:
    """A code line without its comment and spacing, to find a fragment's lines in its script."""
    return re.sub(r"\s+", "", re.sub(r"\s+#.*$", "", line))


def test_every_python_block_is_run_by_a_test_or_a_fragment_of_a_script_that_is():
    assert len(BLOCKS) >= 15
    unmarked = [str(b) for b in BLOCKS if not b.marker and not b.fragment_of]
    assert not unmarked, f"mark these blocks (docs/development.md): {unmarked}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.marker not in (None, "run")], ids=str)
def test_a_block_marked_with_a_test_is_read_or_included_by_that_test(block):
    test = (ROOT / block.marker).read_text()
    include = INCLUDE.match(block.code.strip())
    if include:  # the block shows a script; the test runs that script
        assert (ROOT / include.group(1)).exists() and Path(include.group(1)).stem in test
        return
    if block.page == ROOT / "README.md":  # the README shows a script of examples/ whole; the test runs that script
        shown = [p for p in (ROOT / "examples").glob("*.py") if p.read_text().rstrip("\n") == block.code]
        assert shown and shown[0].stem in test, f"{block} is no script of examples/ that {block.marker} runs"
        return
    page = block.page.relative_to(ROOT / "docs").as_posix()
    assert f'docs_block("{page}", "{block.heading}")' in test, f"{block.marker} does not read {block}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.fragment_of], ids=str)
def test_a_fragment_is_made_of_lines_of_its_script(block):
    script = {_normal(line) for line in (ROOT / block.fragment_of).read_text().splitlines()}
    missing = [line for line in block.code.splitlines() if _normal(line) and _normal(line) not in script]
    assert not missing, f"{block}: not in {block.fragment_of}: {missing}"


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, marks=[pytest.mark.slow] if b.page.relative_to(ROOT / "docs").as_posix() in SLOW else [])
     for b in RUN if b.page != ROOT / "README.md"],
    ids=str,
)  # fmt: skip
def test_a_block_marked_run_runs_as_written(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with single_thread():
        exec(compile(block.code, str(block.page), "exec"), {"__name__": "__docs__"})


# --------------------------------------------------------------------------- the README


README = (ROOT / "README.md").read_text()


def test_the_readme_is_short_and_keeps_the_ci_commands():
    assert len(README.splitlines()) <= 300
    install = README.split("<!-- ci:install -->\n```bash\n", 1)[1].split("\n```", 1)[0]
    assert install.count("\n") == 0 and install.startswith("pip install -e \".[")
    extras = set(install.split("[", 1)[1].split("]", 1)[0].split(","))
    assert {"test", "lightning", "accelerate", "docs"} <= extras  # what the default tests need
    assert install.endswith("&& python -m bconv.inspect resnet50")
    assert README.split("<!-- ci:test -->\n```bash\n", 1)[1].split("\n```", 1)[0] == "python -m pytest"


def test_the_readme_ptl_example_is_the_quickstart_script_the_tests_run():
    shown = [b.code for b in BLOCKS if b.page == ROOT / "README.md" and "wrap_with_ptl" in b.code]
    assert shown == [(ROOT / "examples" / "quickstart.py").read_text().rstrip("\n")]


@pytest.mark.slow  # ResNet-50's anatomy and PTL preview: about 11 s on two busy cores
def test_the_readme_picture_is_what_inspect_draws_for_resnet50(tmp_path):
    from bconv.inspect import main

    assert "docs/images/ladder-resnet50.svg" in README
    assert main(["resnet50", "--image", str(tmp_path / "r50.svg")]) == 0
    assert (tmp_path / "r50.svg").read_text() == (ROOT / "docs" / "images" / "ladder-resnet50.svg").read_text()


@pytest.mark.parametrize("block", [b for b in RUN if b.page == ROOT / "README.md"], ids=str)
def test_the_readme_blocks_marked_run_run_as_written(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with single_thread():
        exec(compile(block.code, "README.md", "exec"), {"__name__": "__docs__"})


# --------------------------------------------------------------------------- the site


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor
    run = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    site = tmp_path / "site"
    api = (site / "api" / "bconv" / "index.html").read_text()
    assert "wrap_with_ptl" in api and "ladder_usage" in api  # the reference is generated from the docstrings
    assert (site / "results" / "ladder_trajectory" / "index.html").exists()  # results files are pages
    assert (site / "images" / "ladder-resnet50.svg").exists()


# --------------------------------------------------------------------------- the guidance's measurement


@pytest.mark.slow  # pre-trains the benchmark's CNN on digits, then one epoch per condition: 6 to 35 s
def test_the_ladder_trajectory_the_guidance_quotes_is_measured_by_the_benchmark(tmp_path):
    import json

    from benchmarks import ladder

    ladder.main(["--trajectory", "--seeds", "1", "--epochs", "1", "--lrs", "0.1", "--out", str(tmp_path / "t")])
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    share = {(r["condition"], r["step"], r.get("end_of_epoch", False)): r["output_share"] for r in rows}
    assert share["ptl", 0, False] == 0.0 and share["frozen", 0, False] == 0.0  # a fresh wrap reads exactly 0
    assert share["ptl", 1, False] > 0 and share["ptl", 9, True] > share["ptl", 1, False]  # it wakes up and grows
    assert all(v == 0.0 for (c, _, _), v in share.items() if c == "frozen")  # an untrained ladder stays at 0
    assert share["ptl_paper", 0, False] > 0.01  # the paper's random final fusion starts high
    assert "| 9 (end of epoch 1) |" in (tmp_path / "t.md").read_text()
