"""The throughput part of ``python -m bench.engine``: concurrent streams on one instance through
the running runtime, for every scheduling policy, against transformers' padded batched
``generate`` in the same run (the limit for this model on this machine) and against
run-to-completion (sllm before the engine).

It starts its own runtime (etcd, controller, gateway, one invoker) on free loopback ports over
the model store of ``$SLLM_HOME``. For each policy one function (one instance: ``maxInstances:
1``, ``targetConcurrency`` the largest batch) is deployed, warmed up with one call, then sent
``batch`` concurrent streaming calls of the same prompt, each generating exactly ``--tokens``
tokens (``ignore_eos``). ``tokens_per_s`` is every token of the batch over the wall time from
the first call sent to the last stream's end; ``tpot_s`` the median over the streams of (last
token - first token) / (tokens - 1), at the client. The ``generate`` rows run
``model.generate`` in this process on a batch of ``batch`` copies of the same prompt ids (no
padding), greedy, ``min_new_tokens = max_new_tokens``, on the same weights loaded from the same
checkpoint, after the runtime has stopped (so the two never share the cores); before them the
``engine`` rows run the same streams on :class:`~invoker.engine.batching.InstanceEngine` in this
process (fcfs, no HTTP), which splits the engine's cost from the serving path's.

Targets (issue 26): at batch 8, the batching policies reach >= 90% of ``generate`` and >= 3.5x
run-to-completion; at batch 1, within 10% of ``generate``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.coldstart import PROMPT
from bench.engine.serving import delete, deploy, runtime
from bench.stats import median, table
from invoker.engine.batching import InstanceEngine
from invoker.instance import ModelInstance
from sllm import config
from sllm.manifest import Scheduling
from sllm.messages import TokenMessage
from sllm.sampling import SamplingParams
from sllm.sse import parse_events
from store.checkpoint import load_checkpoint

RTC_MAX_BATCH = 8
"""Run-to-completion is measured up to this batch: past it, it is one stream's rate over a
longer wait (the run would only be longer)."""


def invoke(gateway: str, function: str, tokens: int) -> dict[str, float]:
    """One streaming call generating exactly ``tokens`` tokens: its token times (client)."""
    times: list[float] = []
    body = {"prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=900) as c, \
            c.stream("POST", f"{gateway}/v1/functions/{function}/invoke", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"invoke failed: {r.status_code} {r.read()!r}")
        for event, data in parse_events(r.iter_lines()):
            if event == "token":
                times.append(time.perf_counter())
            elif event == "error":
                raise RuntimeError(f"stream error: {data}")
    if len(times) != tokens:
        raise RuntimeError(f"{len(times)} tokens, not {tokens}")
    return {"first": times[0], "last": times[-1], "tpot": (times[-1] - times[0]) / max(1, tokens - 1)}


def through_runtime(args: argparse.Namespace, home: Path) -> list[dict[str, Any]]:
    rows = []
    with runtime(home) as gw:
        for policy in args.policies:
            name = f"bench-{policy}"
            deploy(gw, name, args.model, policy, max(args.batches), args.tokens)
            invoke(gw, name, 4)  # the cold start and the first iterations, not counted
            for batch in args.batches:
                if policy == "run-to-completion" and batch > RTC_MAX_BATCH:
                    continue
                with cf.ThreadPoolExecutor(batch) as pool:
                    t0 = time.perf_counter()
                    runs = list(pool.map(invoke, [gw] * batch, [name] * batch,
                                         [args.tokens] * batch))
                wall = max(r["last"] for r in runs) - t0
                rows.append({"part": "throughput", "policy": policy, "batch": batch,
                             "tokens_per_s": batch * args.tokens / wall,
                             "tpot_s": median([r["tpot"] for r in runs])})
                if not args.json:
                    print(json.dumps(rows[-1]), flush=True)
            delete(gw, name)
    return rows


async def _engine_rows(inst: ModelInstance, args: argparse.Namespace) -> list[dict[str, Any]]:
    eng = InstanceEngine(inst, "bench", Scheduling(policy="fcfs", maxBatch=max(args.batches)),
                         1 << 40)
    ids = inst.encode(prompt=PROMPT)
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)

    async def one() -> float:
        _, stream = eng.open(ids, params)
        times = [time.perf_counter() async for m in stream if isinstance(m, TokenMessage)]
        return (times[-1] - times[0]) / max(1, len(times) - 1)

    rows = []
    try:
        await asyncio.gather(*(one() for _ in range(2)))  # warm-up
        for batch in args.batches:
            t0 = time.perf_counter()
            tpots = await asyncio.gather(*(one() for _ in range(batch)))
            wall = time.perf_counter() - t0
            rows.append({"part": "throughput", "policy": "engine", "batch": batch,
                         "tokens_per_s": batch * args.tokens / wall, "tpot_s": median(tpots)})
    finally:
        eng.close()
    return rows


def in_process(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The engine alone in this process (fcfs, no HTTP: what the serving path costs is the
    difference with the runtime's rows), then transformers' ``generate``, on one load of the
    model's weights."""
    path = config.store_root() / args.model
    ckpt = load_checkpoint(path, device="cpu")
    inst = ModelInstance.from_tensors(path, ckpt.tensors, device="cpu")
    rows = asyncio.run(_engine_rows(inst, args))
    inst.model.set_attn_implementation("sdpa")  # generate as a user runs it
    ids = torch.tensor([inst.encode(prompt=PROMPT)])
    with torch.inference_mode():
        inst.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                            do_sample=False)  # warm-up
        for batch in args.batches:
            x = ids.repeat(batch, 1)
            t0 = time.perf_counter()
            inst.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                max_new_tokens=args.tokens, min_new_tokens=args.tokens)
            wall = time.perf_counter() - t0
            rows.append({"part": "throughput", "policy": "generate", "batch": batch,
                         "tokens_per_s": batch * args.tokens / wall,
                         "tpot_s": wall / args.tokens})
    ckpt.release()
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every policy through the runtime, then the engine alone and ``generate``: the part's
    rows."""
    with tempfile.TemporaryDirectory(prefix="sllm-bench-engine-") as tmp:
        rows = through_runtime(args, Path(tmp))
    return rows + in_process(args)


def report(rows: list[dict[str, Any]]) -> str:
    """The rows as a table, with each row's share of ``generate`` and its speed-up over
    run-to-completion at the same batch."""
    limit = {r["batch"]: r["tokens_per_s"] for r in rows if r["policy"] == "generate"}
    rtc = {r["batch"]: r["tokens_per_s"] for r in rows if r["policy"] == "run-to-completion"}
    shown = [{**r, "of_generate": r["tokens_per_s"] / limit[r["batch"]] if r["batch"] in limit
              else float("nan"),
              "x_rtc": r["tokens_per_s"] / rtc[r["batch"]] if r["batch"] in rtc else float("nan")}
             for r in rows]
    return table(shown, [("policy", "policy", "s"), ("batch", "batch", "d"),
                         ("tokens/s", "tokens_per_s", ".1f"), ("TPOT s", "tpot_s", ".3f"),
                         ("of generate", "of_generate", ".2f"), ("x rtc", "x_rtc", ".2f")])
