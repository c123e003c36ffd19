"""The autoscaler's pure decision and the placement policy."""

from __future__ import annotations

from controller.autoscaler import InstanceView, decide
from controller.placement import choose_invoker
from sllm.manifest import validate_manifest
from sllm.messages import InvokerRecord
from sllm.states import InstanceState as S


def fn(name: str, model: str = "m", **scaling: object) -> object:
    return validate_manifest({"apiVersion": "sllm.dev/v1", "kind": "Function", "metadata": {"name": name},
                              "spec": {"model": model, "scaling": {"keepAlive": "60s", **scaling}}})


def test_worked_example() -> None:
    """The module docstring's example: min 1, two idle past keep-alive -> the longer idle goes."""
    f = fn("f", minInstances=1, maxInstances=2)
    insts = [InstanceView("i1", "f", "m", S.IDLE, 0.0), InstanceView("i2", "f", "m", S.IDLE, 30.0)]
    assert decide(100.0, {"f": f}, insts).stop == ("i1",)
    assert decide(20.0, {"f": f}, insts).stop == ()


def test_scale_to_zero_after_keep_alive() -> None:
    f = fn("f")
    insts = [InstanceView("i1", "f", "m", S.IDLE, 0.0)]
    assert decide(59.9, {"f": f}, insts).stop == ()
    assert decide(60.0, {"f": f}, insts).stop == ("i1",)


def test_busy_instances_are_never_stopped() -> None:
    f = fn("f")
    insts = [InstanceView("i1", "f", "m", S.WARM, 0.0), InstanceView("i2", "f", "m", S.LOADING, 0.0)]
    assert decide(1e9, {"f": f}, insts).stop == ()


def test_min_instances_are_started() -> None:
    f = fn("f", minInstances=2, maxInstances=3)
    d = decide(0.0, {"f": f}, [InstanceView("i1", "f", "m", S.LOADING, 0.0)])
    assert dict(d.start) == {"f": 1}


def test_deleted_function_and_stale_model_instances_stop_when_idle() -> None:
    f = fn("f", model="new")
    insts = [InstanceView("old", "f", "old-model", S.IDLE, 1e9),
             InstanceView("gone", "g", "m", S.IDLE, 1e9),
             InstanceView("busy", "g", "m", S.WARM, 1e9)]
    assert set(decide(0.0, {"f": f}, insts).stop) == {"old", "gone"}


def inv(i: str, mem: int) -> InvokerRecord:
    return InvokerRecord(id=i, url=f"http://{i}", device="cpu", memory_bytes=mem, started=0.0, pid=1)


def test_placement_worked_example() -> None:
    gib = 1 << 30
    invokers = [inv("a", 4 * gib), inv("b", 2 * gib)]
    assert choose_invoker(invokers, {"a": 3 * gib}, gib).id == "b"  # type: ignore[union-attr]
    assert choose_invoker(invokers, {"a": 3 * gib}, 3 * gib) is None
    assert choose_invoker(invokers, {}, gib).id == "a"  # type: ignore[union-attr]
