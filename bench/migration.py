"""Live migration: the pause a client sees at the handoff and the migration's total time,
against the number of tokens moved (ServerlessLLM §5's multi-round, token-based protocol).

    .venv/bin/python -m bench.migration [--model smollm2-135m-instruct] [--tokens 128,512,1024,2048]
                                        [--reps 3] [--json]

It starts its own runtime (etcd, controller, gateway, two invokers) on free loopback ports, with
the store root of ``$SLLM_HOME`` (importing SmolLM2 first when missing), and deploys one function
with two instances (``minInstances: 2``: one per invoker), greedy, ``--max-tokens`` (256). For
each prompt size it streams a completion (``raw`` prompt of repeated text cut to about that many
tokens), and after ``--at`` (16) generated tokens asks the controller to migrate the instance
(``POST /v1/instances/{id}/migrate``): the destination is the other, idle instance, so no load is
timed, only the migration. Per row (medians over ``--reps``):

- ``moved``: tokens whose KV cache the destination recomputed (prompt + generated at the rounds);
- ``rounds``: prefill rounds the source sent before handing over;
- ``migrate s``: the whole migration as the source invoker timed it (the rounds, then waiting for
  the generation to stop at a token boundary);
- ``pause ms``: the gap the client saw at the handoff: the gateway's time from the last token of
  the source to the first token of the destination (``migrations[0].pause_seconds``);
- ``TPOT ms``: the median gap between tokens before the migration (client side), for scale;
- ``recompute s``: what a stop-and-recompute handoff would pause for instead: the prefill of a
  prompt of the same size on a warm instance (``timings.prefill_seconds`` of a separate run);
- ``same text``: the migrated stream's text equals the text without migration (greedy).

Everything shares the machine's cores: the destination's prefill rounds compete with the source's
decoding, which is the honest setting for a node that runs both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.coldstart import store_with
from bench.stats import median
from cli import launcher
from sllm.sse import parse_events

FILLER = ("Serverless functions start on demand and scale to zero when idle; cold starts load "
          "the checkpoint from the fastest tier that holds it. ")


def prompt_of(words: int) -> str:
    """About ``words`` words of filler text (roughly 1.2 tokens per word on SmolLM2)."""
    base = FILLER.split()
    return " ".join(base[i % len(base)] for i in range(words))


def stream(gateway: str, body: dict[str, Any], on_token: Any = None) -> dict[str, Any]:
    """One streaming invocation: the final event, with the client's token arrival times."""
    times: list[float] = []
    done: dict[str, Any] = {}
    with httpx.Client(base_url=gateway, timeout=600) as c, \
            c.stream("POST", "/v1/functions/bench-mig/invoke", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"invoke failed: {r.status_code} {r.read()!r}")
        for event, data in parse_events(r.iter_lines()):
            if event == "token":
                times.append(time.perf_counter())
                if on_token is not None:
                    on_token(len(times))
            elif event == "done":
                done = data
            elif event == "error":
                raise RuntimeError(f"stream error: {data}")
    done["_times"] = times
    return done


def active_instance(c: httpx.Client) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for i in c.get("/v1/instances").json()["instances"]:
            if i["function"] == "bench-mig" and i["state"] == "active":
                return str(i["id"])
        time.sleep(0.01)
    raise RuntimeError("no active instance")


def measure(gateway: str, words: int, args: argparse.Namespace) -> dict[str, Any]:
    body = {"prompt": prompt_of(words), "raw": True, "max_tokens": args.max_tokens}
    plain = stream(gateway, body)  # the reference text and the warm prefill time
    answer: dict[str, Any] = {}
    reached = threading.Event()

    def on_token(n: int) -> None:
        if n == args.at:
            reached.set()

    def migrator() -> None:
        reached.wait(120)
        with httpx.Client(base_url=gateway, timeout=600) as c:
            r = c.post(f"/v1/instances/{active_instance(c)}/migrate", json={})
            answer.update(r.json() if r.status_code == 200 else {"error": r.text})

    t = threading.Thread(target=migrator)
    t.start()
    moved = stream(gateway, body, on_token)
    t.join()
    if "error" in answer:
        raise RuntimeError(f"migrate failed: {answer['error']}")
    gaps = [b - a for a, b in zip(moved["_times"][: args.at], moved["_times"][1 : args.at])]
    migs = moved["migrations"]
    return {
        "prompt_tokens": moved["usage"]["prompt_tokens"],
        "moved_tokens": answer.get("tokens", 0), "rounds": answer.get("rounds", 0),
        "migrate_s": answer.get("seconds"), "handed_over": answer.get("moved", 0),
        "pause_s": migs[0]["pause_seconds"] if migs else None,
        "tpot_s": median(gaps) if gaps else None,
        "recompute_s": plain["timings"]["prefill_seconds"],
        "same_text": moved["text"] == plain["text"],
    }


