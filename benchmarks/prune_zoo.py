"""Zoo coverage of COP pruning: every torchvision classifier and one model per timm family at -50% FLOPs.

For each model, built with random weights (seed 0), at a small input (64x64, or the model's own size where it
rejects 64x64), ``cop_prune(model, ratio=0.5, metric="flops")`` is timed, and the result classified:

* **pruned**: the call returned; the FLOPs and params removed are measured on the pruned model, and an
  independent eval forward on a fresh batch of 2 checks that it runs and that the output shape is unchanged;
* **refused**: bconv raised its own error (``PruneError``, ``PruneTargetError``, ``ValueError``) with a
  reason, and the model was left unchanged (checked: its parameter count is the original's);
* **error**: anything else (a bug to fix), the per-model time limit, or the process killed.

Each model is measured in a child process of its own (``benchmarks/_isolated.py``), so one model out of
memory or time is a row, not the end of the run. Rows are appended to ``benchmarks/results/prune_zoo.jsonl``
as they finish (a stopped run continues with ``--resume``); ``prune_zoo.md`` and ``prune_zoo.json`` are
written from them at the end (or alone with ``--only-write``). Reproduce::

    python -m benchmarks.prune_zoo --jobs 2 --limit 400       # everything, two models at once
    python -m benchmarks.prune_zoo --resume                   # continue a stopped run
    python -m benchmarks.prune_zoo --models torchvision:resnet18 timm:convnext_atto
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from bconv._zoo import ZooModel, build
from bconv.errors import BConvError
from bconv.prune import cop_prune

from benchmarks._isolated import RowLog, isolated, large_input, measure_each
from benchmarks.common import (RESULTS, command as run_command, commit, first_line, input_size_of, logits, models,
                               params, positive_int)  # fmt: skip

ROWS = RESULTS / "prune_zoo.jsonl"
SMALL = (3, 64, 64)
# Not built: each needs more compute than the rest of the torchvision zoo together (see benchmarks/zoo.py).
EXCLUDED = {"torchvision:vit_h_14": "torchvision's largest ViT", "torchvision:regnet_y_128gf": "torchvision's largest RegNet"}


def measure(spec: ZooModel, family: str, max_params: float | None = None) -> dict:
    row = {"zoo": spec.zoo, "family": family, "model": spec.name}
    torch.manual_seed(0)  # the same random weights in every run: COP's choice, and so the result, depends on them
    try:
        model = build(spec).eval()
    except Exception as e:
        return {**row, "status": "error", "reason": "build: " + first_line(e, 400)}
    if max_params is not None and params(model) > max_params * 1e6:
        return {**row, "status": "skipped", "params_m": round(params(model) / 1e6, 2),
                "reason": f"over --max-params {max_params:g}M"}
    own = input_size_of(spec, model)
    size = SMALL
    try:
        with torch.no_grad():
            shape = tuple(logits(model(torch.randn(2, *SMALL))).shape)
    except Exception:
        size = tuple(own)
        try:
            with torch.no_grad():
                shape = tuple(logits(model(torch.randn(2, *size))).shape)
        except Exception as e:
            return {**row, "status": "error", "reason": "forward before pruning: " + first_line(e, 400)}
    row["input"] = "x".join(map(str, size))
    params_before = params(model)
    row["params_m"] = round(params_before / 1e6, 2)
    start = time.perf_counter()
    try:
        report = cop_prune(model, size, ratio=0.5, metric="flops").report
        row["seconds"] = round(time.perf_counter() - start, 2)
    except (BConvError, ValueError) as e:
        unchanged = params(model) == params_before
        return {**row, "status": "refused", "reason": first_line(e, 400), "unchanged": unchanged,
                "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    except Exception as e:
        return {**row, "status": "error", "reason": first_line(e, 400), "seconds": round(time.perf_counter() - start, 2)}
    row.update(status="pruned", flops_removed=round(1 - report.flops_after / report.flops_before, 4),
               params_removed=round(1 - report.params_after / report.params_before, 4),
               layers_narrowed=len(report.layers))  # fmt: skip
    try:
        with torch.no_grad():
            after = tuple(logits(model.eval()(torch.randn(2, *size))).shape)
        row["forward"] = "same shape" if after == shape else f"shape {after} != {shape}"
    except Exception as e:
        row["forward"] = "fails: " + first_line(e, 400)
    return row


# The kinds of refusal, in the order the results list them, each with what it means.
KINDS = {
    "graph": "Torch-Pruning's graph cannot be built, or does not reach a layer the forward runs",
    "forward": "the pruned forward fails even with the failing module's class kept whole",
    "target": "the target is out of reach: the groups left prunable (attention keeps its heads; groups crossing "
              "an op Torch-Pruning cannot follow stay whole) floor out before it",
    "other": "another refusal",
}


def kind(row: dict) -> str:
    """The kind of a refused row (a key of KINDS), from bconv's message."""
    reason = row.get("reason", "")
    if reason.startswith("PruneTargetError"):
        return "target"
    if "after pruning" in reason:
        return "forward"
    if reason.startswith("PruneError"):
        return "graph"
    return "other"


