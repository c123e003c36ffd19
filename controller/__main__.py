"""``python -m controller``: run the controller service (several may run: one leads)."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import uvicorn

from controller.app import ControllerConfig, create_app
from controller.instances import MIGRATION_MODES
from controller.placement import POLICIES
from sllm.config import CONTROLLER_LEASE_TTL_S, CONTROLLER_PORT, ETCD_CLIENT_PORT, HOST, store_root


@click.command()
@click.option("--id", "controller_id", default="controller-0", show_default=True,
              help="this controller's name in the leader election")
@click.option("--host", default=HOST, show_default=True)
@click.option("--port", default=CONTROLLER_PORT, show_default=True, type=int)
@click.option("--advertise-url", default=None, help="URL others reach it at [default: http://HOST:PORT]")
@click.option("--etcd", "etcd_endpoint", default=f"{HOST}:{ETCD_CLIENT_PORT}", show_default=True)
@click.option("--store", "store", default=None,
              help="the store root: where models are imported [default: $SLLM_HOME/models]")
@click.option("--tick", default=1.0, show_default=True, type=float, help="reconcile period (s)")
@click.option("--placement", "policy", default="ours", show_default=True, type=click.Choice(POLICIES),
              help="placement policy (the others are baselines for bench.replay)")
@click.option("--migration", default="live", show_default=True,
              type=click.Choice(MIGRATION_MODES),
              help="how room is made from running instances: live migration, preemption "
                   "(restart elsewhere from the tokens), or never")
@click.option("--replication/--no-replication", default=True, show_default=True,
              help="copy an in-use function's checkpoint to more invokers in calm periods, until "
                   "those holding it can host maxInstances (controller.replication)")
@click.option("--lease-ttl", default=CONTROLLER_LEASE_TTL_S, show_default=True, type=click.IntRange(1, 60),
              help="seconds a dead leader holds the lead before a standby takes over")
@click.option("--log-level", default="info", show_default=True)
def main(controller_id: str, host: str, port: int, advertise_url: str | None, etcd_endpoint: str,
         store: str | None, tick: float, policy: str, migration: str, replication: bool,
         lease_ttl: int, log_level: str) -> None:
    """Run a controller: function registry, placement and autoscaling."""
    from controller.registry import CheckpointSizes
    from store.model_store import ModelStore

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    models = ModelStore(Path(store) if store else store_root())
    app = create_app(ControllerConfig(
        etcd_endpoint=etcd_endpoint, model_exists=models.exists, model_bytes=CheckpointSizes(models),
        controller_id=controller_id, url=advertise_url or f"http://{host}:{port}", tick_s=tick,
        policy=policy, migration=migration, lease_ttl_s=lease_ttl,  # type: ignore[arg-type]
        replication=replication,
    ))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
