"""The iteration cost of a real model on this machine, for the simulation: packed forward passes
(:func:`invoker.engine.kv.forward_packed`, the engine's own) over prefill chunks and decodes in
several mixes, fitted by least squares to ``fixed + per prefill token * prefill tokens + per
decode * decodes`` (:class:`bench.engine.simulate.Cost`). Decodes attend to 128 cached
positions each (the scaled trace's typical context)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bench.engine.simulate import Cost
from invoker.engine.kv import PackedBatch, SequenceKV, enable, forward_packed
from invoker.instance import ModelInstance
from store.checkpoint import load_checkpoint

MIXES = [(0, 1), (0, 4), (0, 8), (0, 16), (32, 0), (128, 0), (256, 0), (128, 8), (64, 16),
         (256, 4)]
"""(prefill tokens, decodes) of the profiled iterations."""

CONTEXT = 128


def load(path: Path) -> ModelInstance:
    """The model of the checkpoint at ``path``, on the CPU, as the invoker builds it."""
    ckpt = load_checkpoint(path, device="cpu")
    return ModelInstance.from_tensors(path, ckpt.tensors, device="cpu")


def iteration_seconds(inst: ModelInstance, prefill: int, decodes: int, repeats: int = 3) -> float:
    """The median time of ``repeats`` packed forward passes over one prefill chunk of
    ``prefill`` tokens and ``decodes`` decodes (seconds)."""
    model = inst.model
    enable(model)
    shape, limit = inst.kv_shape, CONTEXT + prefill + 8
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        kvs, counts = [], []
        for _ in range(decodes):
            kv = SequenceKV(shape, limit, model.dtype, inst.device)
            kv.reserve(CONTEXT + 1)
            assert kv.data is not None
            kv.data.zero_()  # (values of no interest; zeros, not whatever memory held)
            kv.length = CONTEXT
            kvs.append(kv)
            counts.append(1)
        if prefill:
            kvs.append(SequenceKV(shape, limit, model.dtype, inst.device))
            counts.append(prefill)
        ids = [5] * sum(counts)
        keep = [*range(decodes), *([len(ids) - 1] if prefill else [])]  # each one's last
        with torch.inference_mode():
            t0 = time.perf_counter()
            forward_packed(model, ids, PackedBatch(kvs, counts), keep)
            times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def profile(inst: ModelInstance) -> tuple[Cost, list[dict[str, float]]]:
    """The fitted cost, and each mix's measured and fitted seconds."""
    rows = [(p, d, iteration_seconds(inst, p, d)) for p, d in MIXES]
    x = np.array([[1.0, p, d] for p, d, _ in rows])
    y = np.array([s for _, _, s in rows])
    (fixed, per_token, per_decode), *_ = np.linalg.lstsq(x, y, rcond=None)
    cost = Cost(float(fixed), float(per_token), float(per_decode), name="cpu (profiled here)")
    return cost, [{"prefill": p, "decodes": d, "seconds": s, "fitted": cost.seconds(p, d)}
                  for p, d, s in rows]
