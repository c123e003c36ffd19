"""The benchmarks: each module is a command, run from the repository root with
``.venv/bin/python -m bench.<module>`` (``--help`` prints what it measures and how).

Commands:

- :mod:`bench.replay` (``python -m bench.replay [--simulate]``): the placement policies
  compared on one bursty, skewed workload, simulated at 1,000 invokers
  (:mod:`bench.replay.simulate`) or replayed against a real local runtime
  (:mod:`bench.replay.cluster`, read by :mod:`bench.replay.analysis`).
- :mod:`bench.compare` (``python -m bench.compare DIR ...``): pools the runs
  ``python -m bench.replay --record DIR`` kept and bounds the p99 difference between policies
  with a bootstrap over (batch, seed) units.
- :mod:`bench.decision` (``python -m bench.decision``): one placement decision's cost on a
  crowded view of 1,000 invokers.
- :mod:`bench.coldstart` (``python -m bench.coldstart``): cold- and warm-start latency through
  the whole runtime, against ``from_pretrained`` and the machine's limits.
- :mod:`bench.loading` (``python -m bench.loading``): checkpoint loading throughput of sllm's
  loader from the SSD and DRAM tiers against other loaders and the machine's limits.
- :mod:`bench.migration` (``python -m bench.migration``): live migration's pause and total time
  against the tokens moved.

Shared by them:

- :mod:`bench.workload`: the synthetic Azure-Functions-like workload of invocations.
- :mod:`bench.stats`: percentiles, medians, bootstrap intervals, text tables, the machine.
- :mod:`bench.pagecache`: evicting checkpoints from the page cache (cold loads come from disk).
"""
