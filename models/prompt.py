"""Prompt rendering and tokenization: chat templates (text and multimodal), raw prompts, images.

Runs in worker threads (never on the event loop, never on a replica's step loop). Produces the
token ids and the extra model inputs (pixel values and friends) of one request.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from models.arch import RopeIndex, Traits, bidirectional_spans, mrope_positions, rope_index_of, traits_of
from models.errors import ContextLengthExceededError, InvalidRequestError
from models.image_processing import decode_images, process_fitted, process_images
from models.images import DecodedImageCache, ImageLimits, MergerFit, image_inputs_digest, merger_fit
from models.loader import token_id_limit
from models.params import PromptInput
from models.prompt_bounds import dense_cut, max_token_chars
from models.template_messages import (
    NINE_CHARACTER_IDS,
    NO_PARTS,
    REFUSED_TEMPLATE_ARGUMENTS,
    SERVER_TEMPLATE_ARGUMENTS,
    SPECIAL_TOKEN_ARGUMENTS,
    ContentHandling,
    blamed_message,
    content_handling,
    each_string,
    message_tail,
    nine_character_id,
    paligemma_prefix,
    short_error,
    special_tokens_pattern,
    template_omissions,
    template_repairs,
    tool_call_for_template,
)

log = logging.getLogger(__name__)

NO_TEMPLATE = (
    "this model has no chat template, so chat messages cannot be turned into a prompt; start the server "
    "with --chat-template, or send a raw prompt to /v1/completions"
)
_WORD_JOINER = "\u2060"
# Processor outputs that are not inputs of a forward pass: ids and mask are rebuilt per step, and
# `labels` (PaliGemma's processor returns them with token_type_ids) would make the model compute a loss.
_NOT_MODEL_INPUTS = ("input_ids", "attention_mask", "labels")


@dataclass(slots=True)
class PreparedPrompt:
    token_ids: list[int]
    mm_inputs: dict[str, Any] | None = None  # processor outputs besides input ids, on CPU
    num_images: int = 0
    num_image_tokens: int = 0
    truncated_tokens: int = 0  # dropped from the left to respect max_input_tokens
    warnings: list[str] = field(default_factory=list)
    # Positions of the first and last token computed in one chunk: the image tokens (the whole
    # prompt when the model's image token is unknown) and the tokens that attend both ways. The
    # digest stands for what their keys and values depend on: the prefix cache keys blocks by it.
    unsplit_span: tuple[int, int] | None = None
    span_digest: bytes = b""
    bidirectional: tuple[tuple[int, int], ...] = ()  # [first, end) ranges attending both ways
    mrope: tuple[torch.Tensor, int] | None = None  # M-RoPE positions [3, P] and the later offset


class PromptBuilder:
    def __init__(
        self,
        tokenizer,
        *,
        processor=None,
        chat_template: str | None,
        tool_chat_template: str | None = None,
        image_token_id: int | None,
        max_input_tokens: int,
        image_limits: ImageLimits,
        image_cache: DecodedImageCache | None = None,
        token_id_limit: int | None = None,
        traits: Traits = Traits(),
        rope_index: RopeIndex | None = None,
        merger: MergerFit | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.token_id_limit = token_id_limit if token_id_limit is not None else len(tokenizer)
        self.processor = processor
        self.is_vision = processor is not None and getattr(processor, "image_processor", None) is not None
        self.max_input_tokens = max_input_tokens
        self.image_limits = image_limits
        self.image_cache = (
            image_cache if image_cache is not None else DecodedImageCache()
        )  # an empty cache is falsy
        self.image_token_id = image_token_id
        self.image_token = getattr(processor, "image_token", None) if processor is not None else None
        self.traits = traits
        self.rope_index = rope_index
        # A model's own prompt format serves chat when the checkpoint has no template (PaliGemma).
        self.prompt_format = traits.prompt_format if chat_template is None else None
        # A base model's chat is refused rather than rendered in a guessed format it never saw.
        self.chat_template = chat_template
        self.tool_chat_template = tool_chat_template  # a checkpoint's named "tool_use" template
        # The templates seen to join tool-call arguments into the text as a string.
        self._arguments_as_text: set[str] = set()
        self.merger = merger  # images too thin for the model's patch merger are stretched first
        self._special_pattern = special_tokens_pattern(tokenizer, self.image_token)
        self._max_token_chars = max_token_chars(tokenizer)
        # Whether each template takes OpenAI parts, must get them, and in which roles it shows them.
        templates = [(t, tools) for t in {chat_template, tool_chat_template} for tools in (False, True)]
        self._handling = {
            (t, tools): content_handling(tokenizer, t, with_tools=tools) for t, tools in templates
        }
        self.accepts_parts, self.content_as_parts, self.part_roles, _ = self._handling[(chat_template, False)]
        # Ids a client got elsewhere (OpenAI's `call_...`) are mapped to ones such a template takes,
        # the same way for a call and its result, as vLLM shortens them for Mistral.
        self.nine_character_ids = bool(
            NINE_CHARACTER_IDS.search((chat_template or "") + (tool_chat_template or ""))
        )

    @classmethod
    def for_model(
        cls,
        loaded,
        *,
        max_input_tokens: int = 1 << 20,
        image_limits: ImageLimits | None = None,
        image_cache: DecodedImageCache | None = None,
        tokenizer=None,
        processor=None,
    ) -> PromptBuilder:
        """A builder for a `LoadedModel`; pass `tokenizer`/`processor` to use private copies."""
        processor = processor if processor is not None else loaded.processor
        return cls(
            tokenizer if tokenizer is not None else loaded.tokenizer,
            processor=processor,
            chat_template=loaded.chat_template,
            tool_chat_template=loaded.tool_chat_template,
            image_token_id=loaded.image_token_id,
            max_input_tokens=max_input_tokens,
            image_limits=image_limits or ImageLimits(),
            image_cache=image_cache,
            token_id_limit=token_id_limit(loaded),
            merger=merger_fit(loaded.model.config, processor),
            traits=traits_of(loaded.model.config),
            rope_index=rope_index_of(loaded.model),
        )

    # -- rendering -----------------------------------------------------------------------------
    @property
    def can_chat(self) -> bool:
        """Whether chat messages can become a prompt: a template, or the model's own format."""
        return self.chat_template is not None or self.prompt_format is not None

    def render(self, prompt: PromptInput, *, content_chars: int | None = None) -> str:
        """The chat template applied to the messages (with the generation prompt when asked).
        `content_chars`: message content longer than this keeps only its end (whatever comes
        before could not survive the prompt's left truncation anyway)."""
        if prompt.messages is None:
            raise InvalidRequestError("messages are required", param="messages")
        if self.prompt_format == "paligemma":
            return paligemma_prefix(prompt.messages, content_chars, self._as_text)
        if self.chat_template is None:
            raise InvalidRequestError(NO_TEMPLATE, param="messages")
        kwargs = dict(prompt.chat_template_kwargs)
        # chat_template_kwargs may set the generation prompt, as in vLLM; what the server itself
        # passes (the messages, tools, which template, how to tokenize) it may not.
        add_generation_prompt = kwargs.pop("add_generation_prompt", prompt.add_generation_prompt)
        if not isinstance(add_generation_prompt, bool):
            raise InvalidRequestError(
                "chat_template_kwargs.add_generation_prompt must be true or false",
                param="chat_template_kwargs",
            )
        reserved = sorted(kwargs.keys() & SERVER_TEMPLATE_ARGUMENTS)
        if reserved:
            raise InvalidRequestError(
                f"chat_template_kwargs cannot set {', '.join(reserved)}: the server passes "
                f"{'it' if len(reserved) == 1 else 'them'} to the chat template itself (send tools in `tools`)",
                param="chat_template_kwargs",
            )
        # Named extras count too (`image_token`, `boi_token`): transformers passes them as well.
        named = getattr(self.tokenizer, "special_tokens_map", None) or {}
        special = sorted(kwargs.keys() & (SPECIAL_TOKEN_ARGUMENTS | set(named)))
        if special:
            raise InvalidRequestError(
                f"chat_template_kwargs cannot set {', '.join(special)}: the template reads the "
                "tokenizer's own special tokens",
                param=f"chat_template_kwargs.{special[0]}",
            )
        for name, (unchanged, why) in REFUSED_TEMPLATE_ARGUMENTS.items():
            if name in kwargs and kwargs[name] not in unchanged:
                raise InvalidRequestError(
                    f"chat_template_kwargs.{name} is not accepted: {why}",
                    param=f"chat_template_kwargs.{name}",
                )
            kwargs.pop(name, None)
        # Strings a client passes are text, as message content is (a `date_string` of `<|eot_id|>`
        # closed the system turn).
        kwargs = each_string(kwargs, self._as_text)

        # With tools, the checkpoint's "tool_use" template where it has one, as transformers picks it.
        template = (self.tool_chat_template if prompt.tools else None) or self.chat_template

        # A tool's descriptions are text too (an `<image>` there made image requests a 400).
        tools = [each_string(tool, self._as_text) for tool in prompt.tools] if prompt.tools else None

        history = list(prompt.messages or ())

        handling = self._handling.get((template, bool(tools)), NO_PARTS)

        def apply(arguments_as_text: bool) -> str:
            messages = [
                self._normalise_message(message_tail(m, content_chars), handling, arguments_as_text)
                for m in history
            ]
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                chat_template=template,
                **kwargs,
            )

        def rejected(exc: Exception) -> InvalidRequestError:
            return InvalidRequestError(
                f"the chat template rejected the messages: {short_error(exc)}",
                param=blamed_message(prompt.messages, str(exc)),
            )

        as_text = template in self._arguments_as_text
        try:
            return apply(as_text)
        except InvalidRequestError:
            raise
        except Exception as exc:  # template errors (raise_exception in Jinja, bad roles) are the client's
            log.debug("chat template failed", exc_info=True)
            first = exc
        # Most templates read a call's arguments as a mapping (`| tojson`); some join them into the
        # text as the JSON string OpenAI sends (DeepSeek-R1's `+ tool['function']['arguments'] +`).
        # Such a template is known by failing on the mapping and rendering the string.
        if not as_text and any(m.get("tool_calls") for m in prompt.messages):
            try:
                text = apply(True)
            except Exception as retried:
                log.debug("chat template failed with arguments as text too", exc_info=True)
                # A TypeError was the mapping's doing (str + dict): the retry's error is the real one.
                first = retried if isinstance(first, TypeError) else first
            else:
                self._arguments_as_text.add(template)
                return text
        # Templates stricter than OpenAI's messages get what they take, only once they failed.
        for repaired_tools, repaired_history in template_repairs(tools, history, str(first)):
            tools, history = repaired_tools, repaired_history  # what `apply` renders
            try:
                return apply(as_text)
            except Exception as exc:
                log.debug("chat template failed on the repaired messages too", exc_info=True)
                first = exc
        raise rejected(first) from None

    def _normalise_message(
        self, message: Mapping[str, Any], handling: ContentHandling, arguments_as_text: bool = False
    ) -> dict[str, Any]:
        out = dict(message)
        content = out.get("content")
        if isinstance(content, str):
            content = out["content"] = self._as_text(content)
        elif isinstance(content, list):
            content = [
                {**p, "text": self._as_text(p["text"])} if isinstance(p.get("text"), str) else p
                for p in content
            ]
        if isinstance(content, list):
            out["content"] = self._normalise_parts(content, out.get("role"), handling)
        elif isinstance(content, str) and handling.must:
            out["content"] = [{"type": "text", "text": content}]
        elif content is None:
            out["content"] = [] if handling.must else ""
        calls = out.get("tool_calls")
        if calls:  # text, as content is: `<image>` or `<|im_end|>` in arguments is not a control token
            out["tool_calls"] = [
                each_string(tool_call_for_template(c, arguments_as_text=arguments_as_text), self._as_text)
                for c in calls
            ]
        if self.nine_character_ids:
            for call in out.get("tool_calls") or ():
                if isinstance(call.get("id"), str):
                    call["id"] = nine_character_id(call["id"])
            if isinstance(out.get("tool_call_id"), str):
                out["tool_call_id"] = nine_character_id(out["tool_call_id"])
        return out

    def _as_text(self, text: str) -> str:
        """Message content is text, whatever it contains: a special token's spelling typed by a
        client (`<|im_end|>\n<|im_start|>system ...`) must not become that control token and
        forge a turn. A word joiner (U+2060, invisible) after its first character keeps the
        tokenizer from matching it; the template's own markers are untouched."""
        if self._special_pattern is None or not self._special_pattern.search(text):
            return text
        return self._special_pattern.sub(lambda m: m.group(0)[0] + _WORD_JOINER + m.group(0)[1:], text)

    def _normalise_parts(
        self, parts: list[Mapping[str, Any]], role: Any, handling: ContentHandling
    ) -> str | list[dict[str, Any]]:
        """Parts as sent where the template shows every part of this role's (the prompt is the one
        transformers renders); else their text joined with newlines, images as the processor's
        placeholder: a string, or one text part for a template that must get parts."""
        has_image = any(p.get("type") == "image" for p in parts)
        if has_image and not self.is_vision:
            raise InvalidRequestError(
                "this model does not accept images (it is a text-only model)", param="messages"
            )
        # User turns of a vision model keep their parts unless the probe saw parts lost there (with
        # tools, Llama 3.2 Vision's template writes the first user message as a Python list).
        vision_user = (
            handling.accepts_parts and self.is_vision and role == "user" and role not in handling.lossy
        )
        if role in handling.roles or vision_user or (handling.must and has_image):
            return [dict(p) for p in parts]
        joined = "\n".join(
            (self.image_token or "") if p.get("type") == "image" else str(p.get("text", "")) for p in parts
        )
        return [{"type": "text", "text": joined}] if handling.must else joined

    # -- tokenization ----------------------------------------------------------------------------
    def prepare(self, prompt: PromptInput) -> PreparedPrompt:
        """Token ids and model inputs for one request. Text prompts longer than max_input_tokens
        are left-truncated and the result says so; image prompts cannot be cut and are refused."""
        prepared = self._prepare(prompt)
        prepared.warnings.extend(self.template_warnings(prompt))
        return prepared

    def template_warnings(self, prompt: PromptInput) -> list[str]:
        """What rendering `prompt` leaves out without an error (`template_omissions`)."""
        template = (self.tool_chat_template if prompt.tools else None) or self.chat_template
        if prompt.messages is None or not template:
            return []
        return template_omissions(self.tokenizer, template, prompt.messages, prompt.tools)

    def _prepare(self, prompt: PromptInput) -> PreparedPrompt:
        if prompt.token_ids is not None:
            self.check_ids(prompt.token_ids, param="prompt")
            return self._as_prefix(self._truncate(PreparedPrompt(list(prompt.token_ids))))
        # No token is longer than `_max_token_chars` characters, so a text beyond this many has
        # more tokens than the limit for sure: only its end can survive, so only its end is
        # rendered and tokenized. (A 60 MiB prompt took minutes to tokenize and gigabytes of memory.)
        bound = (self.max_input_tokens + 1) * self._max_token_chars
        if prompt.messages is not None:
            text, special = self.render(prompt, content_chars=None if prompt.images else bound), False
        else:
            text, special = prompt.text or "", True
        if prompt.add_special_tokens is not None:
            special = prompt.add_special_tokens
        if prompt.images:
            if len(text) > bound:
                raise ContextLengthExceededError(
                    f"the prompt has {len(text)} characters, more than the {self.max_input_tokens} input tokens this "
                    "server accepts; prompts with images cannot be truncated",
                    param="messages",
                )
            return self._prepare_multimodal(text, prompt, special)
        if self.prompt_format == "paligemma" and prompt.messages is not None:
            return self._paligemma_text_only(text)
        cut = max(0, len(text) - bound)
        split = {"split_special_tokens": True} if prompt.split_special_tokens else {}
        ids = self.tokenizer(text[cut:], add_special_tokens=special and not cut, **split)["input_ids"]
        if cut and len(ids) <= self.max_input_tokens:
            # Fewer tokens than the limit in the kept end: the tokenizer's normaliser drops
            # whitespace (BERT's, SentencePiece's runs of spaces), which the bound counted. Kept
            # instead: the end holding `bound` characters that are not whitespace (as many tokens
            # at most as before, however much whitespace lies between them).
            cut = dense_cut(text, bound)
            ids = self.tokenizer(text[cut:], add_special_tokens=special and not cut, **split)["input_ids"]
        prepared = self._truncate(PreparedPrompt(list(ids)))
        if cut:
            prepared.warnings[-1:] = [
                f"the prompt had {len(text)} characters, more than MAX_INPUT_TOKENS={self.max_input_tokens} tokens; "
                f"only its last {len(prepared.token_ids)} tokens were kept"
            ]
        return self._as_prefix(prepared)

    def _paligemma_text_only(self, prefix: str) -> PreparedPrompt:
        """<bos>, the prefix and a newline, as its processor builds it around images (it
        requires images, so text-only prompts are built here)."""
        bos = self.tokenizer.bos_token or ""
        ids = self.tokenizer(bos + prefix + "\n", add_special_tokens=False)["input_ids"]
        return self._as_prefix(self._truncate(PreparedPrompt(list(ids))))

    def _as_prefix(self, prepared: PreparedPrompt) -> PreparedPrompt:
        """A text prompt for a prefix-LM (PaliGemma): the whole prompt is the prefix, which attends
        both ways, as the model's processor marks every prompt token (type 0). Without the types
        the model's own forward would not apply its prefix mask as it was trained."""
        if self.traits.bidirectional != "prefix" or not prepared.token_ids:
            return prepared
        types = torch.zeros(1, len(prepared.token_ids), dtype=torch.long)
        self._add_spans(prepared, {"token_type_ids": types})
        prepared.mm_inputs = {"token_type_ids": types}
        return prepared

    def _add_spans(self, prepared: PreparedPrompt, mm: Mapping[str, Any]) -> None:
        """The prompt's bidirectional spans, widening the span computed in one chunk, and a
        digest that covers their tokens (whose keys and values depend on every token in them)."""
        spans = bidirectional_spans(self.traits.bidirectional, mm.get("token_type_ids"))
        if not spans:
            return
        prepared.bidirectional = spans
        first, last = spans[0][0], spans[-1][1] - 1
        if prepared.unsplit_span is not None:
            first, last = min(first, prepared.unsplit_span[0]), max(last, prepared.unsplit_span[1])
        prepared.unsplit_span = (first, last)
        digest = hashlib.blake2b(prepared.span_digest, digest_size=16)
        digest.update(repr(prepared.token_ids[first : last + 1]).encode())
        prepared.span_digest = digest.digest()

    def _prepare_multimodal(self, text: str, prompt: PromptInput, special: bool) -> PreparedPrompt:
        if not self.is_vision:
            raise InvalidRequestError(
                "this model does not accept images (it is a text-only model)", param="messages"
            )
        params = prompt.image_params
        decoded = decode_images(
            self.image_cache, prompt.images, params, prompt.image_max_sides, self.image_limits
        )
        batch, warnings, decoded = process_fitted(
            self.merger,
            decoded,
            lambda images: process_images(
                self.processor,
                text,
                images,
                special=special,
                one_list=self.prompt_format == "paligemma",
                params=params,
            ),
            params,
        )
        ids = batch["input_ids"][0].tolist()
        mm = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
        image_tokens = (
            sum(1 for t in ids if t == self.image_token_id) if self.image_token_id is not None else 0
        )
        prepared = PreparedPrompt(
            ids,
            mm or None,
            num_images=len(decoded),
            num_image_tokens=image_tokens,
            unsplit_span=self._image_span(ids),
            span_digest=image_inputs_digest(mm, len(ids)),
        )
        prepared.warnings.extend(warnings)
        self._add_spans(prepared, mm)
        if self.rope_index is not None and mm.get("mm_token_type_ids") is not None:
            prepared.mrope = mrope_positions(self.rope_index, ids, mm)
        if len(ids) > self.max_input_tokens:
            raise ContextLengthExceededError(
                f"the prompt is {len(ids)} tokens ({image_tokens} of them for {len(decoded)} images), more than "
                f"the {self.max_input_tokens} input tokens this server accepts; prompts with images cannot be truncated",
                param="messages",
            )
        return prepared

    def _image_span(self, ids: list[int]) -> tuple[int, int]:
        if self.image_token_id is not None:
            positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
            if positions:
                return 0 if self.traits.images_reach_whole_prompt else positions[0], positions[-1]
        return 0, len(ids) - 1

    def _truncate(self, prepared: PreparedPrompt) -> PreparedPrompt:
        excess = len(prepared.token_ids) - self.max_input_tokens
        if excess > 0:
            prepared.token_ids = prepared.token_ids[excess:]
            prepared.truncated_tokens = excess
            prepared.warnings.append(
                f"the prompt was {self.max_input_tokens + excess} tokens; the first {excess} were dropped "
                f"to fit MAX_INPUT_TOKENS={self.max_input_tokens}"
            )
        return prepared

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        self.check_ids(ids, param="tokens")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def check_ids(self, ids: Iterable[int], *, param: str) -> None:
        """Refuse ids outside `token_id_limit` (see `models.loader.token_id_limit`)."""
        limit = self.token_id_limit
        bad = next((t for t in ids if not 0 <= t < limit), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token id {bad} is outside the vocabulary (0..{limit - 1})", param=param
            )
