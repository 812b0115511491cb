"""bconv's benchmarks: each module measures one claim and writes its results to ``benchmarks/results/``.

Run them from the repository root as modules, e.g. ``python -m benchmarks.transfer --quick --out /tmp/t``.
What they share (data, seeding, the training loop, evaluation, retrieval metrics, paired statistics, the zoo
list, FLOP and parameter counts, the side-by-side timing loop, the hand-wired PTL ResNet reference and the
results writer) lives in ``benchmarks.common``; ``benchmarks._isolated`` and ``benchmarks._agreement`` hold what the
zoo benchmarks share. No benchmark imports another.
"""
