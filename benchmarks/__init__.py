"""bconv's benchmarks: each module measures one claim and writes its results to ``benchmarks/results/``.

Run them from the repository root as modules, e.g. ``python -m benchmarks.transfer --quick --out /tmp/t``.
What they share (data, seeding, the training loop, evaluation, retrieval metrics, paired statistics) lives in
``benchmarks.common``; no benchmark imports another.
"""
