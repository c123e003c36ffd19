"""``python -m controller``: run the controller service."""

from __future__ import annotations

import logging

import click
import uvicorn

from controller.app import ControllerConfig, create_app
from sllm.config import CONTROLLER_PORT, ETCD_CLIENT_PORT, HOST, store_root


@click.command()
@click.option("--host", default=HOST, show_default=True)
@click.option("--port", default=CONTROLLER_PORT, show_default=True, type=int)
@click.option("--etcd", "etcd_endpoint", default=f"{HOST}:{ETCD_CLIENT_PORT}", show_default=True)
@click.option("--store", "store", default=None, help="model store folder [default: $SLLM_HOME/models]")
@click.option("--tick", default=1.0, show_default=True, type=float, help="reconcile period (s)")
@click.option("--log-level", default="info", show_default=True)
def main(host: str, port: int, etcd_endpoint: str, store: str | None, tick: float, log_level: str) -> None:
    """Run the controller: function registry, placement and autoscaling."""
    from pathlib import Path

    from invoker.store import ModelStore

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    models = ModelStore(Path(store) if store else store_root())
    app = create_app(ControllerConfig(etcd_endpoint=etcd_endpoint, model_exists=models.exists, tick_s=tick))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
