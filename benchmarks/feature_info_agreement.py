"""Stage discovery over timm's families: does fx find the stages timm's authors wrote down?

For one representative model per timm family (the smallest-sounding name of the module that
registers it), built with random weights at its own input size:

* ``find_stages(source="fx")``: stages found, the model refused as having no spatial stages
  (plain ViTs), or a failure with its one-line reason;
* where the model has a ``feature_info`` that describes spatial module outputs: agreement, i.e. for
  every feature_info stage (the last entry at each reduction), the fx stage at the same reduction
  outputs the same tensor (compared by value, both captured by forward hooks in one pass);
* for every feature_info stage fx does not match, why, measured against the stage rule itself
  ("the last module output before the resolution drops, where every path passes through"): the
  graph is run once more recording every dominator's value, and timm's tapped tensor is looked up
  among them. ``not-a-dominator``: no tensor that every path passes through has its values (timm taps
  one branch, e.g. a pre-activation inside the next block). ``not-last``: it is a dominator, but more
  of the network follows it at the same resolution before the drop (named). ``rule-compatible``: it
  is the last dominator at its resolution, so fx could have chosen it and did not.

Writes ``benchmarks/results/feature_info_agreement.md`` and ``.json``.

Reproduce::

    pip install -e ".[bench]"
    python -m benchmarks.feature_info_agreement            # all families (about 15 minutes on 2 cores)
    python -m benchmarks.feature_info_agreement --families resnet convnext   # a few
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from bconv.surgery import find_stages
from bconv._zoo import build, ZooModel
from bconv.errors import NoSpatialStagesError
from bconv.surgery import feature_info_entries

from benchmarks._agreement import agreement
from benchmarks.common import RESULTS, command, first_line, input_size_of, models, run_record, write_results

_CONTRADICTS = ("not-a-dominator", "not-last")


def measure(family: str, name: str) -> dict:
    row: dict = {"family": family, "model": name}
    start = time.perf_counter()
    spec = ZooModel("timm", name)
    try:
        model = build(spec).eval()
    except Exception as e:  # a model timm itself cannot build here
        return {**row, "fx": "build-error", "reason": first_line(e, 200)}
    input_size = input_size_of(spec, model)
    row["input_size"] = list(input_size)
    try:
        t = time.perf_counter()
        fx_stages = find_stages(model, input_size, source="fx")
        row["fx_seconds"] = round(time.perf_counter() - t, 2)
        row["fx"] = "ok"
        row["stages"] = [[s.name, s.channels, s.reduction, s.layout] for s in fx_stages]
    except NoSpatialStagesError as e:
        fx_stages = None
        row["fx"] = "no-spatial"
        row["reason"] = first_line(e, 200, kind=False)
    except Exception as e:
        fx_stages = None
        row["fx"] = "error"
        row["reason"] = first_line(e, 240)
    usable = feature_info_entries(model)
    if isinstance(usable, str):
        row["feature_info"] = "none"
        row["feature_info_reason"] = usable
    else:
        try:
            fi_stages = find_stages(model, input_size, source="feature_info")
            row["feature_info"] = "spatial"
            row["feature_info_stages"] = [[s.name, s.channels, s.reduction, s.layout] for s in fi_stages]
        except Exception as e:
            fi_stages = None
            row["feature_info"] = "not-spatial"
            row["feature_info_reason"] = first_line(e, 240)
        if fi_stages and fx_stages:
            row.update(agreement(model, input_size, fx_stages, fi_stages))
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def write(rows: list[dict], path: Path, run: dict) -> dict:
    """``path``.md and .json from the rows (``run``: :func:`benchmarks.common.run_record`); returns the summary."""
    n = len(rows)
    ok = [r for r in rows if r.get("fx") == "ok"]
    refused = [r for r in rows if r.get("fx") == "no-spatial"]
    # Every family whose feature_info describes spatial stages counts; fx failing on it is a disagreement.
    compared = [r for r in rows if r.get("feature_info") == "spatial"]
    agree = [r for r in compared if r.get("agree")]
    # Families with a feature_info tap that is not what the stage rule asks for: no implementation of
    # the rule can match them, so they bound the agreement any implementation can reach.
    contradicting = [r for r in compared if any(w[2] in _CONTRADICTS for w in r.get("why", ()))]
    ceiling = len(compared) - len(contradicting)
    taps = [tuple(map(int, r["matched"].split("/"))) for r in compared if r.get("matched")]
    summary = {
        "families": n,
        "fx_stages_found": len(ok),
        "fx_refused_no_spatial_stages": len(refused),
        "fx_failed": n - len(ok) - len(refused),
        "handled_pct": round(100 * (len(ok) + len(refused)) / max(n, 1), 1),
        "feature_info_spatial_compared": len(compared),
        "feature_info_agree": len(agree),
        "agreement_pct": round(100 * len(agree) / max(len(compared), 1), 1),
        "feature_info_stages_compared": sum(n for _, n in taps),
        "feature_info_stages_matched": sum(k for k, _ in taps),
        "feature_info_contradicts_rule": len(contradicting),
        "rule_ceiling_pct": round(100 * ceiling / max(len(compared), 1), 1),
    }
    lines = [
        "# fx stage discovery vs timm's feature_info",
        "",
        f"Made by `{run['command']}` (one model per timm family, random weights,",
        "each at its own default input size). `agree`: every feature_info stage (last entry per reduction)",
        "is matched by the fx stage at the same reduction outputting the same tensor.",
        "",
        f"- families: {n}",
        f"- fx found stages: {len(ok)}; refused as having no spatial stages (plain ViT-like): {len(refused)}; "
        f"failed: {summary['fx_failed']} -> handled {summary['handled_pct']}%",
        f"- families whose feature_info describes spatial stages: {len(compared)}; "
        f"fx agrees on {len(agree)} -> **{summary['agreement_pct']}%**; stages matched: "
        f"{summary['feature_info_stages_matched']} of {summary['feature_info_stages_compared']}",
        f"- families with a feature_info tap that contradicts the stage rule "
        f"(`not-a-dominator` or `not-last`, see below): {len(contradicting)} "
        f"({', '.join(r['family'] for r in contradicting) or 'none'}); the most any implementation of the rule "
        f"can agree on is {ceiling} of {len(compared)} -> {summary['rule_ceiling_pct']}%",
        "",
        "| family | model | fx | fx stages (name:channels@reduction) | feature_info | matched | mismatches (reduction, feature_info, fx) / reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stages = " ".join(f"{s[0]}:{s[1]}@{s[2]}" + ("/NHWC" if s[3] == "NHWC" else "") for s in r.get("stages", []))
        detail = r.get("mismatches") or r.get("reason") or ""
        lines.append(
            f"| {r['family']} | {r['model']} | {r['fx']} | {stages} | {r.get('feature_info', '')} "
            f"| {r.get('matched', '')} | {str(detail).replace('|', '/')} |"
        )
    diagnosed = [r for r in rows if r.get("why")]
    if diagnosed:
        lines += [
            "",
            "## Why the unmatched feature_info taps differ",
            "",
            "| family | reduction | feature_info tap | kind | detail |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {r['family']} | {w[0]} | {w[1]} | {w[2]} | {w[3]} |" for r in diagnosed for w in r["why"]]
    write_results(path, {"run": run, "summary": summary, "rows": rows}, lines)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", help="only these timm families (module names)")
    parser.add_argument("--out", type=Path, default=RESULTS / "feature_info_agreement")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    run = run_record(command("feature_info_agreement", argv))
    families = {family: spec.name for spec, family in models(zoos=("timm",))}
    if args.families:
        families = {f: families[f] for f in args.families}
    try:
        from tqdm import tqdm
    except ImportError:  # the bench extra brings tqdm; plain iteration without it
        tqdm = lambda it, **kw: it  # noqa: E731
    rows = []
    bar = tqdm(families.items(), total=len(families), unit="family")
    for family, name in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(name)
        try:
            rows.append(measure(family, name))
        except Exception as e:  # the benchmark reports, it does not stop
            rows.append({"family": family, "model": name, "fx": "error", "reason": f"benchmark: {e!r}"[:200]})
            traceback.print_exc()
    summary = write(rows, args.out, run)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
