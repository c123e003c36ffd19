"""The real-cluster driver of ``python -m bench.replay``: for each seed, policy and migration
mode a fresh local runtime (:func:`cli.launcher.start`) with the checkpoints pre-placed and the
functions deployed, the workload (:mod:`bench.workload`) replayed against its gateway over HTTP,
streaming, the runtime stopped, and one row computed from what the client saw and what the
controller logged (:mod:`bench.replay.analysis`); with several seeds, pooled rows as well.

The runtime, the models, the pre-placement and the row's figures are described in
:mod:`bench.replay.__main__` (``python -m bench.replay --help``). Times are seconds, those of a
:class:`~bench.replay.analysis.Result` from the replay's start; sizes are bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.pagecache import evict as evict_from_page_cache
from bench.replay.analysis import Result, classify, read_controller_log, summarize
from bench.workload import Arrival, TraceModel, generate
from cli import launcher
from controller.placement import Policy
from sllm import config
from sllm.sse import aparse_events

MODEL_PREFIX = "replay-v1-"
"""Models are named ``replay-v1-<i>``; the version changes when their shape does."""

INSTANCE_MEMORY = 192 << 20
"""``resources.memory`` of every function (bytes): above the largest default checkpoint (151
MB). ``--big`` models reserve the same, so an invoker hosts ``--per-invoker`` instances of any
size (the slots, not the bytes, run out)."""

REAL_TRACE = TraceModel(prompt_median_words=24, prompt_sigma=0.6, prompt_max_words=128,
                        output_median_tokens=12, output_sigma=0.7, output_max_tokens=48)
"""Shorter prompts and answers than the simulation's: every token is computed on 2 CPU cores."""


def bench_dir() -> Path:
    return config.sllm_home() / "bench-replay"


def build_models(root: Path, count: int, big: int = 0, big_layers: int = 40
                 ) -> list[tuple[str, int]]:
    """``count`` random-weight llamas in the store at ``root`` (kept: built once), as
    (name, checkpoint bytes). Model ``i`` has 2 + i % 5 layers of hidden size 768; with
    ``big``, models 0 .. big-1 have ``big_layers`` layers instead (about 25 MB per layer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from store.importer import import_model
    from store.model_store import ModelStore
    from tests.helpers.tiny_model import make_tokenizer

    hf_logging.disable_progress_bar()
    store = ModelStore(root)
    out = []
    for i in range(count):
        layers = big_layers if i < big else 2 + i % 5
        name = f"{MODEL_PREFIX}{i}" if i >= big else f"{MODEL_PREFIX}big{layers}-{i}"
        if not store.exists(name):
            print(f"building model {name} into {root}", file=sys.stderr)
            tok = make_tokenizer()
            cfg = LlamaConfig(
                vocab_size=len(tok), hidden_size=768, intermediate_size=2048,
                num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=4,
                max_position_embeddings=1024, tie_word_embeddings=True,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            torch.manual_seed(1000 + i)
            model = LlamaForCausalLM(cfg).eval()
            with tempfile.TemporaryDirectory(prefix="sllm-replay-") as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                import_model(tmp, store, name=name)
        out.append((name, store.get(name).nbytes))
    return out


def manifest(name: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"apiVersion": "sllm.dev/v1", "kind": "Function", "metadata": {"name": name},
            "spec": {"model": model,
                     "resources": {"device": "auto", "memory": INSTANCE_MEMORY},
                     "scaling": {"minInstances": 0, "maxInstances": args.max_instances,
                                 "targetConcurrency": 1, "keepAlive": f"{args.keep_alive:g}s",
                                 "queueTimeout": "120s"},
                     "generation": {"maxTokens": max(64, args.output_max), "temperature": 0.0}}}


async def _invoke(client: httpx.AsyncClient, res: Result, t0: float) -> None:
    a = res.arrival
    body = {"prompt": a.prompt, "max_tokens": a.max_tokens, "stream": True}
    res.sent = time.perf_counter() - t0
    try:
        async with client.stream("POST", f"/v1/functions/{res.function}/invoke", json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:300]
                return
            async for name, data in aparse_events(r.aiter_lines()):
                if name == "token":
                    res.tokens += 1
                    if res.first is None:
                        res.first = time.perf_counter() - t0
                elif name == "done":
                    res.done = data
                elif name == "error":
                    res.status, res.error = "stream", json.dumps(data)[:300]
    except httpx.HTTPError as e:
        res.status, res.error = "conn", f"{type(e).__name__}: {e}"[:300]
    finally:
        res.end = time.perf_counter() - t0


async def replay(gateway: str, arrivals: list[Arrival], names: list[str]) -> list[Result]:
    """Send every arrival at its trace time (streaming) and read its answer to the end."""
    results = [Result(a, names[a.function_index]) for a in arrivals]
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=gateway, timeout=300.0, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        for res in results:
            delay = res.arrival.t - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_invoke(client, res, t0)))
        await asyncio.gather(*tasks)
    return results


def cpu_seconds(state: launcher.RuntimeState) -> dict[str, float]:
    """CPU seconds (user + system) each kind of process of a running runtime has used so far:
    ``controller``, ``gateway``, ``invokers`` (summed) and ``etcd``, from ``/proc/<pid>/stat``
    (Linux; empty elsewhere)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for p in state.processes:
        try:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        kind = "invokers" if p.name.startswith("invoker") else p.name.split("-")[0]
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return {k: round(v, 2) for k, v in sorted(out.items())}


