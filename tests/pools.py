"""Helpers for the instance pool's tests (controller.pool): invoker records and instances made
by hand."""

from __future__ import annotations

from controller.pool import InstancePool, LiveInstance
from sllm.messages import BandwidthRecord, InstanceRecord, InvokerRecord
from sllm.states import InstanceState as S

GIB = 1 << 30


def invoker(inv_id: str, *, memory: int = 2 * GIB, unit: int = GIB, device: str = "cpu"
            ) -> InvokerRecord:
    """A live invoker ``inv_id`` at ``http://<inv_id>`` running instances on ``device``, with
    ``memory`` bytes for instances and measured bandwidths of 10 ``unit``/s (DRAM), 2 (SSD) and
    1 (network)."""
    return InvokerRecord(id=inv_id, url=f"http://{inv_id}", device=device, memory_bytes=memory,
                         started=0.0, pid=1, bandwidths=BandwidthRecord(
                             dram_bps=10 * unit, ssd_bps=2 * unit, network_bps=unit))


def add(pool: InstancePool, iid: str, function: str, model: str, inv_id: str,
        state: S = S.ACTIVE, *, memory: int = GIB, in_flight: int = 0, nbytes: int = GIB
        ) -> LiveInstance:
    """Put instance ``iid`` of ``function`` (``model``, ``memory`` bytes, ``nbytes`` of
    checkpoint) on invoker ``inv_id`` into ``pool``, in ``state`` with ``in_flight`` calls;
    last used at 1.0 s (unix), 100 tokens at most per call."""
    live = LiveInstance(
        record=InstanceRecord(id=iid, function=function, model=model, invoker_id=inv_id,
                              invoker_url=f"http://{inv_id}", state=state, created=0.0,
                              memory_bytes=memory, last_used=1.0),
        in_flight=in_flight, max_tokens=100, nbytes=nbytes)
    pool.instances[iid] = live
    return live
