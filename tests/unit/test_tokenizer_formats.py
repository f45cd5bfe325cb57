"""Checkpoints whose tokenizer is not a tokenizer.json: a SentencePiece `tokenizer.model` only (as
many Llama-2-era and Mistral fine-tunes ship) or a tiktoken one, loaded through the real loading
path and served greedily, equal to transformers' own generate()."""

from __future__ import annotations

import base64
import io
import json

import pytest
import sentencepiece
import torch
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from models.detokenize import IncrementalDetokenizer
from models.loader import LoadSpec
from models.params import SamplingParams
from models.prompt import PreparedPrompt
from models.replica import build_replica
from tests.unit.configs import replica_config
from tests.unit.engine_driver import EngineDriver, hf_greedy
from tests.unit.vlm_builder_parts import text_kwargs

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
CORPUS = ["hello world, this is a tiny corpus for a tokenizer"] * 20 + [
    f"the quick brown fox jumps over the lazy dog {i}" for i in range(100)
]


@pytest.fixture(scope="module")
def sentencepiece_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sentencepiece-only")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,  # any text encodes, as in Llama's tokenizer
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "chat_template": TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    _tiny_llama(out, bos=1, eos=2)
    return out


@pytest.fixture(scope="module")
def tiktoken_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A tiktoken `tokenizer.model` (base64 token, rank per line: the 256 bytes, then merges), as
    Llama 3's original checkpoints and several remote-code tokenizers ship."""
    out = tmp_path_factory.mktemp("tiktoken-only")
    merges = [
        b"he",
        b"ll",
        b"hell",
        b"hello",
        b" w",
        b"or",
        b" wor",
        b"ld",
        b" world",
        b" t",
        b" th",
        b" the",
    ]
    ranks = [bytes([i]) for i in range(256)] + merges
    lines = [f"{base64.b64encode(token).decode()} {rank}" for rank, token in enumerate(ranks)]
    (out / "tokenizer.model").write_text("\n".join(lines) + "\n")
    bos, eos = len(ranks), len(ranks) + 1
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "added_tokens_decoder": {
            str(bos): {"content": "<|begin_of_text|>", "special": True},
            str(eos): {"content": "<|end_of_text|>", "special": True},
        },
        "chat_template": TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    _tiny_llama(out, bos=bos, eos=eos)
    return out


def _tiny_llama(out, *, bos: int, eos: int) -> None:
    """The suite's smallest text model over the tokenizer already written to `out`."""
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(**text_kwargs(tokenizer, bos_token_id=bos, eos_token_id=eos, pad_token_id=None))
    LlamaForCausalLM(config).save_pretrained(out)
    assert not (out / "tokenizer.json").exists()


def test_a_sentencepiece_only_tokenizer_is_served_like_generate(sentencepiece_checkpoint) -> None:
    replica = _served(sentencepiece_checkpoint)
    tokenizer = replica.loaded.tokenizer
    reference = AutoTokenizer.from_pretrained(sentencepiece_checkpoint)
    text = "hello world, the fox — ünïcödé 🙂"
    ids = tokenizer(text)["input_ids"]
    assert ids == reference(text)["input_ids"] and ids[0] == 1  # BOS, as the SentencePiece model says
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte fallback: nothing lost
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "[user] hi\n[assistant] "

    _greedy_equals_generate(replica, ["the quick brown", "hello " * 12])


def test_a_tiktoken_only_tokenizer_is_served_like_generate(tiktoken_checkpoint) -> None:
    replica = _served(tiktoken_checkpoint)
    tokenizer = replica.loaded.tokenizer
    ids = tokenizer("hello world the", add_special_tokens=False)["input_ids"]
    assert ids == [256 + 3, 256 + 8, 256 + 11]  # the merges' ranks: "hello", " world", " the"
    assert tokenizer.decode(ids) == "hello world the"
    assert "<|end_of_text|>" in tokenizer.convert_ids_to_tokens(sorted(replica.loaded.eos_token_ids))
    _greedy_equals_generate(replica, ["hello world", "the world " * 10])


def _served(checkpoint):
    return build_replica(
        LoadSpec(source=str(checkpoint), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=2)
    )


def _greedy_equals_generate(replica, texts: list[str]) -> None:
    tokenizer = replica.loaded.tokenizer
    prompts = [PreparedPrompt(tokenizer(text)["input_ids"]) for text in texts]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    driver = EngineDriver(replica)
    streams = [driver.submit(prompt, params) for prompt in prompts]
    driver.run(streams)
    for prompt, stream in zip(prompts, streams, strict=True):
        assert driver.outputs(stream)[0] == hf_greedy(replica, prompt, 8)


def test_byte_tokens_that_are_not_utf8_keep_the_text_flowing(sentencepiece_checkpoint) -> None:
    """A byte that cannot start a character after one that decoded on its own ("0", then 0x80)
    makes the byte-fallback decoder redo the run as U+FFFD: tokenizers' DecodeStream then raises.
    The detokenizer goes on by offsets, and the text after the bad byte still comes out."""
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_checkpoint)
    prompt = tokenizer("hello world")["input_ids"]
    after = tokenizer("the quick brown", add_special_tokens=False)["input_ids"]
    bad = tokenizer.convert_tokens_to_ids(["<0x30>", "<0x80>"]) + after
    stream = DecodeStream(ids=prompt[-6:], skip_special_tokens=True)
    with pytest.raises(Exception, match="Invalid prefix"):
        for token_id in bad:
            stream.step(tokenizer.backend_tokenizer, token_id)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detokenizer.push(token_id) for token_id in bad)
    assert text.startswith("0") and text.endswith(" the quick brown")


