"""Cold- and warm-start latency of an LLM function through the whole runtime, against the baseline
a user would otherwise run (transformers ``from_pretrained`` on safetensors) and the machine's
limits.

    .venv/bin/python -m bench.coldstart [--model smollm2-135m-instruct] [--cold 3] [--warm 10]
                                        [--max-tokens 64] [--drop-caches] [--json]

It starts its own runtime (etcd, controller, gateway, one invoker) on free loopback ports, reading
the model store of ``$SLLM_HOME`` (importing SmolLM2 first when the model is missing), so it does
not disturb a runtime started with ``sllm up``.

Rows (seconds unless stated):

- ``sllm cold (ssd)`` / ``sllm cold (dram)``: a function's first invocation (no instance
  anywhere), client-side time to first token, split into the gateway/controller hops, the
  checkpoint load (read + verify, then model build) and the prefill. Each round starts a fresh
  runtime: its first cold start reads the checkpoint from SSD into the invoker's DRAM pool, the
  second (another function, same model) finds it in the DRAM tier;
- ``sllm warm``: later invocations: time to first token, time per output token, decode tokens/s;
- ``from_pretrained``: a fresh Python process that imports transformers, loads the same weights
  from safetensors with ``AutoModelForCausalLM.from_pretrained`` onto the device the invoker's
  instances use (``device_map="cuda:0"`` where torch sees a GPU, as the invoker's default
  device; the CUDA context is created inside this load) and produces the first token; the time
  after imports is the fair comparison with sllm's load + first token;
- ``limit``: checkpoint bytes over the measured sequential O_DIRECT read bandwidth of its files
  (the SSD limit, as fio measures it) and over memcpy bandwidth (the DRAM limit).

Before every cold load (sllm's, the baseline's, the limit's) the checkpoint's files are evicted
from the page cache with ``posix_fadvise(DONTNEED)``, so they come from the disk while the
runtime's own code stays cached, as on a node that is up. ``--drop-caches`` drops the whole page
cache instead (root only; then the first invocation also pages Python and torch back in).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.pagecache import drop_caches, evict
from bench.stats import median
from cli import launcher
from invoker.__main__ import default_device
from sllm import config
from sllm.sse import parse_events
from store.importer import import_model
from store.model_store import ModelStore

PROMPT = "What is the capital of France?"


def invoke(gateway: str, function: str, max_tokens: int) -> dict[str, Any]:
    """One streaming invocation; returns the final event plus client-side timings (seconds)."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    done: dict[str, Any] = {}
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "stream": True}
    with httpx.Client(timeout=600) as c, c.stream("POST", f"{gateway}/v1/functions/{function}/invoke", json=body) as r:
        r.raise_for_status()
        for name, data in parse_events(r.iter_lines()):
            if name == "token":
                tokens += 1
                first = first or time.perf_counter()
            elif name == "done":
                done = data
            elif name == "error":
                raise RuntimeError(data)
    end = time.perf_counter()
    done["client_ttft"] = (first or end) - t0
    done["client_total"] = end - t0
    done["client_tokens"] = tokens
    return done


def deploy(gateway: str, name: str, model: str, max_tokens: int) -> None:
    manifest = {
        "apiVersion": "sllm.dev/v1", "kind": "Function", "metadata": {"name": name},
        "spec": {"model": model, "resources": {"memory": "1Gi"},
                 "scaling": {"maxInstances": 1, "keepAlive": "10m"},
                 "generation": {"maxTokens": max_tokens, "temperature": 0.0}},
    }
    httpx.put(f"{gateway}/v1/functions/{name}", json=manifest, timeout=30).raise_for_status()


def instance_record(gateway: str, name: str) -> dict[str, Any]:
    insts = httpx.get(f"{gateway}/v1/functions/{name}", timeout=30).json()["instances"]
    return insts[0] if insts else {}


BASELINE = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t1 = time.perf_counter()
    path, device = sys.argv[1], sys.argv[3]
    kw = {} if device == "cpu" else {"device_map": device}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    tok = AutoTokenizer.from_pretrained(path)
    t2 = time.perf_counter()
    ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = (ids if isinstance(ids, torch.Tensor) else ids["input_ids"]).to(device)
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
    t3 = time.perf_counter()
    print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_token": t3 - t2}))
