"""The autoscaler's pure decision."""

from __future__ import annotations

from controller.autoscaler import InstanceView, decide
from sllm.manifest import validate_manifest
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
    insts = [InstanceView("i1", "f", "m", S.ACTIVE, 0.0), InstanceView("i2", "f", "m", S.LOADING, 0.0)]
    assert decide(1e9, {"f": f}, insts).stop == ()


def test_min_instances_are_started() -> None:
    f = fn("f", minInstances=2, maxInstances=3)
    d = decide(0.0, {"f": f}, [InstanceView("i1", "f", "m", S.LOADING, 0.0)])
    assert dict(d.start) == {"f": 1}


def test_deleted_function_and_stale_model_instances_stop_when_idle() -> None:
    f = fn("f", model="new")
    insts = [InstanceView("old", "f", "old-model", S.IDLE, 1e9),
             InstanceView("gone", "g", "m", S.IDLE, 1e9),
             InstanceView("busy", "g", "m", S.ACTIVE, 1e9)]
    d = decide(0.0, {"f": f}, insts)
    assert set(d.stop) == {"old", "gone"}
    assert d.drain == ("busy",)  # busy: it finishes what it serves, takes nothing new


def test_draining_instances_count_for_nothing() -> None:
    """A draining instance is on its way out: it neither satisfies minInstances nor is
    stopped twice."""
    f = fn("f", minInstances=1)
    d = decide(0.0, {"f": f}, [InstanceView("d", "f", "m", S.DRAINING, 0.0)])
    assert d.stop == () and d.drain == () and dict(d.start) == {"f": 1}
