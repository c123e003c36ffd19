"""The command ``python -m bench.loading``: its options, the models built, each model's rows
measured (the limits, sllm's loader, the peers) and set against their limit, then the output.
What it measures is the package's docstring (:mod:`bench.loading`), which ``--help`` prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import bench.loading as package
from bench.loading.limits import dram_limit, h2d_limit, ssd_limit
from bench.loading.models import Model, smollm2, synthetic
from bench.loading.native import measure_native
from bench.loading.neighbours import Neighbours
from bench.loading.peers import PEERS, import_peers, measure_peer
from bench.loading.report import header, print_report
from bench.loading.row import Row
from bench.pagecache import drop_caches
from sllm import config
from store.model_store import ModelStore


def _log(s: str) -> None:
    """Progress, on stderr (stdout holds only the rows)."""
    print(s, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    """The options; the description is the package's docstring up to its list of modules."""
    doc = package.__doc__  # None under python -OO
    description = doc.partition(package.LAYOUT_HEADING)[0] if doc else None
    ap = argparse.ArgumentParser(prog="python -m bench.loading", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,synthetic",
                    help="comma-separated: smollm2, synthetic")
    ap.add_argument("--synthetic-gb", type=float, default=2.2, help="size of the synthetic Llama")
    ap.add_argument("--repeat", type=int, default=3, help="timed loads per row (median reported)")
    ap.add_argument("--data", type=Path, default=None,
                    help="where the bench files are kept (default $SLLM_HOME/bench-data)")
    ap.add_argument("--skip-peers", action="store_true", help="only sllm's loader and the limits")
    ap.add_argument("--json", action="store_true", help="one JSON line per row")
    ap.add_argument("--device", default="cpu", help="where the weights go: cpu or cuda:N")
    return ap


def measure_model(m: Model, caches: list[str], repeat: int, device: str, peers: bool,
                  ) -> list[Row]:
    """One model's rows: its limits, sllm's loader, then (with ``peers``) every peer, each
    loader's row set against its limit: rows with tier ``ssd`` against the SSD limit (on a GPU
    the slower of it and h2d), the others against memcpy (on a GPU h2d)."""
    _log(f"{m.name}: limits ...")
    fio, memcpy = ssd_limit(m, repeat), dram_limit(m)
    rows = [fio, memcpy]
    from_memory, from_ssd = memcpy, fio
    if device != "cpu":
        h2d = h2d_limit(m, device)
        rows.append(h2d)
        from_memory = h2d
        from_ssd = min(fio, h2d, key=lambda r: r.gbps or float("inf"))
    _log(f"{m.name}: native_loader ...")
    rows += measure_native(m, caches, repeat, device)
    if peers:
        for name, (module, fn) in PEERS.items():
            _log(f"{m.name}: {name} ...")
            rows += measure_peer(name, module, fn, m, caches, repeat, device)
    for r in rows:
        if r.loader != "limit":
            ref = from_ssd if r.tier == "ssd" else from_memory
            r.limit, r.limit_bps = ref.limit, (ref.gbps or 0) * 1e9
        else:
            r.limit_bps = (r.gbps or 0) * 1e9
    return rows


def main() -> None:
    """Parse the options, build the models, measure each, print the report."""
    args = _parser().parse_args()
    device = args.device
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        sys.exit(f"--device {device}: only cpu, or cuda:N where torch sees a GPU")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = set(names) - {"smollm2", "synthetic"}
    if unknown:
        sys.exit(f"unknown model(s): {', '.join(sorted(unknown))}")
    data = args.data or config.sllm_home() / "bench-data"
    data.mkdir(parents=True, exist_ok=True)

    models: list[Model] = []
    for n in names:
        models.append(smollm2(data, ModelStore(config.store_root()), _log) if n == "smollm2"
                      else synthetic(data, args.synthetic_gb, _log))
    can_drop = drop_caches()
    caches = ["cold", "warm"] if can_drop else ["warm"]
    if not args.skip_peers:  # imports are not part of any loader's time
        import_peers()

    rows: list[Row] = []
    start = Neighbours.now()
    for m in models:
        rows += measure_model(m, caches, args.repeat, device, not args.skip_peers)
    activity = Neighbours.now().since(start)
    print_report(rows, header(rows, device, can_drop, args.repeat, activity), args.json)


if __name__ == "__main__":
    main()
