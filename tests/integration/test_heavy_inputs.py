"""Heavy requests never hold back light ones: megabyte prompts are cut before tokenizing and
prepared in a lane of their own; a client's many-prompt completion takes turns with the others."""

from __future__ import annotations

import anyio
import httpx

from tests.integration.conftest import MAX_BODY_BYTES, Server
from tests.integration.helpers import assert_openai_error, chat_body


def test_megabyte_prompts_are_refused_and_do_not_block_a_short_request(text_server: Server) -> None:
    huge = "lorem ipsum dolor sit amet " * ((MAX_BODY_BYTES - 4096) // 27)  # just under the body limit
    results: dict[str, httpx.Response] = {}

    async def send(client: httpx.AsyncClient, key: str, body: dict) -> None:
        results[key] = await client.post("/v1/chat/completions", json=body)

    async def main() -> None:
        async with text_server.async_http() as client:
            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for i in range(3):
                        tg.start_soon(
                            send,
                            client,
                            f"huge{i}",
                            {"messages": [{"role": "user", "content": huge}], "max_tokens": 4},
                        )
                    await anyio.sleep(0.05)
                    tg.start_soon(send, client, "short", chat_body(max_tokens=4))

    anyio.run(main)
    response = results["short"]
    assert response.status_code == 200, response.text
    for i in range(3):
        response = results[f"huge{i}"]
        # Cut to MAX_INPUT_TOKENS (16,384) before tokenizing, which still exceeds the 4,096 context.
        # (How fast: bench.hostile, docs/BENCHMARKS.md.)
        error = assert_openai_error(response, 400, code="context_length_exceeded")
        assert (
            "the prompt alone is 16384 tokens after MAX_INPUT_TOKENS=16384 cut a longer prompt"
            in error["message"]
        )
        assert error["param"] == "messages"


def test_a_long_prompt_is_cut_from_the_left_and_says_so(text_server: Server) -> None:
    prompt = "zebra " * 40_000 + "the end"  # ~240k characters, far past MAX_INPUT_TOKENS
    with text_server.http() as client:
        response = client.post("/tokenize", json={"prompt": prompt})
    assert response.status_code == 200, response.text
    assert response.json()["count"] == 16384  # MAX_INPUT_TOKENS default
    detokenized = client_detokenize(text_server, response.json()["tokens"][-8:])
    assert detokenized.endswith("the end")


def client_detokenize(server: Server, tokens: list[int]) -> str:
    with server.http() as client:
        return client.post("/detokenize", json={"tokens": tokens}).json()["prompt"]


def test_many_prompts_from_one_client_take_turns_with_another_client(text_server: Server) -> None:
    finished: list[str] = []

    async def main() -> None:
        client = text_server.async_openai()
        common = {"model": text_server.model_name, "temperature": 0.0, "extra_body": {"ignore_eos": True}}

        async def flood() -> None:
            # 256 tokens a row: the first wave of 32 rows outlasts the single request's arrival by
            # a wide margin (with 64 it had ended first once, on a slow CI machine).
            await client.completions.create(
                prompt=[f"prompt number {i}" for i in range(64)], max_tokens=256, **common
            )
            finished.append("flood")

        async def single() -> None:
            # Arrives once the 64 prompts are running and queued (two waves of 32 rows).
            async with text_server.async_http() as http:
                while await running_requests(http) == 0:
                    await anyio.sleep(0.01)
            await client.chat.completions.create(
                messages=[{"role": "user", "content": "hi"}], max_tokens=4, **common
            )
            finished.append("single")

        with anyio.fail_after(180):
            async with anyio.create_task_group() as tg:
                tg.start_soon(flood)
                tg.start_soon(single)

    anyio.run(main)
    assert finished == ["single", "flood"]


async def running_requests(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    line = next(line for line in text.splitlines() if line.startswith("vllm:num_requests_running"))
    return float(line.rsplit(" ", 1)[1])