@pytest.mark.parametrize("ending", ["🚀🚀", "x 👨\u200d👩\u200d👧", "你好世界", "🚀"])
def test_the_first_token_after_a_prompt_ending_in_bytes_keeps_its_space(
    sentencepiece_checkpoint, ending
) -> None:
    """Two emoji are eight byte tokens: the six-token context started inside the first one, the
    byte-fallback decoder made the whole run U+FFFD, the context was dropped, and the first
    generated token decoded as the start of a text: " the" came out as "the", a lone "▁" as ""."""
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_checkpoint)
    prompt = tokenizer(f"Hi {ending}")["input_ids"]
    generated = tokenizer.convert_tokens_to_ids(["▁the", "▁", "▁the"])
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detokenizer.push(token_id) for token_id in generated) + detokenizer.flush()
    whole, alone = tokenizer.decode(prompt + generated), tokenizer.decode(prompt)
    assert text == whole[len(alone) :] == " the  the"


@pytest.mark.parametrize(
    ("spelled", "stray"), [("你", 0xCD), ("😀", 0x80), ("é", 0xFF)], ids=["cjk", "emoji", "latin"]
)
def test_a_stray_byte_after_a_character_spelled_in_bytes_is_one_replacement(
    sentencepiece_checkpoint, spelled, stray
) -> None:
    """The byte-fallback decoder redoes a whole run of bytes as U+FFFD once one is invalid, the
    character already sent included: the text goes on with one U+FFFD for the stray byte, never
    with the character written again as replacements (decode() of the whole would lose it)."""
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_checkpoint)
    spelled_ids = tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in spelled.encode()])
    after = tokenizer("the quick brown", add_special_tokens=False)["input_ids"]
    ids = [*tokenizer("hello", add_special_tokens=False)["input_ids"], *spelled_ids]
    ids += [tokenizer.convert_tokens_to_ids(f"<0x{stray:02X}>"), *after]
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer("world")["input_ids"])
    text = "".join(detokenizer.push(token_id) for token_id in ids) + detokenizer.flush()
    assert text == f" hello{spelled}\ufffd the quick brown"
    # A stray byte the output ends on comes out once, at the end.
    ending = IncrementalDetokenizer(tokenizer, [])
    text = "".join(ending.push(t) for t in [*spelled_ids, tokenizer.convert_tokens_to_ids("<0xE4>")])
    assert text + ending.flush() == f"{spelled}\ufffd"


@pytest.mark.parametrize("checkpoint", ["sentencepiece_checkpoint", "tiktoken_checkpoint"])
def test_logprob_bytes_of_split_characters_are_the_real_bytes(checkpoint, request) -> None:
    """Byte-fallback pieces (`<0xF0>`) and byte-level ones (tiktoken's, converted) alike: a token
    that holds part of a character decodes alone to U+FFFD, but its bytes are its own."""
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(checkpoint))
    text = "hello 𝔘ok🫠 world"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    texts, raw = IncrementalDetokenizer(tokenizer, []).token_texts_and_bytes(ids)
    assert "\ufffd" in texts
    # SentencePiece writes the space before the first word too ("▁hello"): the one decode() drops.
    expected = (" " + text if checkpoint == "sentencepiece_checkpoint" else text).encode()
    assert b"".join(raw) == expected


def test_sentencepiece_logprob_tokens_keep_the_space_their_bytes_and_the_text_have(
    sentencepiece_checkpoint,
) -> None:
    """Decoded alone, "▁the" is "the": the token string must be " the", as its bytes and the
    answer's text have it, so that the tokens of a choice join into its text."""
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_checkpoint)
    ids = tokenizer("hello the quick fox", add_special_tokens=False)["input_ids"]
    texts, raw = IncrementalDetokenizer(tokenizer, []).token_texts_and_bytes(ids)
    assert texts == [piece.decode() for piece in raw]
    assert "".join(texts) == " hello the quick fox"
    assert " the" in texts or " quick" in texts  # a word piece after the first keeps its space


def test_byte_fallback_bytes_held_back_or_invalid_come_out_as_replacement(sentencepiece_checkpoint) -> None:
    """Bytes that never make a character are written as U+FFFD, as decode() writes them, not
    dropped: a stray continuation byte mid-text, and an unfinished character the output ends on
    (a length cut) that only the final flush can give."""
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_checkpoint)
    prompt = tokenizer("hello world")["input_ids"]
    pieces = ["<0x48>", "<0xA9>", "<0x6C>", "<0x6F>"]
    word = tokenizer("the", add_special_tokens=False)["input_ids"]
    ids = tokenizer.convert_tokens_to_ids(pieces) + word + tokenizer.convert_tokens_to_ids(["<0xC3>"])
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detokenizer.push(token_id) for token_id in ids)
    assert "\ufffd" in text and text.endswith(" the")
    assert detokenizer.flush() == "\ufffd"
    cut = IncrementalDetokenizer(tokenizer, prompt)
    first = tokenizer("hi", add_special_tokens=False)["input_ids"] + tokenizer.convert_tokens_to_ids(
        ["<0xE4>"]
    )
    streamed = "".join(cut.push(token_id) for token_id in first)
    assert not streamed.endswith("\ufffd") and cut.flush() == "\ufffd"
