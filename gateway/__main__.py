"""``python -m gateway``: run the gateway."""

from __future__ import annotations

import logging
import os

import click
import uvicorn

from gateway.app import GatewayConfig, create_app
from sllm.config import CONTROLLER_PORT, GATEWAY_KEEPALIVE_S, GATEWAY_PORT, HOST


@click.command()
@click.option("--host", default=HOST, show_default=True)
@click.option("--port", default=GATEWAY_PORT, show_default=True, type=int)
@click.option("--controller", "controller_urls", multiple=True,
              default=[f"http://{HOST}:{CONTROLLER_PORT}"], show_default=True,
              help="a controller's URL; repeat for standbys (the gateway follows the leader)")
@click.option("--api-key", default=lambda: os.environ.get("SLLM_API_KEY"),
              help="require this bearer key on /v1 routes [default: $SLLM_API_KEY, none]")
@click.option("--log-level", default="info", show_default=True)
def main(host: str, port: int, controller_urls: tuple[str, ...], api_key: str | None, log_level: str) -> None:
    """Run the gateway: auth, routing, SSE streaming, OpenAI-compatible API."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(GatewayConfig(controller_urls=tuple(controller_urls), api_key=api_key or None))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                timeout_keep_alive=GATEWAY_KEEPALIVE_S)


if __name__ == "__main__":
    main()