def write(command: str, note: str = "", wall_s: float | None = None, at: str | None = None) -> dict:
    order = {(spec.zoo, spec.name): i for i, (spec, _) in enumerate(models(None))}
    rows = sorted(RowLog(ROWS).rows(), key=lambda r: order.get((r["zoo"], r["model"]), len(order)))  # zoo order
    count = lambda **kw: sum(all(r.get(k) == v for k, v in kw.items()) for r in rows)  # noqa: E731
    pruned = [r for r in rows if r["status"] == "pruned"]
    skipped = [r for r in rows if r["status"] in ("skipped", "excluded")]
    ok = [r for r in pruned if r.get("forward") == "same shape" and abs(r["flops_removed"] - 0.5) <= 0.02]
    summary = {
        "models": len(rows), "pruned": len(pruned), "pruned_ok": len(ok),
        "refused": count(status="refused"), "errors": count(status="error"), "skipped": len(skipped),
        "torchvision": f"{count(zoo='torchvision', status='pruned')}/{count(zoo='torchvision')} pruned",
        "timm": f"{count(zoo='timm', status='pruned')}/{count(zoo='timm')} families pruned",
        "median_seconds": sorted(r["seconds"] for r in pruned)[len(pruned) // 2] if pruned else None,
        "refused_by_kind": {k: sum(r["status"] == "refused" and kind(r) == k for r in rows) for k in KINDS},
        "carried": sorted({r["carried_from"] for r in rows if r.get("carried_from")}),
        "command": command, "wall_s": wall_s, "commit": at, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "platform": platform.platform(),
    }  # fmt: skip
    (RESULTS / "prune_zoo.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    lines = [
        "# COP pruning over the zoos: -50% FLOPs", "",
        f"Command: `{command}`; rows collected by `python -m benchmarks.prune_zoo` (random weights, input 64x64 "
        f"unless the model needs its own size). Pruned = returned and measured; refused = bconv's own error, "
        f"model unchanged; error = anything else, the time limit or the process killed. Each model in a child "
        f"process of its own; torch {summary['torch']}, {summary['threads']} thread(s), {summary['platform']}"
        + (f"; {wall_s / 60:.1f} minutes in all" if wall_s else "") + (f"; at commit {at}." if at else "."), "",
        f"- {summary['models']} models: **{summary['pruned']} pruned** ({summary['pruned_ok']} with FLOPs within "
        f"2% of -50% and an unchanged output shape on a fresh batch), {summary['refused']} refused, "
        f"{summary['errors']} errors, {summary['skipped']} excluded or skipped", f"- torchvision: {summary['torchvision']}; timm: {summary['timm']}",
        f"- median time to prune: {summary['median_seconds']} s", *([f"- {note}"] if note else []),
        *([f"- rows marked `(measured at {c})` were not re-measured in this run: they are the run of commit {c}"
           for c in summary["carried"]]),
        "- refused, by kind: " + "; ".join(f"{n} {k} ({KINDS[k]})" for k, n in summary["refused_by_kind"].items()
                                          if n), "",
        "| zoo | family | model | input | status | FLOPs removed | params removed | forward | time (s) | reason |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    kinds = list(KINDS)
    for r in sorted(rows, key=lambda r: (r["status"] != "pruned", r["status"] == "refused" and kinds.index(kind(r)),
                                         r["zoo"] != "torchvision", r["family"], r["model"])):
        f = f"{100 * r['flops_removed']:.1f}%" if "flops_removed" in r else ""
        p = f"{100 * r['params_removed']:.1f}%" if "params_removed" in r else ""
        reason = r.get("reason", "").replace("|", "\\|")[:220]
        if r["status"] == "refused":
            reason = f"**{kind(r)}**: {reason}"
        if r.get("carried_from"):
            reason = f"(measured at {r['carried_from']}) {reason}"
        lines.append(f"| {r['zoo']} | {r['family']} | {r['model']} | {r.get('input', '')} | {r['status']} | {f} | {p} | "
                     f"{r.get('forward', '')} | {r.get('seconds', '')} | {reason} |")  # fmt: skip
    (RESULTS / "prune_zoo.md").write_text("\n".join(lines) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", help="zoo specs (default: every torchvision classifier + one per timm family)")
    p.add_argument("--resume", action="store_true", help="keep the rows in prune_zoo.jsonl, measure only the others")
    p.add_argument("--zoo", choices=("torchvision", "timm"), help="only this zoo")
    p.add_argument("--max-params", type=float, help="skip (row 'skipped') models with more parameters, in millions")
    p.add_argument("--only-write", action="store_true",
                   help="only write the .md/.json from the rows, measure nothing (keeping the run's command, time, commit)")
    p.add_argument("--note", default="", help="a line for the .md (how the rows were collected)")
    p.add_argument("--limit", type=positive_int, default=600, help="seconds per model (default 600)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per model (default 1)")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="models measured at once, each in its own child process (2 on an idle 2-core machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command, at, last = run_command("prune_zoo", argv), commit(), {}
    if args.only_write and (RESULTS / "prune_zoo.json").exists():  # the run's own record, not this rewrite's
        last = json.loads((RESULTS / "prune_zoo.json").read_text())["summary"]
        command, at = last.get("command", command), last.get("commit")
    log = RowLog(ROWS)
    start = time.perf_counter()
    if not args.only_write:
        log.start(args.resume or bool(args.models))  # a few models re-measured replace their rows only
        done = log.done() if args.resume else set()  # --models re-measures its models, replacing their rows

        def one(item: tuple[ZooModel, str]) -> dict:
            spec, family = item
            row = {"zoo": spec.zoo, "family": family, "model": spec.name}
            if str(spec) in EXCLUDED:
                return {**row, "status": "excluded", "reason": EXCLUDED[str(spec)]}
            result = isolated(measure, spec, family, args.max_params, timeout=args.limit, threads=args.threads)
            return {**row, **(result if "model" in result else {**result, "status": "error"})}

        todo = [(spec, family) for spec, family in models(args.models)
                if (spec.zoo, spec.name) not in done and not (args.zoo and spec.zoo != args.zoo)]  # fmt: skip
        # Each model in a forked child of its own, --jobs at once; one at a large input alone.
        for row in measure_each(todo, one, args.jobs, alone=lambda item: large_input(item[0])):
            print(json.dumps(row), flush=True)
            log.append(row)
    wall = last.get("wall_s") if args.only_write else None if args.resume or args.models else time.perf_counter() - start
    print(json.dumps(write(command, args.note, wall, at), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
