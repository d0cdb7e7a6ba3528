"""Benchmarks: what reproducibility costs, measured against physical floors.

Every figure is measured next to a *floor*: the least work that could do the
same job (one fsync'd JSON write, one SQLite lookup, one ``stat`` per file,
reading HEAD from ``.git``, a bare ``Pool.map``), timed in the same run on the
same machine, so the ratio means the same on a laptop and on a cluster node.

Run ``python -m benchmarks`` from the repository root. This is a benchmark,
not a test: nothing here asserts a time.
"""
