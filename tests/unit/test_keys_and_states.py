"""The etcd key schema and the instance state machine."""

from __future__ import annotations

import itertools

import pytest

from sllm import keys
from sllm.errors import InternalError
from sllm.states import InstanceState, check_transition


def test_keys_build_and_parse_back() -> None:
    for kind in keys.Kind:
        parts = ("abc-1", "m.2")[: keys.PARTS[kind]]
        k = keys.key(kind, *parts)
        assert k.startswith(keys.prefix(kind))
        assert keys.parse(k) == (kind, parts)


def test_checkpoint_keys_have_invoker_and_model() -> None:
    assert keys.key(keys.Kind.CHECKPOINT, "invoker-0", "smollm2") == "/sllm/checkpoints/invoker-0/smollm2"
    with pytest.raises(ValueError):
        keys.key(keys.Kind.CHECKPOINT, "invoker-0")


@pytest.mark.parametrize("bad", ["/other/functions/x", "/sllm/nope/x", "/sllm/functions/", "/sllm/functions/a/b",
                                 "/sllm/checkpoints/a", "/sllm/checkpoints/a/"])
def test_foreign_or_malformed_keys_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        keys.parse(bad)


def test_names_with_slash_cannot_make_keys() -> None:
    with pytest.raises(ValueError):
        keys.key(keys.Kind.FUNCTION, "a/b")


def test_legal_lifecycle() -> None:
    S = InstanceState
    for path in ([S.PENDING, S.LOADING, S.IDLE, S.ACTIVE, S.IDLE, S.STOPPED],
                 [S.PENDING, S.LOADING, S.IDLE, S.ACTIVE, S.MIGRATING, S.ACTIVE, S.DRAINING, S.STOPPED],
                 [S.IDLE, S.MIGRATING, S.IDLE], [S.MIGRATING, S.DRAINING],
                 [S.PENDING, S.LOST], [S.LOADING, S.LOST], [S.ACTIVE, S.LOST], [S.DRAINING, S.LOST]):
        for a, b in itertools.pairwise(path):
            check_transition(a, b)


@pytest.mark.parametrize(("a", "b"), [(InstanceState.STOPPED, InstanceState.IDLE),
                                      (InstanceState.LOST, InstanceState.IDLE),
                                      (InstanceState.PENDING, InstanceState.ACTIVE),
                                      (InstanceState.IDLE, InstanceState.LOADING),
                                      (InstanceState.DRAINING, InstanceState.ACTIVE),
                                      (InstanceState.MIGRATING, InstanceState.LOADING),
                                      (InstanceState.PENDING, InstanceState.MIGRATING)])
def test_illegal_transition_raises(a: InstanceState, b: InstanceState) -> None:
    with pytest.raises(InternalError):
        check_transition(a, b)
