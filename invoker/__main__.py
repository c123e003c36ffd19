"""``python -m invoker``: run one invoker."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import uvicorn

from invoker.app import create_app
from invoker.config import InvokerConfig, resolve_device
from native_loader import DEFAULT_CHUNK_BYTES, DEFAULT_THREADS, ENGINES
from sllm.config import ETCD_CLIENT_PORT, HOST, INVOKER_BASE_PORT, INVOKER_LEASE_TTL_S, store_root
from sllm.errors import Unavailable
from sllm.manifest import parse_quantity


def default_device() -> str:
    """``cuda:0`` when torch sees a GPU, else ``cpu``."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


@click.command()
@click.option("--id", "invoker_id", default="invoker-0", show_default=True)
@click.option("--host", default=HOST, show_default=True)
@click.option("--port", default=INVOKER_BASE_PORT, show_default=True, type=int)
@click.option("--etcd", "etcd_endpoint", default=f"{HOST}:{ETCD_CLIENT_PORT}", show_default=True)
@click.option("--store", default=None, help="this invoker's local model store [default: $SLLM_HOME/models]")
@click.option("--origin", default=None,
              help="the store root, where checkpoints come from when no peer has a copy "
                   "[default: none; with the default store they are the same]")
@click.option("--lease-ttl", default=INVOKER_LEASE_TTL_S, show_default=True, type=click.IntRange(1, 60),
              help="seconds after its last keep-alive that the controller takes this invoker as dead")
@click.option("--device", default=None, help="device for instances [default: cuda:0 if any, else cpu]")
@click.option("--memory", default="8Gi", show_default=True, help="instance memory budget")
@click.option("--dram-pool", default="4Gi", show_default=True,
              help="DRAM tier budget: host memory caching recently loaded checkpoints (0: none)")
@click.option("--read-threads", default=DEFAULT_THREADS, show_default=True, type=click.IntRange(1, 64),
              help="checkpoint reader threads per load")
@click.option("--read-chunk", default=f"{DEFAULT_CHUNK_BYTES >> 20}Mi", show_default=True,
              help="bytes per checkpoint read request")
@click.option("--no-verify", is_flag=True, help="skip checkpoint checksum verification on load")
@click.option("--advertise-url", default=None,
              help="URL others reach this invoker at [default: http://HOST:PORT]")
@click.option("--network-limit", default=None,
              help="cap checkpoint fetches at this many bytes/s, e.g. 200M (benchmarks: a store "
                   "root standing for a remote object store) [default: no cap]")
@click.option("--compute-threads", default=None, type=click.IntRange(1, 1024),
              help="threads torch computes with (generation); invokers sharing one machine "
                   "should split its cores [default: torch's, one per core]")
@click.option("--io-engine", type=click.Choice(ENGINES), default="auto", show_default=True,
              envvar="SLLM_IO_ENGINE", show_envvar=True,
              help="what reads checkpoints: the C++ engine (native), the Python reader, or auto "
                   "(native if built); an invoker started with native that cannot load it "
                   "says so in its log and /health (degraded)")
@click.option("--log-level", default="info", show_default=True)
def main(invoker_id: str, host: str, port: int, etcd_endpoint: str, store: str | None,
         origin: str | None, lease_ttl: int, device: str | None, memory: str, dram_pool: str, read_threads: int, read_chunk: str,
         no_verify: bool, advertise_url: str | None, network_limit: str | None,
         compute_threads: int | None, io_engine: str, log_level: str) -> None:
    """Run an invoker: loads instances from the model store and serves their generations."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:  # resolved and checked as a load's requested device is
        device = resolve_device(device or "auto", default=default_device())
    except Unavailable as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if compute_threads:
        import torch

        torch.set_num_threads(compute_threads)
    config = InvokerConfig(
        invoker_id=invoker_id, url=advertise_url or f"http://{host}:{port}", etcd_endpoint=etcd_endpoint,
        store_root=Path(store) if store else store_root(), device=device,
        memory_bytes=parse_quantity(memory), verify_checksums=not no_verify,
        dram_pool_bytes=parse_quantity(dram_pool), read_threads=read_threads,
        read_chunk_bytes=parse_quantity(read_chunk), origin=Path(origin) if origin else None,
        lease_ttl_s=lease_ttl,
        network_bps=float(parse_quantity(network_limit)) if network_limit else None,
        io_engine=io_engine,
    )
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