def med(rows: list[dict[str, Any]], key: str) -> float | None:
    """The median of ``key`` over the rows that have it (None where none has)."""
    xs = [r[key] for r in rows if r.get(key) is not None]
    return median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.migration", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", default="128,512,1024,2048", help="prompt sizes (about, tokens)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--at", type=int, default=16, help="migrate after this many tokens")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="one JSON line per prompt size")
    args = ap.parse_args()

    store = store_with(args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sllm-bench-mig-") as tmp:
        gport, cport, eport, pport, *iports = launcher.free_ports(6)
        state = launcher.start(
            Path(tmp), invokers=2, gateway_port=gport, controller_port=cport, etcd_port=eport,
            etcd_peer_port=pport, invoker_ports=iports, store=store.root,
            invoker_memory="1Gi", dram_pool="1Gi", stop_at_exit=True,
        )
        try:
            with httpx.Client(base_url=state.gateway_url, timeout=60) as c:
                r = c.put("/v1/functions/bench-mig", json={
                    "apiVersion": "sllm.dev/v1", "kind": "Function",
                    "metadata": {"name": "bench-mig"},
                    "spec": {"model": args.model, "resources": {"device": "auto", "memory": "1Gi"},
                             "scaling": {"minInstances": 2, "maxInstances": 2,
                                         "targetConcurrency": 1, "keepAlive": "600s"},
                             "generation": {"maxTokens": args.max_tokens, "temperature": 0.0}}})
                r.raise_for_status()
                deadline = time.monotonic() + 120
                while sum(i["state"] == "idle" for i in c.get("/v1/instances").json()["instances"]) < 2:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the two instances did not load")
                    time.sleep(0.2)
            for tokens in (int(t) for t in args.tokens.split(",")):
                words = max(8, int(tokens / 1.2))
                runs = [measure(state.gateway_url, words, args) for _ in range(args.reps)]
                row = {"prompt_tokens": runs[0]["prompt_tokens"], "reps": len(runs),
                       **{k: med(runs, k) for k in ("moved_tokens", "rounds", "migrate_s",
                                                    "pause_s", "tpot_s", "recompute_s")},
                       "pause_s_max": max((r["pause_s"] or 0) for r in runs),
                       "handed_over": sum(r["handed_over"] for r in runs),
                       "same_text": all(r["same_text"] for r in runs), "runs": runs}
                rows.append(row)
                if not args.json:
                    print(f"  {row['prompt_tokens']} prompt tokens: done", file=sys.stderr)
        finally:
            launcher.stop(state)
    if args.json:
        for row in rows:
            print(json.dumps({**row, "model": args.model, "at": args.at}))
        return
    print(f"model {args.model}, migrate after {args.at} tokens, medians of {args.reps}")
    print(f"{'prompt':>7} {'moved':>6} {'rounds':>6} {'migrate s':>9} {'pause ms':>9} "
          f"{'max ms':>7} {'TPOT ms':>8} {'recompute s':>11} {'same text':>9}")
    for r in rows:
        print(f"{r['prompt_tokens']:>7} {r['moved_tokens']:>6.0f} {r['rounds']:>6.0f} "
              f"{r['migrate_s']:>9.3f} {r['pause_s'] * 1e3:>9.1f} {r['pause_s_max'] * 1e3:>7.1f} "
              f"{r['tpot_s'] * 1e3:>8.1f} {r['recompute_s']:>11.3f} {r['same_text']!s:>9}")


if __name__ == "__main__":
    main()
