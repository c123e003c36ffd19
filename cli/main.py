"""The ``sllm`` command line.

::

    sllm up [--detach] [--invokers N]        start the embedded runtime
    sllm down                                stop it
    sllm status                              components, invokers, instances
    sllm model import SOURCE [--name] [--dtype] | list | rm NAME
    sllm fn create -f MANIFEST | update -f MANIFEST | get NAME | list | delete NAME
    sllm fn invoke NAME [--prompt TEXT | --messages JSON] [--max-tokens N] [--no-stream]

Function commands talk to the gateway (``--gateway``, ``$SLLM_GATEWAY``, the running runtime's,
or http://127.0.0.1:8080); model commands work on the local model store (``$SLLM_HOME/models``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml

from cli import launcher
from sllm import config, routes
from sllm.client import GatewayClient
from sllm.errors import InvalidRequest, SllmError, from_body
from sllm.manifest import manifest_to_dict, parse_manifest
from sllm.routes import Gateway as G


def _gateway_url(explicit: str | None) -> str:
    if explicit:
        return explicit.rstrip("/")
    if os.environ.get("SLLM_GATEWAY"):
        return os.environ["SLLM_GATEWAY"].rstrip("/")
    state = launcher.RuntimeState.load(launcher.state_path(config.sllm_home()))
    return state.gateway_url if state else f"http://{config.HOST}:{config.GATEWAY_PORT}"


@click.group()
@click.option("--gateway", envvar="SLLM_GATEWAY", default=None, help="gateway URL")
@click.option("-v", "--verbose", is_flag=True, help="log at INFO level")
@click.pass_context
def cli(ctx: click.Context, gateway: str | None, verbose: bool) -> None:
    """sllm: a serverless runtime for LLM functions with fast cold starts."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    ctx.obj = {"gateway": gateway}


def _api(ctx: click.Context) -> GatewayClient:
    return GatewayClient(_gateway_url(ctx.obj["gateway"]))


# --- runtime ------------------------------------------------------------------------------------


@cli.command()
@click.option("--detach", "-d", is_flag=True, help="return once the runtime is up")
@click.option("--invokers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--invoker-memory", default="8Gi", show_default=True, help="instance memory per invoker")
@click.option("--dram-pool", default="4Gi", show_default=True,
              help="DRAM tier per invoker: host memory caching recently loaded checkpoints")
@click.option("--invoker-threads", default=None, type=click.IntRange(1, 1024),
              help="threads each invoker computes with [default: the cores split evenly "
                   "among the invokers]")
@click.option("--controllers", default=1, show_default=True, type=click.IntRange(1, 5),
              help="controllers: one leads, the others stand by to take over")
@click.option("--placement", default="ours", show_default=True,
              type=click.Choice(["ours", "locality", "least-loaded", "random"]),
              help="placement policy (the others are baselines to compare against)")
@click.option("--migration", default="live", show_default=True,
              type=click.Choice(["live", "preempt", "off"]),
              help="making room from running instances: live migration (ServerlessLLM), "
                   "preemption (restart elsewhere), or never (a baseline to compare against)")
@click.option("--replication/--no-replication", default=True, show_default=True,
              help="copy an in-use function's checkpoint to more invokers ahead of its bursts")
@click.option("--port", default=config.GATEWAY_PORT, show_default=True, help="gateway port")
def up(detach: bool, invokers: int, invoker_memory: str, dram_pool: str,
       invoker_threads: int | None, controllers: int, placement: str, migration: str,
       replication: bool, port: int) -> None:
    """Start the embedded runtime: etcd, controllers, gateway and invokers (each invoker with
    its own model store, DRAM tier and memory budget, as if on its own server)."""
    home = config.sllm_home()
    state = launcher.RuntimeState.load(launcher.state_path(home))
    if state and launcher.is_running(state):
        click.echo(f"sllm is already running: gateway {state.gateway_url}")
        return
    if state:  # stale state from a crash: clean up whatever is left
        launcher.stop(state)
    busy = [p for p in (port, config.CONTROLLER_PORT, config.ETCD_CLIENT_PORT) if launcher.port_in_use(p)]
    if busy:
        raise click.ClickException(f"port(s) {busy} already in use; stop what holds them first")
    click.echo(f"starting sllm in {home} ({invokers} invoker(s)) ...")
    t0 = time.monotonic()
    try:
        state = launcher.start(home, invokers=invokers, gateway_port=port, invoker_memory=invoker_memory,
                              dram_pool=dram_pool, invoker_threads=invoker_threads,
                              controllers=controllers, placement=placement, migration=migration,
                              replication=replication)
    except launcher.RuntimeStartError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"sllm is up in {time.monotonic() - t0:.1f} s: gateway {state.gateway_url}, logs in {home / 'run'}")
    if detach:
        return
    click.echo("press Ctrl-C to stop")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        launcher.stop(state)
        click.echo("sllm stopped")


