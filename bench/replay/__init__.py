"""Trace replay: the placement policies compared on one bursty, skewed workload, either
simulated at cluster scale (:mod:`bench.replay.simulate`) or against a real local runtime
(:mod:`bench.replay.cluster`, its figures read and summarized by :mod:`bench.replay.analysis`).

The command, its options and everything a row measures: :mod:`bench.replay.__main__`
(``.venv/bin/python -m bench.replay --help``).
"""
