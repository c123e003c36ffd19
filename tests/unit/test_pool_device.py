"""A function's ``spec.resources.device`` decides which invokers may host its instances
(controller.instances.capacity.Capacity.decide), and its loads ask for that device. The decision is made
in memory: the pool has no etcd client nor invoker client, which deciding never touches."""

from __future__ import annotations

import pytest

from controller.instances import InstancePool
from sllm.errors import Unavailable
from sllm.manifest import FunctionManifest, device_serves
from tests.helpers.cluster import manifest
from tests.helpers.pools import GIB, SilentInvokers, add, invoker, no_invokers

NOW = 1000.0

INVOKERS = [invoker("cpu-a", device="cpu"), invoker("gpu-0", device="cuda:0"),
            invoker("gpu-1", device="cuda:1")]


def fn(device: str) -> FunctionManifest:
    return FunctionManifest.model_validate(
        manifest("f", "m", resources={"device": device, "memory": "1Gi"}))


def pool() -> InstancePool:
    return InstancePool(None, SilentInvokers(), no_invokers, lambda model: GIB, clock=lambda: NOW)


@pytest.mark.parametrize(("device", "hosts"), [
    ("auto", {"cpu-a", "gpu-0", "gpu-1"}),
    ("cpu", {"cpu-a"}),
    ("cuda", {"gpu-0", "gpu-1"}),
    ("cuda:1", {"gpu-1"}),
])
def test_only_invokers_on_the_functions_device_are_candidates(device: str, hosts: set[str]) -> None:
    decision = pool().capacity.decide(fn(device), INVOKERS)
    assert decision is not None
    assert {e.invoker_id for e in decision.candidates} == hosts
    assert decision.considered == len(hosts)
    assert decision.invoker.id in hosts


def test_a_device_no_invoker_has_is_a_503_naming_it() -> None:
    with pytest.raises(Unavailable, match=r"asks for device 'cuda'.*run on cpu") as e:
        pool().capacity.decide(fn("cuda"), [invoker("a"), invoker("b")])
    assert e.value.param == "spec.resources.device"
    assert e.value.retry_after


def test_a_full_invoker_on_the_device_waits_rather_than_going_to_another_device() -> None:
    """The GPU invoker is full of a busy instance; the CPU one is empty: a ``cuda`` function
    waits for the GPU (None), it does not start on the CPU."""
    p = pool()
    add(p, "g-1", "g", "other", "gpu-0", memory=2 * GIB, in_flight=1)
    assert p.capacity.decide(fn("cuda"), [invoker("cpu-a"), invoker("gpu-0", device="cuda:0")],
                    may_migrate=False) is None


def test_device_serves() -> None:
    assert device_serves("auto", "cpu") and device_serves("auto", "cuda:3")
    assert device_serves("cuda", "cuda:3") and not device_serves("cuda", "cpu")
    assert device_serves("cuda:3", "cuda:3") and not device_serves("cuda:3", "cuda:0")
    assert device_serves("cpu", "cpu") and not device_serves("cpu", "cuda:0")
