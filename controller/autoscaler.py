"""The autoscaler's decision: which instances to scale down and how many to start.

Deciding is separate from acting (as in Knative's ``autoscaler.go``): :func:`decide` is a pure
function of ``now`` and plain data; the controller's reconcile loop carries the decision out.

Rules, per function:
- keep-alive / scale to zero: an idle instance whose last invocation ended ``keepAlive`` seconds
  ago or more is stopped, as long as the function keeps at least ``minInstances`` loaded
  instances; the longest-idle go first.
- an instance of a function that no longer exists, or that serves a model the function no
  longer names (after an update), is stopped at once when idle and drained otherwise (it takes
  no new invocations and stops when the last one in flight ends).
- a function with fewer than ``minInstances`` loaded or loading instances gets the difference
  started.

Worked example (the test ``test_worked_example``): function f with keepAlive 60 s and
minInstances 1 has two idle instances, i1 last used at t=0 and i2 at t=30. At now=100 both are
past keep-alive, but only one may go: i1 (idle longest) is stopped, i2 stays. At now=20 neither is
stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sllm.manifest import FunctionManifest
from sllm.states import FINAL, InstanceState


@dataclass(frozen=True)
class InstanceView:
    """What the autoscaler needs to know about one instance."""

    id: str
    function: str
    model: str
    state: InstanceState
    last_used: float  # unix seconds the last invocation ended (or it finished loading)


@dataclass(frozen=True)
class ScaleDecision:
    stop: tuple[str, ...]  # instance ids to unload, in order
    start: Mapping[str, int]  # function name -> instances to start
    drain: tuple[str, ...] = ()  # instance ids to drain (busy ones of gone or changed functions)


def decide(
    now: float, functions: Mapping[str, FunctionManifest], instances: Sequence[InstanceView]
) -> ScaleDecision:
    """Decide one autoscaling pass. ``now`` is unix seconds; see the module docstring."""
    stop: list[str] = []
    drain: list[str] = []
    start: dict[str, int] = {}
    by_fn: dict[str, list[InstanceView]] = {}
    for inst in instances:
        if inst.state in FINAL or inst.state == InstanceState.DRAINING:
            continue
        by_fn.setdefault(inst.function, []).append(inst)

    for fn_name, insts in sorted(by_fn.items()):
        manifest = functions.get(fn_name)
        stale = insts if manifest is None else [i for i in insts if i.model != manifest.spec.model]
        stop.extend(i.id for i in stale if i.state == InstanceState.IDLE)
        drain.extend(i.id for i in stale if i.state != InstanceState.IDLE)
        if manifest is None:
            continue
        current = [i for i in insts if i.model == manifest.spec.model]
        keep_min = manifest.spec.scaling.minInstances
        keep_alive = manifest.spec.scaling.keepAlive
        expired = sorted(
            (i for i in current if i.state == InstanceState.IDLE and now - i.last_used >= keep_alive),
            key=lambda i: i.last_used,
        )
        removable = max(0, len(current) - keep_min)
        stop.extend(i.id for i in expired[:removable])

    for fn_name, manifest in sorted(functions.items()):
        have = sum(1 for i in by_fn.get(fn_name, []) if i.model == manifest.spec.model)
        missing = manifest.spec.scaling.minInstances - have
        if missing > 0:
            start[fn_name] = missing
    return ScaleDecision(stop=tuple(stop), drain=tuple(drain), start=start)