@cli.command()
def down() -> None:
    """Stop the embedded runtime."""
    state = launcher.RuntimeState.load(launcher.state_path(config.sllm_home()))
    if state is None:
        click.echo("sllm is not running")
        return
    launcher.stop(state)
    click.echo("sllm stopped")


@cli.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show the runtime's components, invokers and instances."""
    api = _api(ctx)
    api.call("GET", routes.HEALTH)
    click.echo(f"gateway     {api.url}  ok")
    for inv in api.call("GET", G.INVOKERS)["invokers"]:
        bw = inv.get("bandwidths") or {}
        speeds = (f" DRAM {bw['dram_bps'] / 1e9:.1f} SSD {bw['ssd_bps'] / 1e9:.2f} "
                  f"net {bw['network_bps'] / 1e9:.2f} GB/s" if bw else "")
        engine = f" io {inv['io_engine']}" if inv.get("io_engine") else ""
        click.echo(f"invoker     {inv['id']:<12} {inv['url']:<26} {inv['device']:<7} "
                   f"memory {inv['used_bytes'] / 2**30:.1f}/{inv['memory_bytes'] / 2**30:.1f} GiB"
                   f"{speeds}{engine}")
    for c in api.call("GET", G.CHECKPOINTS)["checkpoints"]:
        click.echo(f"checkpoint  {c['model']:<28} {c['tier']:<5} on {c['invoker_id']:<12} "
                   f"{c['nbytes'] / 2**20:.1f} MiB")
    instances = api.call("GET", G.INSTANCES)["instances"]
    for i in instances:
        click.echo(f"instance    {i['id']:<28} {i['function']:<20} {i['state']:<8} on {i['invoker_id']}")
    if not instances:
        click.echo("instances   none (scaled to zero)")


# --- models -------------------------------------------------------------------------------------


@cli.group()
def model() -> None:
    """Manage the model store."""


def _store() -> Any:
    from store.model_store import ModelStore

    return ModelStore(config.store_root())


@model.command("import")
@click.argument("source")
@click.option("--name", default=None, help="name in the store [default: from the source]")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="convert weights [default: keep the source's; float32 for GGUF]")
@click.option("--replace", is_flag=True, help="replace a model of the same name")
def model_import(source: str, name: str | None, dtype: str | None, replace: bool) -> None:
    """Import SOURCE (a Hugging Face folder, a .gguf file, or `smollm2`) into the model store."""
    from store.importer import import_model

    os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF conversion bar: the CLI reports one line
    t0 = time.monotonic()
    info = import_model(source, _store(), name=name, dtype=dtype, replace=replace)
    click.echo(f"imported {info.name}: {info.num_tensors} tensors, {info.nbytes / 2**20:.1f} MiB "
               f"{info.dtype} in {time.monotonic() - t0:.1f} s")


@model.command("list")
@click.pass_context
def model_list(ctx: click.Context) -> None:
    """List the models in the store, with the tier each sits in on each invoker when the
    runtime is up (dram: cached in an invoker's DRAM pool; ssd: on its disk only)."""
    infos = _store().list()
    if not infos:
        click.echo("no models; import one with: sllm model import smollm2")
        return
    tiers: dict[str, list[str]] = {}
    try:
        for c in _api(ctx).call("GET", G.CHECKPOINTS)["checkpoints"]:
            tiers.setdefault(c["model"], []).append(f"{c['invoker_id']}:{c['tier']}")
    except SllmError:
        pass  # the runtime is down: the store alone
    for i in infos:
        where = " ".join(sorted(tiers.get(i.name, []))) or "-"
        click.echo(f"{i.name:<32} {i.nbytes / 2**20:>9.1f} MiB  {i.dtype:<9} {where:<24} {i.source}")