def preplace(home: Path, models: list[tuple[str, int]], invokers: int, copies: int,
             seed: int) -> None:
    """Put each model's checkpoint in the local stores (the SSD tier) of ``copies`` invokers of
    the runtime at ``home``, drawn at random from ``seed``, so every policy starts from the same
    cluster, one that has served these models before (as the simulation does). The copies are
    hard links to the store root's files (a plain copy where a link is impossible): the loader
    reads with O_DIRECT, so a read costs the same either way.
    """
    rng = random.Random(seed)
    for name, _ in models:
        for i in sorted(rng.sample(range(invokers), min(copies, invokers))):
            shutil.copytree(bench_dir() / "models" / name, launcher.invoker_store(home, i) / name,
                            copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_cluster_policy(policy: Policy, migration: str, args: argparse.Namespace,
                       models: list[tuple[str, int]], arrivals: list[Arrival],
                       seed: int) -> tuple[dict[str, Any], _Measured]:
    """Start a fresh runtime with ``policy`` and ``migration`` (the checkpoints pre-placed by
    :func:`preplace` from ``seed``), deploy the functions, replay, stop. Returns the row and
    what it was computed from (for pooling runs)."""
    home = bench_dir() / f"run-{policy}-{migration}-seed{seed}"
    shutil.rmtree(home, ignore_errors=True)
    preplace(home, models, args.invokers, args.ssd_copies, seed)
    # every policy's first copies come from the disk, not from the page cache the previous left
    evict_from_page_cache((bench_dir() / "models").glob("*/data-*.bin"))
    memory = args.per_invoker * INSTANCE_MEMORY
    ports = launcher.free_ports(4 + args.invokers)
    t0 = time.perf_counter()
    replication = args.replication == "all" or (args.replication == "ours" and policy == "ours")
    state = launcher.start(
        home, invokers=args.invokers, placement=policy, migration=migration,
        replication=replication,
        gateway_port=ports[0], controller_port=ports[1], etcd_port=ports[2],
        etcd_peer_port=ports[3], invoker_ports=ports[4:],
        store=bench_dir() / "models", invoker_memory=f"{memory >> 20}Mi",
        dram_pool=args.dram_pool, tick_s=0.5, stop_at_exit=True,
        invoker_network_limit=args.network_limit, invoker_threads=args.invoker_threads,
    )
    startup_s = time.perf_counter() - t0
    names = [f"replay-{i}" for i in range(len(models))]
    try:
        with httpx.Client(base_url=state.gateway_url, timeout=60.0) as c:
            for name, (model, _) in zip(names, models, strict=True):
                r = c.put(f"/v1/functions/{name}", json=manifest(name, model, args))
                if r.status_code not in (200, 201):
                    raise RuntimeError(f"deploying {name} failed: {r.status_code} {r.text}")
        t0 = time.perf_counter()
        cpu0 = cpu_seconds(state)
        results = asyncio.run(replay(state.gateway_url, arrivals, names))
        replay_s = time.perf_counter() - t0
        cpu = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu_seconds(state).items()}
    finally:
        launcher.stop(state)
        for bulky in ("invokers", "etcd"):  # checkpoint copies, etcd's preallocated WAL: not logs
            shutil.rmtree(home / bulky, ignore_errors=True)
    reasons, decided, replicated = read_controller_log(home / "run" / "controller.log")
    # causes need each function's whole history; the figures count arrivals after the warm-up
    colds = [r for r in sorted(results, key=lambda r: r.sent) if r.ok and r.cold]
    causes = [c for r, c in zip(colds, classify(results, reasons, args.keep_alive), strict=True)
              if r.arrival.t >= args.warmup]
    measured = _Measured([r for r in results if r.arrival.t >= args.warmup], causes, decided)
    kept = None if args.record is None else Path(args.record) / f"{policy}-{migration}-seed{seed}"
    row = {"mode": "cluster", "policy": policy, "migration": migration, "seed": seed,
           **summarize(measured.results, measured.causes, measured.decided),
           "replication": replication,
           "replicated": replicated,
           "cpu_s": cpu,
           "startup_s": startup_s, "replay_s": replay_s,
           "logs": str(home / "run" if kept is None else kept / "logs")}
    if kept is not None:
        record_run(kept, home, results, {**row, "warmup": args.warmup})
    return row, measured


