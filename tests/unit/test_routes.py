"""The route table (sllm.routes): templates filled for clients, and the one the services
register."""

from __future__ import annotations

import pytest

from gateway.app import GatewayConfig, create_app
from sllm import routes


def test_path_fills_and_encodes_each_parameter() -> None:
    assert routes.path(routes.Gateway.INVOKE, name="chat") == "/v1/functions/chat/invoke"
    assert routes.path(routes.Invoker.SESSION, id="i-1", session="a b") == \
        "/v1/instances/i-1/migrations/a%20b"
    assert routes.path(routes.Gateway.FUNCTION, name="x/y") == "/v1/functions/x%2Fy"
    # a {name:path} parameter keeps its slashes
    assert routes.path(routes.Invoker.CHECKPOINT_FILE, model="m", path="tokenizer/t.json") == \
        "/v1/checkpoints/m/files/tokenizer/t.json"


def test_path_refuses_a_missing_or_unknown_parameter() -> None:
    with pytest.raises(KeyError):
        routes.path(routes.Gateway.INVOKE)
    with pytest.raises(ValueError, match="no parameter id"):
        routes.path(routes.Gateway.INVOKE, name="chat", id="1")


def test_the_gateway_serves_exactly_its_route_table() -> None:
    app = create_app(GatewayConfig(controller_urls=("http://127.0.0.1:1",)))
    served = {r.path for r in app.routes}  # type: ignore[attr-defined]
    table = {v for k, v in vars(routes.Gateway).items() if k.isupper()}
    assert served == table | {routes.HEALTH, routes.METRICS}