@model.command("rm")
@click.argument("name")
def model_rm(name: str) -> None:
    """Remove a model from the store."""
    _store().remove(name)
    click.echo(f"removed {name}")


# --- functions ----------------------------------------------------------------------------------


@cli.group()
def fn() -> None:
    """Deploy, inspect and invoke functions."""


def _read_manifest(path: str) -> dict[str, Any]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return manifest_to_dict(parse_manifest(text))


@fn.command("create")
@click.option("-f", "--file", "path", required=True, help="manifest (YAML), or - for stdin")
@click.pass_context
def fn_create(ctx: click.Context, path: str) -> None:
    """Deploy a new function from a manifest."""
    body = _api(ctx).call("POST", G.FUNCTIONS, json=_read_manifest(path))
    click.echo(f"function {body['name']} created")


@fn.command("update")
@click.option("-f", "--file", "path", required=True, help="manifest (YAML), or - for stdin")
@click.pass_context
def fn_update(ctx: click.Context, path: str) -> None:
    """Replace an existing function's manifest."""
    manifest = _read_manifest(path)
    name = manifest["metadata"]["name"]
    api = _api(ctx)
    api.call("GET", G.FUNCTION, name=name)  # FunctionNotFound if absent
    body = api.call("PUT", G.FUNCTION, json=manifest, name=name)
    click.echo(f"function {body['name']} updated (generation {body['generation']})")


