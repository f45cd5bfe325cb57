"""POST /v1/responses: OpenAI's Responses API, for what a server that keeps no state can do.

The request becomes the chat request it amounts to (`app.responses_convert`), which the chat
translation turns into an engine request: the same template, images, tools and grammars as
/v1/chat/completions. The output is built by `app.responses_stream`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post

from app.errors import status_of
from app.responses_convert import chat_form, responses_warnings
from app.responses_stream import OutputBuilder, feed_choice, final_response, response_event_stream
from app.routes import protected
from app.schemas.responses import ResponseObject, ResponsesRequest
from app.services import begin, warning_headers
from app.streaming import collect_answer, sse_response
from app.tool_calls import parser_factory
from scheduler.request import RequestStream


@protected(
    post,
    "/v1/responses",
    summary="Create a model response (Responses API, stateless: text and image+text, tools, streaming or not)",
)
async def create_response(request: Request, data: ResponsesRequest) -> Response:
    call = await begin(request, ResponsesRequest, endpoint="responses", id_prefix="resp", separator="_")
    data, svc, tracker = call.data, call.svc, call.tracker
    with tracker.failures():
        form = chat_form(data)
        with form.responses_params():
            scheduler = svc.require_scheduler()
            tool_format = svc.tool_format()
            engine_request = await svc.translator.chat(form.request, call.request_id, tool_format)
            stream = await scheduler.submit(call.warned(engine_request))
    warnings = responses_warnings(data, stream.warnings)
    headers = warning_headers(warnings)
    tool_parser = parser_factory(form.request, tool_format)
    initial = _initial(data, call.request_id, svc.settings.model_name, stream, warnings)

    if data.stream:

        def on_done(finished_stream, error):
            status = status_of(error) if error else 499 if finished_stream.cancelled else 200
            tracker.finish(status, finished_stream, error.message if error else None)

        events = response_event_stream(stream, initial=initial, tool_parser=tool_parser, on_done=on_done)
        return sse_response(events, headers)

    with form.responses_params():  # a failure during generation names the Responses field too
        collected = await collect_answer(request, stream, tracker)
    choice = collected.choices[0]
    builder = OutputBuilder()
    feed_choice(builder, tool_parser() if tool_parser else None, choice.text, True, choice.logprobs)
    body = final_response(initial, builder, stream, choice.finish_reason, None)
    return Response(body, headers=headers)


def _initial(
    data: ResponsesRequest, response_id: str, model: str, stream: RequestStream, warnings: list[str]
) -> ResponseObject:
    """The response as it starts: the request's settings echoed as the server resolved them
    (sampling defaults filled in, max_output_tokens as lowered to the server's cap), no output."""
    params = stream.request.params
    return ResponseObject(
        id=response_id,
        created_at=int(stream.created),
        status="in_progress",
        model=model,
        output=[],
        parallel_tool_calls=data.parallel_tool_calls is not False,
        tool_choice=_builtins(data.tool_choice) if data.tool_choice is not None else "auto",
        tools=[_builtins(tool) for tool in data.tools or ()],
        text=_text_config(data),
        temperature=params.temperature,
        top_p=params.top_p,
        instructions=data.instructions,
        # The limit the answer was generated under: the request's, or MAX_NEW_TOKENS_DEFAULT
        # (lowered to it, or the default when absent), or the room left in the context.
        max_output_tokens=params.max_tokens,
        metadata=data.metadata or {},
        truncation=data.truncation or "disabled",
        top_logprobs=data.top_logprobs or 0,
        user=data.user,
        warnings=warnings or None,
    )


def _text_config(data: ResponsesRequest) -> dict[str, Any]:
    fmt = data.text.format if data.text is not None else None
    return {"format": _builtins(fmt) if fmt is not None else {"type": "text"}, "verbosity": "medium"}


def _builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)
