"""POST /v1/responses through LangChain's ChatOpenAI with `use_responses_api=True`: invoke,
stream, and a tool call with its result sent back, against the real server."""

from __future__ import annotations

from typing import Any, Literal

from tests.integration.conftest import Server


def chat_model(server: Server, **kwargs: Any):
    return server.langchain(use_responses_api=True, **kwargs)


def test_langchain_invoke_and_stream(text_server: Server) -> None:
    llm = chat_model(text_server, max_tokens=6)
    invoked = llm.invoke("hello")
    assert invoked.response_metadata["id"].startswith("resp_")
    assert invoked.response_metadata["status"] in ("completed", "incomplete")
    assert invoked.usage_metadata["output_tokens"] <= 6
    chunks = list(llm.stream("hello"))
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed += chunk
    assert streamed.text == invoked.text


def test_langchain_tool_call_and_result(text_server: Server) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Weather for a city."""
        return "sunny"

    question = HumanMessage("What is the weather in Paris?")
    called = (
        chat_model(text_server, max_tokens=40)
        .bind_tools([get_weather], tool_choice="get_weather")
        .invoke([question])
    )
    [call] = called.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in {"Paris", "Rome"}
    answer = (
        chat_model(text_server, max_tokens=3)
        .bind_tools([get_weather])
        .invoke([question, called, ToolMessage("sunny", tool_call_id=call["id"])])
    )
    assert answer.response_metadata["id"].startswith("resp_") and answer.usage_metadata["input_tokens"] > 0
