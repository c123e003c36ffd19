"""``POST /v1/functions/{name}/invoke``: sllm's own invocation API.

Body: :class:`~sllm.messages.InvokeRequest` (``prompt`` or chat ``messages``, ``max_tokens``,
``temperature``, ``top_p``, ``seed``, ``ignore_eos``, the other sampling fields of
:class:`~sllm.sampling.SamplingOverrides`, ``stream``). The response carries the
activation id in the ``X-Activation-Id`` header.

- ``stream: false``: one JSON body ``{activation_id, function, instance_id, text, finish_reason,
  usage, timings}``.
- ``stream: true``: Server-Sent Events, one ``event: token`` per token
  (``{"index", "token_id", "text"}``), then ``event: done`` with the same body as the non-streaming
  answer. An error after the first event is an ``event: error`` carrying the error envelope.

With ``logprobs: k`` each token event has ``logprobs`` (``{"logprob", "token", "top": [{"token_id",
"token", "logprob"}]}``, :class:`~sllm.messages.TokenLogprobs`: the chosen token's natural-log
probability and the ``k`` most likely tokens'), and the answer a ``logprobs`` list of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway import activation
from gateway.upstream import Upstream
from sllm.errors import SllmError
from sllm.http import read_model
from sllm.messages import InvokeRequest
from sllm.sse import SSE_HEADERS, event


async def invoke(request: Request, upstream: Upstream) -> Response:
    name = request.path_params["name"]
    req = await read_model(request, InvokeRequest)
    act = await activation.start(upstream, name, req.only(), req.overrides())
    headers = {"X-Activation-Id": act.id}
    if not req.stream:
        async for _ in act.tokens():
            pass
        return JSONResponse(act.summary(), headers=headers)

    async def events() -> AsyncIterator[str]:
        try:
            async for tok in act.tokens():
                data = {"index": tok.index, "token_id": tok.token_id, "text": tok.text}
                if tok.logprobs is not None:
                    data["logprobs"] = tok.logprobs.model_dump()
                yield event(data, "token")
        except SllmError as e:
            yield event(e.to_body(), "error")
            return
        yield event(act.summary(), "done")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**SSE_HEADERS, **headers}, background=BackgroundTask(act.aclose))
