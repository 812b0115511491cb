"""mkdocs hook: every ``benchmarks/results/*.md`` (with the images it shows) becomes a page ``results/NAME.md``.

The results files stay where the benchmarks write them, and the site shows them as they are: no copy to keep in step.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).parents[2] / "benchmarks" / "results"


def on_files(files, config):
    for path in sorted(RESULTS.glob("*")):
        if path.suffix in (".md", ".png", ".svg"):
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files
