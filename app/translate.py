"""Wire Structs -> engine requests. The only place that knows both.

Applies the server's defaults (settings), the model-name contract, and fetches images referenced
by URL (async, SSRF-guarded) so that nothing below the app sees a URL or a msgspec Struct.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import httpx
import msgspec

from app.chat_messages import chat_messages
from app.errors import ModelNotFoundError
from app.generate_params import refuse_unsupported, tgi_grammar
from app.media import ImageFetchPolicy, load_image_bytes
from app.schemas.chat import ChatCompletionRequest, ChatMessage, NamedToolChoice
from app.schemas.completions import CompletionRequest, PromptElement
from app.schemas.generate import GenerateRequest
from app.schemas.templates import ApplyTemplateRequest
from app.schemas.tokenize import TokenizeRequest
from app.settings import Settings
from app.structured import check_size, output_grammar
from app.tool_calls import HERMES, ToolCallFormat, forces_tool_calls, parser_factory
from scheduler.errors import EngineError, InvalidRequestError
from scheduler.request import EngineRequest, GrammarSpec, PromptInput, SamplingParams

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
# OpenAI's max_tokens when a /v1/completions request sends none.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# OpenAI's ^[a-zA-Z0-9_-]{1,64}$, with the dots and colons of namespaced (MCP) tools as vLLM takes them.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class Translator:
    def __init__(
        self, settings: Settings, image_policy: ImageFetchPolicy, image_client: httpx.AsyncClient | None
    ) -> None:
        self.settings = settings
        self.image_policy = image_policy
        self.image_client = image_client
        # Whether the served model takes images (None until a replica is ready): set by the
        # lifespan once the scheduler exists.
        self.accepts_images: Callable[[], bool | None] = lambda: None

    # -- contract ------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise ModelNotFoundError(
                f"The model '{model}' does not exist; this server serves '{self.settings.model_name}'",
                param="model",
            )

    # -- sampling ------------------------------------------------------------------------------
    def sampling(
        self,
        *,
        max_tokens: int | None,
        temperature: float | None,
        default_max_tokens: int | None = None,
        top_p: float | None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        do_sample: bool | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        logit_bias: dict[str, float] | None = None,
        skip_special_tokens: bool = True,
        keep_special_tokens: tuple[str, ...] = (),
        grammar: Any = None,
    ) -> SamplingParams:
        s = self.settings
        if do_sample is None:
            do_sample = s.default_do_sample if temperature is None else temperature > 0
        resolved_temperature = 0.0
        if do_sample:
            resolved_temperature = s.default_temperature if temperature is None else temperature
        return SamplingParams(
            max_tokens=max_tokens,
            default_max_tokens=default_max_tokens,
            temperature=resolved_temperature,
            top_p=s.default_top_p if top_p is None else top_p,
            top_k=max(0, s.default_top_k if top_k is None else top_k),
            min_p=s.default_min_p if min_p is None else min_p,
            repetition_penalty=s.default_repetition_penalty
            if repetition_penalty is None
            else repetition_penalty,
            presence_penalty=presence_penalty or 0.0,
            frequency_penalty=frequency_penalty or 0.0,
            seed=s.default_seed if seed is None else seed,
            stop=_stops(stop),
            stop_token_ids=tuple(stop_token_ids or ()),
            ignore_eos=ignore_eos,
            min_tokens=min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=_logit_bias(logit_bias),
            skip_special_tokens=skip_special_tokens,
            keep_special_tokens=keep_special_tokens,
            grammar=grammar,
        )

    # -- endpoints -----------------------------------------------------------------------------
    async def chat(
        self, req: ChatCompletionRequest, request_id: str, tool_format: ToolCallFormat = HERMES
    ) -> EngineRequest:
        self.check_model(req.model)
        _check_stream_options(req)
        if req.top_logprobs and not req.logprobs:  # 0 without logprobs changes nothing
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        grammar = _chat_grammar(req, tool_format)
        warnings: list[str] = []
        if req.max_tokens is not None and req.max_completion_tokens not in (None, req.max_tokens):
            warnings.append(
                f"max_tokens ignored: max_completion_tokens ({req.max_completion_tokens}) is given"
            )
        sampling_fields = _openai_sampling_fields(req)
        if sampling_fields["stop"] and forces_tool_calls(req):
            # The grammar ends a forced call when its arguments are complete; a stop string
            # matching inside them cut the call and still answered "tool_calls".
            sampling_fields["stop"] = None
            warnings.append(
                "stop ignored: a forced tool call (tool_choice) ends when its arguments are complete"
            )
        # tool_choice "none" still shows the model its tools, as OpenAI and vLLM do (a history's
        # calls render as the template shows them with tools); only calls are not parsed.
        prompt = await self.chat_prompt(
            req.messages,
            tools=req.tools,
            add_generation_prompt=req.add_generation_prompt,
            chat_template_kwargs=_template_kwargs(req),
        )
        params = self.sampling(
            max_tokens=req.max_completion_tokens or req.max_tokens,
            **sampling_fields,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            prompt_logprobs=_prompt_logprobs(req),
            logit_bias=req.logit_bias,
            skip_special_tokens=req.skip_special_tokens,
            # Some vocabularies mark their tool-call tags special; the parser must see them.
            keep_special_tokens=tool_format.markers if parser_factory(req) is not None else (),
            grammar=grammar,
        )
        return EngineRequest(
            request_id, prompt, params, n=req.n, kind="chat", streamed=req.stream, warnings=tuple(warnings)
        )

    def generate(self, req: GenerateRequest, request_id: str) -> EngineRequest:
        if req.stream:
            # Refused rather than answered whole: a client asking for a stream must not wait for
            # the end without knowing why.
            raise InvalidRequestError(
                "stream is not supported on /generate; use /v1/completions (or /v1/chat/completions) with stream: true",
                param="stream",
            )
        p = req.parameters
        refuse_unsupported(p, self.settings.max_input_tokens)
        params = self.sampling(
            max_tokens=p.max_new_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            do_sample=p.do_sample,
            seed=p.seed,
            stop=_stops(p.stop, param="parameters.stop"),
            min_tokens=p.min_new_tokens,
            grammar=tgi_grammar(p.grammar),
        )
        return EngineRequest(
            request_id, PromptInput(text=req.inputs), params, kind="generate", streamed=False
        )

    def completion(self, req: CompletionRequest, request_id: str) -> list[EngineRequest]:
        """One engine request per prompt, all with the same parameters."""
        self.check_model(req.model)
        _check_stream_options(req)
        if req.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            # Ranking candidates needs their cumulative logprobs server-side; not implemented.
            raise InvalidRequestError(
                f"best_of ({req.best_of}) must equal n ({req.n}) on this server", param="best_of"
            )
        absent = req.max_tokens is msgspec.UNSET
        max_tokens = None if absent else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise InvalidRequestError(
                "max_tokens 0 is allowed only with echo (scoring the prompt)", param="max_tokens"
            )
        params = self.sampling(
            max_tokens=max_tokens,
            default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS if absent else None,
            **_openai_sampling_fields(req),
            logprobs=req.logprobs,
            prompt_logprobs=_prompt_logprobs(req, req.logprobs if req.echo else None),
            logit_bias=req.logit_bias,
            skip_special_tokens=req.skip_special_tokens,
            grammar=output_grammar(req),
        )
        prompts = _completion_prompts(req.prompt, req.add_special_tokens)
        limit = self.settings.max_prompts_per_request
        if len(prompts) > limit:
            raise InvalidRequestError(
                f"{len(prompts)} prompts sent; at most {limit} per request (MAX_PROMPTS_PER_REQUEST)",
                param="prompt",
            )
        return [
            EngineRequest(request_id, prompt, params, n=req.n, kind="completion", streamed=req.stream)
            for prompt in prompts
        ]

    async def tokenize_prompt(self, req: TokenizeRequest) -> PromptInput:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("send either prompt or messages (exactly one)", param="prompt")
        if req.messages is None:
            return PromptInput(
                text=req.prompt,
                add_special_tokens=req.add_special_tokens,
                split_special_tokens=req.split_special_tokens,
            )
        # Images are fetched like chat does so that the count includes their expanded tokens.
        prompt = await self.chat_prompt(
            req.messages,
            tools=req.tools,
            add_generation_prompt=req.add_generation_prompt,
            chat_template_kwargs=req.chat_template_kwargs,
        )
        return dataclasses.replace(prompt, add_special_tokens=req.add_special_tokens)

    async def template_prompt(self, req: ApplyTemplateRequest) -> PromptInput:
        self.check_model(req.model)
        # Rendering needs no pixels: image parts become placeholders without fetching anything.
        return await self.chat_prompt(
            req.messages,
            tools=req.tools,
            add_generation_prompt=req.add_generation_prompt,
            chat_template_kwargs=req.chat_template_kwargs,
            fetch_images=False,
        )

    async def chat_prompt(
        self,
        messages: list[ChatMessage],
        *,
        tools: list[Any] | None,
        add_generation_prompt: bool,
        chat_template_kwargs: dict[str, Any] | None,
        fetch_images: bool = True,
    ) -> PromptInput:
        converted, urls, params, max_sides = chat_messages(messages)
        limit = self.settings.max_images_per_request
        if len(urls) > limit:  # the one check of the count, before any image is fetched
            raise InvalidRequestError(
                f"{len(urls)} images sent; this server accepts at most {limit} per request", param="messages"
            )
        if urls and fetch_images and self.accepts_images() is False:
            # Refused before fetching: a text-only server would otherwise download what clients
            # point it at (up to MAX_IMAGES_PER_REQUEST URLs a request) only to refuse it.
            raise InvalidRequestError(
                "this model does not accept images (it is a text-only model)", param=params[0]
            )
        images = await self._fetch_all(urls, params) if fetch_images else ()
        return PromptInput(
            messages=tuple(converted),
            image_params=tuple(params),
            tools=tuple(_tool_for_template(t) for t in tools) if tools else None,
            add_generation_prompt=add_generation_prompt,
            images=images,
            image_max_sides=tuple(max_sides) if any(max_sides) else (),
            chat_template_kwargs=dict(chat_template_kwargs or {}),
        )

    async def _fetch_all(self, urls: list[str], params: list[str]) -> tuple[bytes, ...]:
        if not urls:
            return ()
        results: list[bytes | None] = [None] * len(urls)

        async def fetch(i: int, url: str) -> None:
            try:
                results[i] = await load_image_bytes(url, self.image_policy, client=self.image_client)
            except EngineError as exc:
                exc.param = exc.param or params[i]  # which image: messages[i].content[j].image_url
                raise

        try:
            async with anyio.create_task_group() as tg:
                for i, url in enumerate(urls):
                    tg.start_soon(fetch, i, url)
        except BaseExceptionGroup as group:
            # The task group wraps a rejected image in an ExceptionGroup; unwrap it so the client
            # gets its 400 (InvalidImageError) instead of a generic 500.
            rejected = group.subgroup(EngineError)
            if rejected is None:
                raise
            first: BaseException = rejected
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        return tuple(r for r in results if r is not None)


_OPENAI_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
)


def _openai_sampling_fields(req: Any) -> dict[str, Any]:
    """The sampling fields chat and completions requests share, under the same names."""
    return {name: getattr(req, name) for name in _OPENAI_SAMPLING_FIELDS}


def _prompt_logprobs(req: Any, echoed: int | None = None) -> int | None:
    """Alternatives per prompt token the engine computes: vLLM's `prompt_logprobs`, or the
    completions `logprobs` when `echo` returns the prompt's tokens with theirs (the larger)."""
    if req.prompt_logprobs is not None and req.stream:
        raise InvalidRequestError(
            "prompt_logprobs is not available with stream: true (as in vLLM)", param="prompt_logprobs"
        )
    asked = [k for k in (req.prompt_logprobs, echoed) if k is not None]
    return max(asked) if asked else None


