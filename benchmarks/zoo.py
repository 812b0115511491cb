"""Zoo coverage: does ``wrap_with_ptl`` work on every torchvision classifier and every timm family?

For every torchvision classification model and one representative model per timm family
(``bconv._zoo.timm_families()``: the smallest-sounding model of each module that registers models),
built with random weights at its own default input size (torchvision: the crop size of its first
weights; timm: ``pretrained_cfg["input_size"]``), the script measures:

* **wrap**: ``wrap_with_ptl(model)`` on all discovered stages (``source="auto"``), timed; the source
  that found the stages (timm's ``feature_info`` or fx) and the stage count. A model refused with
  ``NoSpatialStagesError`` (neither spatial stages nor a token grid bconv can pair: CrossViT's two branches,
  PiT's pooled tokens, ...) counts as "no spatial stages", not as a failure; token backbones (ViT, DeiT,
  Mixer, ...) are wrapped on their blocks;
* **agreement** (timm models whose ``feature_info`` gave the stages): do the fx stages output the same
  tensors? (``benchmarks._agreement``, the comparison of ``benchmarks.feature_info_agreement``);
* **preserve**: function preservation at init, the eval output of the wrapped model against the
  original's (bconv's hooks switched off) on one batch of 2; passes if ``torch.equal`` (exactly the same);
* **train**: one SGD step on a dummy loss (mean square of the output), batch 2, train mode, then
  ``detach_state()``; passes if the loss and every gradient are finite;
* **eval**: one eval forward after that step; passes if the output is finite and has the init shape.

Every exception is caught per model and reported with its one-line reason; the script never stops
on a model. Models in ``EXCLUDED`` are listed with the reason and not built.

Each model is measured in a child process of its own (``benchmarks/_isolated.py``): a model that runs out of
memory or time becomes a failed row, not the end of the run. Rows are appended to ``zoo.jsonl`` as they
finish; ``--resume`` continues a stopped run. Writes ``benchmarks/results/zoo.md`` (summary, failures, table)
and ``zoo.json``.

Reproduce::

    pip install -e ".[bench]"
    python -m benchmarks.zoo --jobs 2                          # everything, two models at once (zoo.md: wall time)
    python -m benchmarks.zoo --resume                          # continue a stopped run
    python -m benchmarks.zoo --models torchvision:resnet18 timm:test_convnext --out /tmp/zoo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bconv import wrap_with_ptl
from bconv._zoo import ZooModel, build
from bconv.errors import NoSpatialStagesError
from bconv.surgery import bconv_hooks_suspended
from bconv.surgery import find_stages

from benchmarks._agreement import agreement
from benchmarks._isolated import RowLog, isolated, large_input, measure_each
from benchmarks.common import (RESULTS, command, first_line, input_size_of, logits, models, params, positive_int,
                               run_record, write_results)  # fmt: skip

# Not built, to keep the run short on two CPU cores: by the FLOP counts torchvision publishes with their
# weights, each of these needs at least half the compute of all the torchvision classifiers measured here
# together, and smaller models of the same architecture are measured.
EXCLUDED: dict[str, str] = {
    "torchvision:vit_h_14": "torchvision's largest ViT, at its weights' 518x518 crop: by torchvision's FLOP "
    "count it needs more compute than all the torchvision classifiers measured here together; a plain ViT like "
    "vit_b_16, vit_b_32, vit_l_16 and vit_l_32, which are measured",
    "torchvision:regnet_y_128gf": "torchvision's largest RegNet, at its weights' 384x384 crop: by torchvision's "
    "FLOP count it needs about half the compute of all the torchvision classifiers measured here together; the "
    "seven other regnet_y_* models are measured",
}

CHECKS = ("wrap", "preserve", "train", "eval")
BATCH = 2  # BatchNorm in train mode needs more than one value per channel


def _params_m(module: torch.nn.Module) -> float:
    return round(params(module) / 1e6, 2)


def measure(spec: ZooModel, family: str) -> dict:
    """Every check of the module docstring on one model; failures become a step name and a reason."""
    torch.manual_seed(0)
    row: dict = {"zoo": spec.zoo, "family": family, "model": spec.name}
    if str(spec) in EXCLUDED:
        return {**row, "status": "excluded", "reason": EXCLUDED[str(spec)]}
    start = time.perf_counter()
    try:
        model = build(spec).eval()
    except Exception as e:  # a model its zoo cannot build here
        return {**row, "status": "fail", "step": "build", "reason": first_line(e)}
    input_size = input_size_of(spec, model)
    row.update(params_m=_params_m(model), input_size=list(input_size))
    x = torch.randn(BATCH, *input_size, generator=torch.Generator().manual_seed(0))

    try:
        t = time.perf_counter()
        wrapped = wrap_with_ptl(model, input_size=input_size)
        row["wrap_s"] = round(time.perf_counter() - t, 2)
    except NoSpatialStagesError as e:
        return {**row, "status": "no-spatial", "reason": first_line(e, kind=False), "seconds": _since(start)}
    except Exception as e:
        return {**row, "status": "fail", "step": "wrap", "reason": first_line(e), "seconds": _since(start)}
    row.update(
        wrap=True,
        source=wrapped.stages[0].source,
        stages=len(wrapped.stages),
        stage_names=[s.name for s in wrapped.stages],
        ptl_params_m=_params_m(wrapped.ptl),
    )
    reasons: dict[str, str] = {}

    if row["source"] == "feature_info":
        # timm's hand-written stages gave the wrap: are they what fx finds?
        try:
            fx_stages = find_stages(model, input_size, source="fx")
            with bconv_hooks_suspended(model):
                row.update(agreement(model, input_size, fx_stages, list(wrapped.stages)))
        except Exception as e:
            row["agreement_error"] = first_line(e)

    init_shape = None
    try:
        with torch.no_grad():
            ours = logits(wrapped.eval()(x))
            with bconv_hooks_suspended(model):
                theirs = logits(model(x))
        init_shape = tuple(ours.shape)
        row["max_abs_diff"] = float((ours - theirs).abs().max())
        row["preserve"] = bool(torch.equal(ours, theirs))  # exactly: the last cell is silent, out = x + proj(0)
        if not row["preserve"]:
            reasons["preserve"] = f"eval output differs from the original's by up to {row['max_abs_diff']:.3g}"
    except Exception as e:
        row["preserve"], reasons["preserve"] = False, first_line(e)

    try:
        wrapped.train()
        wrapped.reset_state()
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=1e-3)
        loss = logits(wrapped(x)).float().pow(2).mean()
        loss.backward()
        finite = bool(torch.isfinite(loss)) and all(
            bool(torch.isfinite(p.grad).all()) for p in wrapped.parameters() if p.grad is not None
        )
        optimizer.step()
        wrapped.detach_state()
        row["train"] = finite
        if not finite:
            reasons["train"] = "non-finite loss or gradient"
    except Exception as e:
        row["train"], reasons["train"] = False, first_line(e)
    finally:
        wrapped.zero_grad(set_to_none=True)

    try:
        with torch.no_grad():
            out = logits(wrapped.eval()(x))
        row["eval"] = bool(torch.isfinite(out).all()) and (init_shape is None or tuple(out.shape) == init_shape)
        if not row["eval"]:
            reasons["eval"] = "non-finite output or a shape other than at init"
    except Exception as e:
        row["eval"], reasons["eval"] = False, first_line(e)

    failed = [c for c in CHECKS if row.get(c) is False]
    row["status"] = "ok" if not failed else "fail"
    if failed:
        row["step"], row["reason"] = failed[0], "; ".join(f"{c}: {reasons[c]}" for c in failed)
    row["seconds"] = _since(start)
    return row


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)


def summarise(rows: list[dict], wall_s: float) -> dict:
    by = lambda status: [r for r in rows if r["status"] == status]  # noqa: E731
    wrapped = [r for r in rows if r.get("wrap")]
    compared = [r for r in rows if "agree" in r]
    return {
        "models": len(rows),
        "torchvision": sum(r["zoo"] == "torchvision" for r in rows),
        "timm_families": sum(r["zoo"] == "timm" for r in rows),
        "excluded": len(by("excluded")),
        "measured": len(rows) - len(by("excluded")),
        "no_spatial_stages": len(by("no-spatial")),
        "wrapped": len(wrapped),
        "wrap_failed": sum(r.get("step") in ("build", "wrap") for r in rows),
        "preserved": sum(bool(r.get("preserve")) for r in wrapped),
        "train_step_ok": sum(bool(r.get("train")) for r in wrapped),
        "eval_step_ok": sum(bool(r.get("eval")) for r in wrapped),
        "all_checks_ok": len(by("ok")),
        "feature_info_compared": len(compared),
        "feature_info_agree": sum(r["agree"] for r in compared),
        "wall_s": round(wall_s, 1),
    }


def write(rows: list[dict], summary: dict, run: dict, out: Path) -> None:
    s, env = summary, run["environment"]
    slowest = sorted((r for r in rows if "seconds" in r), key=lambda r: -r["seconds"])[:5]
    spatial = s["measured"] - s["no_spatial_stages"]
    lines = [
        "# Zoo coverage of `wrap_with_ptl`",
        "",
        f"Made by `{run['command']}` in {s['wall_s'] / 60:.1f} minutes"
        + (f" (after {s['resumed_rows']} rows of an earlier run, resumed)" if s["resumed_rows"] else "")
        + f" (torch {env['torch']}, CPU threads: {s['threads']} per model, {s.get('jobs', 1)} model(s) at once,",
        f"{env['platform']}). Each model runs in a child process of its own. Random weights, each model at its own default input size, batch {BATCH}.",
        "See the docstring of `benchmarks/zoo.py` for what each check means.",
        "",
        "## Summary",
        "",
        f"- models: {s['models']} ({s['torchvision']} torchvision classifiers, {s['timm_families']} timm families); "
        f"excluded: {s['excluded']}; measured: {s['measured']}",
        f"- refused with `NoSpatialStagesError` (neither spatial stages nor a token grid bconv can pair; the reasons "
        f"are listed below): {s['no_spatial_stages']}",
        f"- **wrapped: {s['wrapped']} of the {spatial} measured models that were not refused** "
        f"(build or wrap failed: {s['wrap_failed']})",
        f"- of the wrapped: function preserved at init {s['preserved']}, train step {s['train_step_ok']}, "
        f"eval step {s['eval_step_ok']}; every check passed: {s['all_checks_ok']}",
        f"- timm models wrapped from `feature_info` whose fx stages output the same tensors: "
        f"{s['feature_info_agree']} of {s['feature_info_compared']}",
        "- slowest: " + ", ".join(f"`{r['model']}` {r['seconds']:.0f} s" for r in slowest),
        "",
        "## Failures",
        "",
    ]
    failures = [r for r in rows if r["status"] == "fail"]
    lines += [f"- `{r['zoo']}:{r['model']}` ({r['step']}): {r['reason']}" for r in failures] or ["None."]
    lines += ["", "## Refused (no spatial stages, no token grid bconv can pair)", ""]
    lines += [f"- `{r['zoo']}:{r['model']}`: {r['reason']}" for r in rows if r["status"] == "no-spatial"] or ["None."]
    lines += ["", "## Excluded", ""]
    lines += [f"- `{r['zoo']}:{r['model']}`: {r['reason']}" for r in rows if r["status"] == "excluded"] or ["None."]
    lines += [
        "",
        "## All models",
        "",
        "`source`: what found the stages; `fx = feature_info`: fx stages matched / feature_info stages; "
        "`diff`: max |wrapped - original| at init; times in seconds.",
        "",
        "| zoo | family | model | params (M) | input | status | source | stages | PTL params (M) | wrap s "
        "| fx = feature_info | diff | preserve | train | eval | total s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mark = {True: "yes", False: "**no**", None: ""}
    for r in rows:
        size = "x".join(map(str, r["input_size"][1:])) if "input_size" in r else ""
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        lines.append(
            f"| {r['zoo']} | {r['family'] if r['zoo'] == 'timm' else ''} | {r['model']} | {r.get('params_m', '')} "
            f"| {size} | {r['status']} | {r.get('source', '')} | {r.get('stages', '')} | {r.get('ptl_params_m', '')} "
            f"| {r.get('wrap_s', '')} | {r.get('matched', '')} | {diff} | {mark[r.get('preserve')]} "
            f"| {mark[r.get('train')]} | {mark[r.get('eval')]} | {r.get('seconds', '')} |"
        )
    write_results(out, {"run": run, "summary": summary, "rows": rows}, lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="only these models (resnet50, timm:NAME, torchvision:NAME)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads contend for the cores)")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="models measured at once, each in its own child process (default 1; 2 on an idle "
                             "2-core machine with --threads 1 halves the wall time)")
    parser.add_argument("--out", type=Path, default=RESULTS / "zoo", help="output path without suffix")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in OUT.jsonl and measure only the models not there")
    parser.add_argument("--limit", type=positive_int, default=1800, help="seconds per model before it counts as failed")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    run = run_record(command("zoo", argv))
    log = RowLog(args.out.with_suffix(".jsonl"))
    log.start(args.resume)
    done = log.done()
    start = time.perf_counter()
    todo = models(args.models)
    order = {(spec.zoo, spec.name): i for i, (spec, _) in enumerate(todo)}
    bar = tqdm(total=sum((spec.zoo, spec.name) not in done for spec, _ in todo), unit="model")

    def one(item: tuple[ZooModel, str]) -> dict:
        spec, family = item
        row = isolated(measure, spec, family, timeout=args.limit, threads=args.threads)
        if "model" not in row:  # the child died or ran out of time: the row says why
            row = {"zoo": spec.zoo, "family": family, "model": spec.name, "step": "benchmark", **row,
                   "status": "fail"}  # fmt: skip
        return row

    # Each model runs in a forked child of its own, --jobs at once; a model at a large input alone.
    queue = [(spec, family) for spec, family in todo if (spec.zoo, spec.name) not in done]
    for row in measure_each(queue, one, args.jobs, alone=lambda item: large_input(item[0])):
        log.append(row)  # appended here, in the main thread, as each model finishes
        bar.set_postfix_str(f"{row['zoo']}:{row['model']}")
        bar.update()
    bar.close()
    rows = sorted(log.rows(), key=lambda r: order.get((r["zoo"], r["model"]), len(order)))
    summary = summarise(rows, time.perf_counter() - start)
    summary.update(threads=args.threads, jobs=args.jobs, resumed_rows=len(done))
    write(rows, summary, run, args.out)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