""")


def baseline(model_dir: Path, safetensors_dir: Path, runs: int, drop: bool,
             device: str) -> list[dict[str, float]]:
    """transformers from_pretrained onto ``device`` from a safetensors copy of the same weights,
    in fresh processes."""
    if not (safetensors_dir / "config.json").exists():
        from invoker.instance import ModelInstance
        from store.checkpoint import load_checkpoint

        ckpt = load_checkpoint(model_dir)
        inst = ModelInstance.from_tensors(model_dir, ckpt.tensors)
        inst.model.save_pretrained(safetensors_dir)
        inst.tokenizer.save_pretrained(safetensors_dir)
    out = []
    for _ in range(runs):
        if drop:
            drop_caches()
        else:
            evict(sorted(safetensors_dir.glob("*.safetensors")))
        r = subprocess.run([sys.executable, "-c", BASELINE, str(safetensors_dir), PROMPT, device],
                           capture_output=True, text=True, check=True)
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


def limits(model_dir: Path, drop: bool) -> dict[str, float]:
    """The machine's limits for this checkpoint (bytes/s): a sequential O_DIRECT read of its data
    files in 4 MiB blocks, as ``fio --direct=1 --rw=read --bs=4M`` does (falling back to buffered
    reads where O_DIRECT is refused), and memcpy into pre-faulted memory."""
    files = sorted(model_dir.glob("data-*.bin"))
    nbytes = sum(f.stat().st_size for f in files)
    if drop:
        drop_caches()
    else:
        evict(files)
    block = mmap.mmap(-1, 4 << 20)  # page-aligned, as O_DIRECT needs
    t0 = time.perf_counter()
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            fd = os.open(f, os.O_RDONLY)
        try:
            while os.readv(fd, [block]) == len(block):
                pass
        finally:
            os.close(fd)
    read_bw = nbytes / (time.perf_counter() - t0)
    src = np.ones(nbytes // 8 + 1, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    t0 = time.perf_counter()
    for _ in range(3):
        np.copyto(dst, src)
    copy_bw = 3 * src.nbytes / (time.perf_counter() - t0)
    return {"bytes": nbytes, "read_bps": read_bw, "memcpy_bps": copy_bw}


def store_with(model: str) -> ModelStore:
    """The store root of ``$SLLM_HOME``, with ``model`` in it: SmolLM2 is imported when missing;
    another missing model ends the benchmark."""
    store = ModelStore(config.store_root())
    if not store.exists(model):
        if model != "smollm2-135m-instruct":
            sys.exit(f"model {model!r} is not in {config.store_root()}")
        import_model("smollm2", store)
    return store


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--cold", type=int, default=3,
                    help="rounds: each starts a fresh runtime and measures one SSD-tier and one "
                         "DRAM-tier cold start")
    ap.add_argument("--dram-pool", default="2Gi", help="the invoker's DRAM tier budget")
    ap.add_argument("--warm", type=int, default=10, help="warm invocations to measure")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--baseline-runs", type=int, default=3)
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--json", action="store_true", help="one JSON line per row")
    args = ap.parse_args()

    device = default_device()  # the invoker's: where the runtime's instances go
    store = store_with(args.model)
    model_dir = store.path(args.model)
    dropped = drop_caches() if args.drop_caches else False

    rows: list[dict[str, Any]] = []
    colds: list[dict[str, Any]] = []
    warms: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sllm-bench-") as tmp:
        home = Path(tmp)
        for round_ in range(args.cold):
            # a fresh runtime each round: its invoker's DRAM pool is empty, so the first cold
            # start reads from SSD (page cache dropped) and the second from the DRAM tier. The
            # invoker's own store holds a copy of the checkpoint already (a node that has it on
            # its SSD), so no transfer from the store root is timed here: bench.replay
            # measures those ("remote" tier).
            local = launcher.invoker_store(home / f"r{round_}", 0) / args.model
            shutil.copytree(model_dir, local)
            data_files = sorted(local.glob("data-*.bin"))
            gport, cport, eport, pport, iport = launcher.free_ports(5)
            state = launcher.start(
                home / f"r{round_}", gateway_port=gport, controller_port=cport,
                etcd_port=eport, etcd_peer_port=pport, invoker_ports=[iport],
                store=config.store_root(), dram_pool=args.dram_pool, stop_at_exit=True,
            )
            try:
                gw = state.gateway_url
                for i in range(2):
                    name = f"bench-{i}"
                    deploy(gw, name, args.model, args.max_tokens)
                    if args.drop_caches:
                        drop_caches()
                    else:
                        evict(data_files)
                    res = invoke(gw, name, args.max_tokens)
                    res["instance"] = instance_record(gw, name)
                    colds.append(res)
                    httpx.delete(f"{gw}/v1/functions/{name}", timeout=30)  # unloads the instance
                if round_ == 0:
                    deploy(gw, "bench-warm", args.model, args.max_tokens)
                    invoke(gw, "bench-warm", args.max_tokens)  # the cold one, not counted
                    warms = [invoke(gw, "bench-warm", args.max_tokens) for _ in range(args.warm)]
            finally:
                launcher.stop(state)
        base = baseline(model_dir, home / "safetensors", args.baseline_runs, args.drop_caches,
                        device)
        lim = limits(model_dir, args.drop_caches)

    ckpt_bytes = lim["bytes"]
    for tier in ("ssd", "dram"):
        runs = [c for c in colds if c["timings"].get("tier") == tier]
        rows.append({
            "row": f"sllm cold ({tier})", "tier": tier, "runs": len(runs),
            "page_cache": "dropped" if dropped else "checkpoint evicted",
            "ttft": median([c["client_ttft"] for c in runs]),
            "ttft_runs": [round(c["client_ttft"], 3) for c in runs],
            "load": median([c["timings"]["load_seconds"] for c in runs]),
            "read": median([c["instance"].get("read_seconds") or float("nan") for c in runs]),
            "invoker_load": median([c["instance"].get("load_seconds") or float("nan") for c in runs]),
            "controller": median([c["timings"]["controller_seconds"] for c in runs]),
            "prefill": median([c["timings"]["prefill_seconds"] for c in runs]),
        })
    decode_tps = [
        (w["client_tokens"] - 1) / (w["client_total"] - w["client_ttft"])
        for w in warms if w["client_tokens"] > 1
    ]
    rows.append({
        "row": "sllm warm", "runs": len(warms),
        "ttft": median([w["client_ttft"] for w in warms]),
        "tpot": median([w["timings"]["tpot_seconds"] or float("nan") for w in warms]),
        "decode_tokens_per_s": median(decode_tps),
        "controller": median([w["timings"]["controller_seconds"] for w in warms]),
        "prefill": median([w["timings"]["prefill_seconds"] for w in warms]),
        "tokens": median([float(w["client_tokens"]) for w in warms]),
    })
    rows.append({
        "row": "from_pretrained", "runs": len(base), "device": device,
        "page_cache": "dropped" if args.drop_caches and dropped else "checkpoint evicted",
        "import": median([b["import"] for b in base]),
        "load": median([b["load"] for b in base]),
        "ttft": median([b["load"] + b["first_token"] for b in base]),
        "ttft_with_import": median([b["import"] + b["load"] + b["first_token"] for b in base]),
    })
    rows.append({
        "row": "limit", "bytes": ckpt_bytes,
        "read_gbps": lim["read_bps"] / 1e9, "read_seconds": ckpt_bytes / lim["read_bps"],
        "memcpy_gbps": lim["memcpy_bps"] / 1e9, "memcpy_seconds": ckpt_bytes / lim["memcpy_bps"],
    })

    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    cs, cd, w, b, lm = rows
    print(f"model {args.model}: {ckpt_bytes / 1e6:.0f} MB checkpoint; before each cold load "
          f"{'the whole page cache was dropped' if dropped else 'its files were evicted from the page cache'}; "
          f"instances and the baseline on {device}")
    print(f"{'':<38}{'seconds':>9}")
    for c in (cs, cd):
        print(f"{'sllm cold start from ' + c['tier'] + ', TTFT':<38}{c['ttft']:>9.3f}  "
              f"(median of {c['runs']}: {c['ttft_runs']})")
        print(f"{'  checkpoint read + verify':<38}{c['read']:>9.3f}  "
              f"({ckpt_bytes / c['read'] / 1e9:.2f} GB/s)")
        print(f"{'  model build':<38}{c['invoker_load'] - c['read']:>9.3f}")
        print(f"{'  controller + hops':<38}{c['controller']:>9.3f}")
        print(f"{'  prefill':<38}{c['prefill']:>9.3f}")
    print(f"{'sllm warm start, TTFT':<38}{w['ttft']:>9.3f}  (controller + hops {w['controller']:.3f})")
    print(f"{'  TPOT':<38}{w['tpot']:>9.4f}  ({w['decode_tokens_per_s']:.1f} tokens/s decode)")
    print(f"{'from_pretrained TTFT (after import)':<38}{b['ttft']:>9.3f}  (load {b['load']:.3f}; "
          f"{b['ttft'] / cs['ttft']:.1f}x sllm's SSD cold start, "
          f"{b['ttft'] / cd['ttft']:.1f}x its DRAM cold start)")
    print(f"{'from_pretrained TTFT incl. import':<38}{b['ttft_with_import']:>9.3f}")
    print(f"{'limit: O_DIRECT read (SSD)':<38}{lm['read_seconds']:>9.3f}  ({lm['read_gbps']:.2f} GB/s)")
    print(f"{'limit: memcpy of checkpoint':<38}{lm['memcpy_seconds']:>9.3f}  ({lm['memcpy_gbps']:.2f} GB/s)")


if __name__ == "__main__":
    main()
