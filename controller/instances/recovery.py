"""Recovery: rebuilding the instance table after a controller (re)starts leading, from etcd's
records and what the live invokers report having loaded.

- loaded instances their invoker still reports: adopted as idle (draining ones are stopped);
- pending and loading instances on a live invoker: their load is sent again (an invoker joins a
  load of the same instance already in progress);
- instances on an invoker that is gone: lost;
- lost records: kept until their retention ends; everything else: deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from controller.instances.lifecycle import Lifecycle
from controller.instances.table import InstanceTable, LiveInstance
from sllm.manifest import Scheduling
from sllm.messages import InstanceRecord
from sllm.states import FINAL, STARTING, InstanceState

log = logging.getLogger(__name__)

S = InstanceState


def adopt(table: InstanceTable, lifecycle: Lifecycle, records: Iterable[InstanceRecord],
          reported: Mapping[str, set[str]], max_tokens: Mapping[str, int],
          scheduling: Mapping[str, Scheduling] | None = None) -> list[tuple[str, str, str]]:
    """Rebuild ``table`` from ``records`` (see the module docstring); loads to send again and
    stops of draining instances run in the background.

    Args:
        records: instance records from etcd.
        reported: live invoker id -> ids of the instances it has loaded.
        max_tokens: function name -> its maxTokens (for migration estimates).
        scheduling: function name -> its spec.scheduling (what a load sent again asks for;
            the default for a function not named).

    Returns:
        Orphans, ``(invoker id, instance id, why)``: instances an invoker has that no record
        names; the caller unloads them.
    """
    known: set[str] = set()
    for rec in records:
        known.add(rec.id)
        if rec.state == S.LOST:
            table.lost[rec.id] = rec
            continue
        if rec.state in FINAL:
            table.mark(rec.id)
            continue
        live = LiveInstance(rec, max_tokens=max_tokens.get(rec.function, 0),
                            scheduling=(scheduling or {}).get(rec.function, Scheduling()))
        if rec.invoker_id not in reported:
            table.instances[rec.id] = live
            table.lose_invoker(rec.invoker_id, f"invoker {rec.invoker_id} gone while no "
                               "controller led")
        elif rec.state in STARTING:
            table.instances[rec.id] = live
            log.info("resending the pending load of %s", rec.id)
            table.spawn(lifecycle.load(live))
        elif rec.id in reported[rec.invoker_id]:
            live.loaded.set()
            table.instances[rec.id] = live
            if rec.state == S.DRAINING:
                table.spawn(lifecycle.stop(rec.id, reason=rec.reason or "drained"))
                continue
            # invocations in flight are the gateway's; it releases them to us
            table.set_state(live, S.IDLE if rec.state == S.ACTIVE else rec.state)
            log.info("adopted instance %s of %s", rec.id, rec.function)
        else:
            log.info("instance %s is no longer on %s; forgetting it", rec.id, rec.invoker_id)
            table.mark(rec.id)
    orphans = [(inv, iid, "no instance record names it")
               for inv, ids in reported.items() for iid in sorted(ids - known)]
    table.wake_flusher()
    return orphans
