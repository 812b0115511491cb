"""``python -m bconv.inspect MODEL``: the stages bconv finds in a torchvision or timm model.

Examples::

    python -m bconv.inspect resnet50                     # torchvision first, then timm
    python -m bconv.inspect timm:convnext_tiny --json
    python -m bconv.inspect torchvision:inception_v3 --input-size 3 299 299 --source fx
    python -m bconv.inspect hf-hub:timm/resnet50.a1_in1k   # names as model cards print them
    python -m bconv.inspect resnet50 --image ladder.svg     # a picture of the stages and the ladder

Models are built with random weights: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from html import escape
from pathlib import Path
from typing import Sequence

from ._options import choices
from ._zoo import UnknownModelError, build, resolve, torchvision_input_size
from .errors import BConvError
from .ptl import Plan, PTLConfig, ptl_plan, wrap_with_ptl
from .surgery import Head, Stage, anatomy, default_input_size

__all__ = ["main", "format_table", "format_head", "format_plan", "format_svg"]


def format_table(stages: Sequence[Stage]) -> str:
    """The stages as an aligned text table (index, module, channels, reduction, output shape, layout); a token
    stage's layout shows its prefix tokens and grid (``NLC 1+14x14``), and ``*`` marks a grid that never
    reaches the output."""
    header = ("index", "module", "channels", "reduction", "output shape", "layout")
    rows = [header] + [
        (str(s.index), s.name, str(s.channels), str(s.reduction), "x".join(map(str, s.shape)), _layout(s))
        for s in stages
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {0, 2, 3}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _layout(s: Stage) -> str:
    if s.tokens is None:
        return s.layout
    grid = f"{s.tokens.prefix}+{s.tokens.grid[0]}x{s.tokens.grid[1]}"
    return f"{s.layout} {grid}" + ("" if s.tokens.reaches_output else " *")


def format_head(head: Head, tokens: bool = False) -> str:
    """What follows the deepest stage: pooling, classifier and the pooled feature width (``tokens``: of a
    token backbone, which pools its tokens itself: a class token or a mean, no pooling module)."""
    lines = [f"head    {', '.join(head.modules) or '(nothing after the last stage)'}"]
    if head.pool is None and head.classifier is None and not tokens:
        # a segmentation or dense-prediction head: its modules were listed above, no pooled classifier to name
        lines.append("  dense prediction: no global pooling and no classifier of a pooled vector; "
                     "the head reads feature maps")  # fmt: skip
        return "\n".join(lines)
    lines.append(f"  pooling     {head.pool or ('none found (the network pools its tokens itself)' if tokens else 'none')}")
    if head.classifier:
        lines.append(f"  classifier  {head.classifier} (reads a {head.features}-wide pooled feature vector)")
    else:
        lines.append("  classifier  none" + (f" (pooled width {head.features})" if head.features else ""))
    return "\n".join(lines)


def format_plan(plan: Plan) -> str:
    """What PTL adds, per paired stage and in total."""
    header = ("stage", "cells", "cell output", "fusion", "params", "GFLOPs")
    rows = [header] + [
        (r.stage, r.cells, "x".join(map(str, r.cell_output)), r.fusion, f"{r.params:,}", f"{r.flops / 1e9:.3f}")
        for r in plan.rows
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        f"parameters {plan.base_params:,} -> {plan.base_params + plan.added_params:,} "
        f"(+{plan.added_params:,}, +{100 * plan.added_params / max(plan.base_params, 1):.1f}%)"
    )
    lines.append(
        f"FLOPs      {plan.base_flops / 1e9:.3f}G -> {(plan.base_flops + plan.added_flops) / 1e9:.3f}G "
        f"(+{plan.added_flops / 1e9:.3f}G, +{100 * plan.added_flops / max(plan.base_flops, 1):.1f}%)"
    )
    return "\n".join(line.rstrip() for line in lines)


def format_svg(title: str, stages: Sequence[Stage], head: Head, plan: Plan | None = None) -> str:
    """A picture of the backbone's stages with the PTL ladder beside them, as an SVG document (no dependency).

    The backbone runs down the left column; each paired stage's output and its cell's output meet in a fusion
    (middle column) whose result feeds the next cell (right column); the last fusion, ``x + proj(y)``, replaces
    the last paired stage's output, which the head reads. Without ``plan`` only the backbone is drawn.
    """
    rows = {r.stage: r for r in plan.rows} if plan is not None else {}
    row_h, top, width, image_y = 64, 130, 760, 66
    bx, bw, fx, fw, cx, cw, box_h = 30, 260, 330, 130, 500, 230, 40
    height = top + row_h * (len(stages) + 1) + 24
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="13">',
        '<defs><marker id="a" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{bx}" y="24" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]

    def box(x, y, w, text, sub, fill):
        out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{box_h}" rx="6" fill="{fill}" stroke="#444"/>')
        out.append(f'<text x="{x + w / 2}" y="{y + (17 if sub else 25)}" text-anchor="middle">{escape(text)}</text>')
        if sub:
            out.append(f'<text x="{x + w / 2}" y="{y + 32}" text-anchor="middle" font-size="11" fill="#444">'
                       f'{escape(sub)}</text>')  # fmt: skip

    def arrow(x1, y1, x2, y2, dash=False):
        style = ' stroke-dasharray="4 3"' if dash else ""
        out.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#555" stroke-width="1.4"{style} '
                   'marker-end="url(#a)"/>')  # fmt: skip

    out.append(f'<text x="{bx + bw / 2}" y="54" text-anchor="middle" font-weight="bold">backbone</text>')
    if rows:
        out.append(f'<text x="{fx + fw / 2}" y="54" text-anchor="middle" font-weight="bold">fusion</text>')
        out.append(f'<text x="{cx + cw / 2}" y="54" text-anchor="middle" font-weight="bold">PTL ladder</text>')
    box(bx, image_y, bw, "image", None, "#eeeeee")
    paired = [i for i, s in enumerate(stages) if s.name in rows]
    for i, stage in enumerate(stages):
        y = top + row_h * i
        shape = "x".join(map(str, stage.shape))
        box(bx, y, bw, stage.name, f"{stage.channels} ch, /{stage.reduction}, {shape}", "#dbe8f6")
        arrow(bx + bw / 2, y - (row_h - box_h) if i else image_y + box_h, bx + bw / 2, y)
        row = rows.get(stage.name)
        if row is None:
            continue
        last = i == paired[-1]
        box(cx, y, cw, f"BConv-Cell {row.cells}", "x".join(map(str, row.cell_output)), "#fde3c8")
        box(fx, y, fw, "x + proj(y)" if last else "fuse", row.fusion.replace("1x1+BN+ReLU ", "BN, ReLU "), "#e3f1dc")
        arrow(bx + bw, y + box_h / 2, fx, y + box_h / 2)  # x_i into the fusion
        arrow(cx, y + box_h / 2, fx + fw, y + box_h / 2)  # y_i into the fusion
        if i == paired[0]:
            arrow(bx + bw, image_y + box_h / 2, cx + cw / 2, y, dash=True)  # the image into the first cell
        if not last:
            nxt = top + row_h * paired[paired.index(i) + 1]
            arrow(fx + fw / 2, y + box_h, cx + cw / 4, nxt)  # z_i into the next cell
    y = top + row_h * len(stages)
    box(bx, y, bw, "head", ", ".join(head.modules) or "(nothing)", "#eeeeee")
    arrow(bx + bw / 2, y - (row_h - box_h), bx + bw / 2, y)
    if rows:
        ly = top + row_h * paired[-1] + box_h
        arrow(fx + fw / 2, ly, bx + bw, y + box_h / 2)  # x + proj(y) replaces the last paired stage's output
        added = f"+{plan.added_params:,} parameters (+{100 * plan.added_params / max(plan.base_params, 1):.1f}%)"
        out.append(f'<text x="{fx}" y="{y + box_h / 2 + 4}" font-size="12" fill="#444">'
                   f'replaces {escape(stages[paired[-1]].name)}\'s output; {added}</text>')  # fmt: skip
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bconv.inspect",
        description="Show the stages (Conv-block boundaries) bconv finds in a torchvision or timm model.",
    )
    p.add_argument("model", help="model name: NAME (torchvision first, then timm), timm:NAME, torchvision:NAME, "
                   "or as timm's model cards print it: resnet50.a1_in1k, timm/resnet50.a1_in1k, hf-hub:timm/resnet50.a1_in1k")
    p.add_argument("--input-size", nargs=3, type=int, metavar=("C", "H", "W"), help="dummy input size (default: the model's own)")
    p.add_argument("--source", choices=choices(PTLConfig, "source"), default=PTLConfig.source, help="how to find stages (default: auto)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.add_argument("--cell", choices=choices(PTLConfig, "cell"), default=PTLConfig.cell, help="BConv-Cell of the PTL preview (default: v1)")
    p.add_argument("--image", metavar="FILE.svg", help="also write a picture of the stages and the ladder (SVG)")
    p.add_argument("--no-plan", action="store_true", help="only the stages, no PTL preview")
    p.add_argument("--prune", type=float, metavar="RATIO", help="preview COP pruning of this fraction of --metric (instead of PTL)")
    p.add_argument("--metric", choices=("flops", "params", "channels"), default="flops", help="what --prune removes (default: flops)")
    p.add_argument("--prefer", choices=("balanced", "smaller", "faster"), default="balanced", help="COP preset for --prune (default: balanced)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spec = resolve(args.model)
    except UnknownModelError as e:
        print(f"bconv.inspect: {e}", file=sys.stderr)
        return 2
    model = build(spec)
    if args.input_size:
        input_size = tuple(args.input_size)
    elif spec.zoo == "torchvision":
        input_size = torchvision_input_size(spec.name, model)
    else:
        input_size = default_input_size(model)
    try:
        body = anatomy(model, input_size, source=args.source)
    except (BConvError, ValueError) as e:
        print(f"bconv.inspect: {spec}: {e}", file=sys.stderr)
        return 1
    stages = list(body.stages)
    source = stages[0].source
    if args.prune is not None:
        from .prune import cop_prune, format_report

        try:
            report = cop_prune(model, input_size, ratio=args.prune, metric=args.metric, prefer=args.prefer).report
        except (BConvError, ValueError) as e:
            print(f"bconv.inspect: {spec}: {e}", file=sys.stderr)
            return 1
        print(f"{spec.name} from {spec.zoo} (random weights), input {'x'.join(map(str, input_size))}: "
              f"cop_prune(ratio={args.prune}, metric={args.metric!r}, prefer={args.prefer!r})")  # fmt: skip
        print()
        print(format_report(report, stages))
        return 0
    plan = None
    if not args.no_plan:
        try:
            plan = ptl_plan(wrap_with_ptl(model, cell=args.cell, input_size=input_size, source=args.source), input_size)
        except (BConvError, ValueError) as e:
            print(f"bconv.inspect: {spec}: no PTL preview: {e}", file=sys.stderr)
    if args.image:
        title = f"{spec.name} ({spec.zoo}), input {'x'.join(map(str, input_size))}"
        if plan is not None:
            title += f": wrap_with_ptl(model, cell={args.cell!r})"
        Path(args.image).write_text(format_svg(title, stages, body.head, plan))
    if args.json:
        print(json.dumps({
            "model": spec.name,
            "zoo": spec.zoo,
            "input_size": list(input_size),
            "source": source,
            "stages": [
                {"index": s.index, "name": s.name, "channels": s.channels, "reduction": s.reduction,
                 "shape": list(s.shape), "layout": s.layout, "modules": list(s.modules),
                 "tokens": None if s.tokens is None else dataclasses.asdict(s.tokens)}
                for s in stages
            ],
            "head": dataclasses.asdict(body.head),
            "shapes_from": body.shapes_from,
            "layout_measured": body.layout_measured,
            "ptl": None if plan is None else {
                "cell": args.cell,
                "stages": [dataclasses.asdict(r) for r in plan.rows],
                "base_params": plan.base_params, "added_params": plan.added_params,
                "base_flops": plan.base_flops, "added_flops": plan.added_flops,
            },
        }, indent=2))  # fmt: skip
        return 0
    print(f"{spec.name} from {spec.zoo} (random weights), input {'x'.join(map(str, input_size))}, "
          f"{len(stages)} stages found with {source}, shapes from {body.shapes_from} tensors")  # fmt: skip
    print()
    print(format_table(stages))
    tokens = stages[0].tokens is not None
    if tokens:
        print("(NLC P+HxW: P prefix tokens, then the patch grid row by row; * its grid never reaches the output)")
    print()
    print(format_head(body.head, tokens=tokens))
    print()
    if not body.layout_measured and not tokens:
        print("(the model accepts one input size only: layouts read from one shape, unambiguous ones only)")
        print()
    if plan is not None:
        paired = f"{len(plan.rows)} evenly spaced blocks" if tokens else "every stage"
        print(f"PTL preview, wrap_with_ptl(model, cell={args.cell!r}) with {paired} paired:")
        print()
        print(format_plan(plan))
        print()
    print("Pass module names or indices to wrap_with_ptl(model, stages=[...]) to pair fewer stages.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `... | head`
        sys.stderr.close()
        sys.exit(0)
