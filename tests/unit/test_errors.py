"""The error hierarchy: statuses, envelopes, and errors surviving a trip between components."""

from __future__ import annotations

from sllm import errors


def test_codes_are_snake_case_class_names() -> None:
    assert errors.FunctionNotFound.code() == "function_not_found"
    assert errors.TooManyRequests.code() == "too_many_requests"


def test_envelope_is_openai_shaped() -> None:
    body = errors.ManifestError("spec.model: bad", param="spec.model").to_body()
    assert body == {"error": {"message": "spec.model: bad", "type": "invalid_request_error",
                              "param": "spec.model", "code": "manifest_error"}}


def test_every_error_round_trips_through_its_body() -> None:
    for cls in errors._all_subclasses(errors.SllmError):
        err = cls("boom", param="p")
        back = errors.from_body(err.status, err.to_body())
        assert type(back) is cls and back.message == "boom" and back.param == "p"


def test_unknown_body_becomes_invoker_error() -> None:
    assert isinstance(errors.from_body(500, "<html>"), errors.InvokerError)
    assert isinstance(errors.from_body(404, {"error": {"message": "x", "code": "nope"}}), errors.NotFound)


def test_retry_after_header_is_whole_seconds() -> None:
    assert errors.Unavailable("x", retry_after=0.2).headers() == {"Retry-After": "1"}
    assert errors.Unavailable("x", retry_after=5).headers() == {"Retry-After": "5"}
    assert errors.InvalidRequest("x").headers() == {}