def record_run(dest: Path, home: Path, results: list[Result], row: dict[str, Any]) -> None:
    """Keep one run at ``dest`` (replaced if there): a copy of its logs (``dest/logs``), its row
    (``dest/row.json``, with ``warmup``) and ``dest/invocations.jsonl``, one line per invocation
    (times in seconds from the replay's start; ``ttft_s`` None for a failed call), including
    those before the warm-up."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(home / "run", dest / "logs")
    (dest / "row.json").write_text(json.dumps(row, default=str) + "\n")
    with (dest / "invocations.jsonl").open("w") as f:
        for r in results:
            f.write(json.dumps({
                "arrival_s": round(r.arrival.t, 6), "sent_s": round(r.sent, 6),
                "function": r.function, "status": r.status, "ok": r.ok,
                "ttft_s": None if r.first is None or not r.ok else round(r.first - r.sent, 6),
                "ttlt_s": round(r.end - r.sent, 6), "tokens": r.tokens,
                "instance_id": r.done.get("instance_id"), "timings": r.timings,
                "migrations": len(r.done.get("migrations", [])),
            }) + "\n")


@dataclass
class _Measured:
    """One run's measured invocations, their cold-start causes and the decision times (ms)."""

    results: list[Result]
    causes: list[str]
    decided: list[float]


def run_order(policies: list[Policy], seed: int) -> list[Policy]:
    """The order in which seed ``seed``'s runs replay: ``policies`` rotated left by ``seed``, so
    over any ``len(policies)`` consecutive seeds each policy runs first once, whichever seed a
    batch starts from."""
    k = seed % len(policies)
    return policies[k:] + policies[:k]


def run_cluster(args: argparse.Namespace, policies: list[Policy]) -> list[dict[str, Any]]:
    """One row per seed, policy and migration mode; with several seeds also one ``pooled`` row
    per policy and mode: the figures over the invocations of all its runs (the p99 of seeds 1-3,
    885 invocations, is about the 9th-worst rather than one run's 3rd-worst, so one burst weighs
    less), with each run's p99 in ``run_p99_s``. Seed ``s`` runs the policies rotated by
    ``s``, so no policy always runs first or last while the machine's speed drifts, in one batch
    or across batches. Unless ``--prime`` is 0, a replay of that many trace seconds, neither
    measured nor recorded, comes first, so the first measured run does not meet a machine that
    has been idle (docs/benchmarks.md section 4, batch U)."""
    models = build_models(bench_dir() / "models", args.functions, args.big, args.big_layers)
    model = TraceModel(**{**REAL_TRACE.__dict__, "zipf_s": args.zipf_s, "cv": args.cv,
                          "output_median_tokens": args.output_median,
                          "output_max_tokens": args.output_max})
    rows = []
    migrations = args.migrations.split(",")
    if args.prime > 0:
        prime = argparse.Namespace(**{**vars(args), "record": None})
        seed = max(args.seeds) + 1  # a trace no measured run replays
        if not args.json:
            print(f"  priming: {policies[0]} replays {args.prime:g} s, not measured",
                  file=sys.stderr)
        run_cluster_policy(policies[0], migrations[0], prime, models,
                           generate(args.functions, args.prime, args.rate, seed, model), seed)
    pooled: dict[tuple[Policy, str], list[tuple[dict[str, Any], _Measured]]] = {}
    for seed in args.seeds:
        arrivals = generate(args.functions, args.duration, args.rate, seed, model)
        for policy in run_order(policies, seed):
            for migration in migrations:
                if not args.json:
                    print(f"  seed {seed}, {policy} (migration {migration}): starting a runtime, "
                          f"replaying {len(arrivals)} invocations over {args.duration:g} s",
                          file=sys.stderr)
                row, measured = run_cluster_policy(policy, migration, args, models, arrivals, seed)
                row["checkpoint_mb"] = [round(b / 1e6) for _, b in models]
                rows.append(row)
                pooled.setdefault((policy, migration), []).append((row, measured))
    if len(args.seeds) > 1:
        for (policy, migration), runs in pooled.items():
            rows.append({
                "mode": "cluster", "policy": policy, "migration": migration, "seed": "pooled",
                **summarize([r for _, m in runs for r in m.results],
                            [c for _, m in runs for c in m.causes],
                            [d for _, m in runs for d in m.decided]),
                "run_p99_s": [row["ttft_p99_s"] for row, _ in runs],
                "replication": runs[0][0]["replication"],
                "replicated": sum(row["replicated"] for row, _ in runs),
                "cpu_s": {k: round(sum(row["cpu_s"].get(k, 0.0) for row, _ in runs), 2)
                          for k in runs[0][0]["cpu_s"]},
                "checkpoint_mb": runs[0][0]["checkpoint_mb"],
            })
    return rows