@fn.command("get")
@click.argument("name")
@click.pass_context
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON view")
def fn_get(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show a function: its manifest, its instances, and for each the placement decision with
    every candidate invoker's estimated startup time."""
    view = _api(ctx).call("GET", G.FUNCTION, name=name)
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    click.echo(f"function  {view['name']}  (generation {view['generation']})")
    click.echo(yaml.safe_dump(view["manifest"], sort_keys=False).rstrip())
    if not view["instances"]:
        click.echo("instances: none (scaled to zero)")
    for i in view["instances"]:
        click.echo(f"\ninstance {i['id']}: {i['state']} on {i['invoker_id']}"
                   + (f", loaded from {i['tier']} in {i['load_seconds']:.3f} s" if i.get("load_seconds") else "")
                   + (f", KV cache for {i['kv_budget_tokens']} tokens" if i.get("kv_budget_tokens") is not None else "")
                   + (f" ({i['reason']})" if i.get("reason") else ""))
        for line in placement_lines(i.get("placement")):
            click.echo("  " + line)


def placement_lines(p: dict[str, Any] | None) -> list[str]:
    """A placement decision as text: the policy, the choice, and each candidate's estimate."""
    if not p:
        return ["placement: not recorded (adopted from an older controller)"]
    c = p["chosen"]
    lines = [f"placement ({p['policy']}): {c['invoker_id']}, {c['tier']} tier, estimated "
             f"{c['total_seconds']:.3f} s; {p['considered']} candidate(s), decided in "
             f"{p['decision_seconds'] * 1e3:.2f} ms"
             + (f"; evicted {', '.join(p['evicted'])}" if p["evicted"] else "")]
    lines.append(f"  {'invoker':<14} {'tier':<7} {'queue s':>8} {'load s':>8} {'migrate s':>9} {'total s':>8}")
    for e in p["candidates"]:
        note = " (unload idle)" if e["evicts"] else ""
        note += " (migrate)" if e["migrates"] else ""
        lines.append(f"  {e['invoker_id']:<14} {e['tier']:<7} {e['queue_seconds']:>8.3f} {e['load_seconds']:>8.3f} "
                     f"{e['migration_seconds']:>9.3f} {e['total_seconds']:>8.3f}{note}")
    return lines


@fn.command("list")
@click.pass_context
def fn_list(ctx: click.Context) -> None:
    """List deployed functions."""
    functions = _api(ctx).call("GET", G.FUNCTIONS)["functions"]
    if not functions:
        click.echo("no functions; deploy one with: sllm fn create -f MANIFEST")
    for f in functions:
        states = ",".join(i["state"] for i in f["instances"]) or "scaled to zero"
        click.echo(f"{f['name']:<24} model {f['manifest']['spec']['model']:<28} instances: {states}")


@fn.command("delete")
@click.argument("name")
@click.pass_context
def fn_delete(ctx: click.Context, name: str) -> None:
    """Delete a function."""
    _api(ctx).call("DELETE", G.FUNCTION, name=name)
    click.echo(f"function {name} deleted")


@fn.command("invoke")
@click.argument("name")
@click.option("--prompt", default=None, help="the prompt (a user message on chat models)")
@click.option("--messages", default=None, help='chat messages as JSON: [{"role": "user", "content": "..."}]')
@click.option("--max-tokens", type=click.IntRange(1), default=None)
@click.option("--temperature", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--no-stream", is_flag=True, help="wait for the whole answer")
@click.option("--json", "as_json", is_flag=True, help="print the final result as JSON")
@click.pass_context
def fn_invoke(ctx: click.Context, name: str, prompt: str | None, messages: str | None,
              max_tokens: int | None, temperature: float | None, seed: int | None,
              no_stream: bool, as_json: bool) -> None:
    """Invoke a function and print its answer (streamed token by token by default)."""
    if (prompt is None) == (messages is None):
        raise InvalidRequest("give exactly one of --prompt and --messages")
    body: dict[str, Any] = {}
    if prompt is not None:
        body["prompt"] = prompt
    else:
        try:
            body["messages"] = json.loads(messages or "")
        except ValueError as e:
            raise InvalidRequest(f"--messages is not valid JSON: {e}") from None
    for k, v in (("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed)):
        if v is not None:
            body[k] = v
    api = _api(ctx)
    if no_stream:
        result = api.invoke(name, **body)
    else:
        result = {}
        for event, data in api.invoke_stream(name, **body):
            if event == "token" and not as_json:
                click.echo(data["text"], nl=False)
                sys.stdout.flush()
            elif event == "done":
                result = data
            elif event == "error":
                raise from_body(500, data)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if no_stream:
        click.echo(result["text"], nl=False)
    click.echo()
    t = result.get("timings", {})
    u = result.get("usage", {})
    tpot = t.get("tpot_seconds") or 0.0
    tier = f" from {t['tier']}" if t.get("tier") else ""
    click.echo(
        f"[{t.get('start', '?')} start{tier} | load {t.get('load_seconds', 0):.2f} s | "
        f"TTFT {t.get('ttft_seconds') or 0:.3f} s | {u.get('completion_tokens', 0)} tokens, "
        f"TPOT {tpot * 1000:.1f} ms ({1 / tpot if tpot else 0:.1f} tokens/s) | "
        f"total {t.get('total_seconds', 0):.2f} s | activation {result.get('activation_id', '?')}]",
        err=True,
    )


@cli.group()
def instance() -> None:
    """Manage instances (loaded copies of a function's model)."""


@instance.command("list")
@click.pass_context
def instance_list(ctx: click.Context) -> None:
    """List instances: id, function, invoker, state."""
    for i in _api(ctx).call("GET", G.INSTANCES)["instances"]:
        extra = f" -> {i['migrated_to']}" if i.get("migrated_to") else ""
        click.echo(f"{i['id']:<32} {i['function']:<24} {i['invoker_id']:<12} {i['state']}{extra}")


@instance.command("migrate")
@click.argument("instance_id")
@click.option("--to", "to", default=None, help="the destination invoker's id [default: placement picks]")
@click.option("--generations", type=click.IntRange(min=1), default=None,
              help="move at most this many running generations; the instance serves on "
                   "[default: all, and it drains]")
@click.pass_context
def instance_migrate(ctx: click.Context, instance_id: str, to: str | None,
                     generations: int | None) -> None:
    """Live-migrate an instance: its running generations move to an instance on another invoker
    by their tokens (ServerlessLLM §5); clients' streams go on."""
    body: dict[str, object] = {"to": to} if to else {}
    if generations is not None:
        body["generations"] = generations
    r = _api(ctx).call("POST", G.MIGRATE, json=body, id=instance_id)
    click.echo(f"{instance_id} -> {r['to_instance']} on {r['to_invoker']}: {r['moved']} "
               f"generation(s) moved, {r['finished']} finished first, {r['tokens']} tokens "
               f"recomputed in {r['rounds']} round(s), {r['seconds']:.3f} s"
               + (f" (abandoned: {r['abandoned']})" if r.get("abandoned") else ""))


def main() -> None:
    """Entry point of the ``sllm`` console script: SllmErrors become one line on stderr, exit 1."""
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except SllmError as e:
        click.echo(f"error: {e.message}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