def _completion_prompts(prompt: str | list[PromptElement], add_special_tokens: bool) -> list[PromptInput]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [PromptInput(text=prompt, add_special_tokens=add_special_tokens)]
    if not prompt:
        raise InvalidRequestError("prompt must not be an empty list", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return [PromptInput(text=p, add_special_tokens=add_special_tokens) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [PromptInput(token_ids=tuple(prompt))]
    if all(isinstance(p, list) for p in prompt):
        return [PromptInput(token_ids=tuple(p)) for p in prompt]
    raise InvalidRequestError(
        "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists, not a mix",
        param="prompt",
    )


def _chat_grammar(req: ChatCompletionRequest, tool_format: ToolCallFormat = HERMES) -> GrammarSpec | None:
    """The output constraint (`app.structured`) or forced tool calls in the model's format -> what
    the output must match; None: free text. A schema always constrains; `strict` (on a function
    or a json_schema) also closes its objects to the properties they list (`app.strict_schema`)."""
    if req.tools:
        check_size(req.tools, "tools")
        for i, tool in enumerate(req.tools):
            if not _TOOL_NAME.fullmatch(tool.function.name):
                # A name is written into the prompt and read back out of the output: one holding a
                # format's markup (`a</tool_call>b`) made a forced call come back as content.
                raise InvalidRequestError(
                    f"the tool name {tool.function.name[:80]!r} must be 1 to 64 letters, digits, "
                    "underscores, dashes, dots or colons",
                    param=f"tools[{i}].function.name",
                )
    forced = forces_tool_calls(req)
    if forced and not req.tools:
        raise InvalidRequestError(
            "tool_choice 'required' or a named function needs tools", param="tool_choice"
        )
    named = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
    if named is not None and named not in {tool.function.name for tool in req.tools}:
        raise InvalidRequestError(
            f"tool_choice names the function '{named[:64]}', which is not among the tools",
            param="tool_choice",
        )
    grammar = output_grammar(req, forced_tool_calls=forced)
    if grammar is not None:
        return grammar
    if forced:
        tools = [_to_builtins(tool) for tool in req.tools]
        return tool_format.grammar(tools, only=named, parallel=req.parallel_tool_calls is not False)
    return None


def _check_stream_options(req: ChatCompletionRequest | CompletionRequest) -> None:
    # As OpenAI and vLLM answer it: options for a stream that is not asked for are a mistake.
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )


def _template_kwargs(req: ChatCompletionRequest) -> dict[str, Any] | None:
    """chat_template_kwargs, with `reasoning_effort` among them when the request sets it (an
    explicit chat_template_kwargs entry wins)."""
    if req.reasoning_effort is None:
        return req.chat_template_kwargs
    return {"reasoning_effort": req.reasoning_effort, **(req.chat_template_kwargs or {})}


def _stops(stop: str | Sequence[str] | None, param: str = "stop") -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(
            f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}", param=param
        )
    if "" in stops:
        # An empty string matches at every position: the answer would end before its first
        # character. Refused as vLLM does rather than dropped without a word.
        raise InvalidRequestError("stop cannot contain an empty string", param=param)
    return tuple(stops)


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    parsed: dict[int, float] = {}
    for key, value in bias.items():
        # Digits only: int() also takes "1_0", " 5", "+5" and other scripts' digits ("٥").
        if not (key.isascii() and key.isdigit()):
            raise InvalidRequestError(
                f"logit_bias keys must be token ids (decimal digits), got {key[:32]!r}", param="logit_bias"
            )
        token = int(key)
        if token in parsed:  # "05" and "5": which bias would win is the order of the keys
            raise InvalidRequestError(f"logit_bias names token {token} twice", param="logit_bias")
        parsed[token] = float(value)
    return parsed


# What OpenAI means by a function without `parameters`: it takes none. Templates read the field
# (Hermes' `tool.parameters`, a Jinja error when it is missing), so it is sent spelled out.
_NO_PARAMETERS = {"type": "object", "properties": {}}


def _tool_for_template(tool: Any) -> dict[str, Any]:
    out = _to_builtins(tool)
    function = out.get("function")
    if isinstance(function, dict) and "parameters" not in function:
        out["function"] = {**function, "parameters": dict(_NO_PARAMETERS)}
    return out


def _to_builtins(value: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(value)
