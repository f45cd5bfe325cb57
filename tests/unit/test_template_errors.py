"""A chat template's errors are the client's: a 400 whose `param` names the message the error is
about (the system message a template refuses, the message that repeats a role, a system message
out of place), not the valid ones around it."""

from __future__ import annotations

import pytest

from models.errors import InvalidRequestError
from models.params import PromptInput
from tests.unit.test_prompt_content import MESSAGES, _builder


def test_a_template_refusing_the_system_role_names_the_system_message():
    refuses = (
        "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
        "{%- for message in messages %}{{ message['content'] }}{%- endfor %}"
    )
    builder = _builder(refuses)
    with pytest.raises(InvalidRequestError, match="System role not supported") as raised:
        builder.render(PromptInput(messages=MESSAGES, add_generation_prompt=True))
    assert raised.value.param == "messages[0]"


def test_an_alternation_error_names_the_message_that_repeats_a_role_not_the_system_one():
    """Mistral's error reads "After the optional system message, conversation roles must
    alternate user/assistant/...": the valid system message was named as the fault."""
    mistral_like = (
        "{%- set loop_messages = messages[1:] if messages[0]['role'] == 'system' else messages %}"
        "{%- for message in loop_messages %}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{%- endif %}{{ message['content'] }}{%- endfor %}"
    )
    builder = _builder(mistral_like)
    system = {"role": "system", "content": "s"}
    user, assistant = {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}
    for messages, blamed in (
        ((system, user, user), "messages[2]"),
        ((system, user, assistant, assistant), "messages[3]"),
        ((user, user), "messages[1]"),
        ((system, assistant), "messages"),  # no role repeats: the order as a whole
    ):
        with pytest.raises(InvalidRequestError, match="must alternate") as raised:
            builder.render(PromptInput(messages=messages, add_generation_prompt=True))
        assert raised.value.param == blamed, messages
    # Qwen3.5's wording: the system message after another turn is the one at fault.
    first_only = (
        "{%- for message in messages %}{%- if message['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('System message must be at the beginning.') }}{%- endif %}"
        "{{ message['content'] }}{%- endfor %}"
    )
    with pytest.raises(InvalidRequestError, match="at the beginning") as raised:
        _builder(first_only).render(PromptInput(messages=(user, system, user), add_generation_prompt=True))
    assert raised.value.param == "messages[1]"


def test_the_message_blamed_for_a_template_error_is_the_one_the_error_is_about():
    from models.template_messages import blamed_message

    def roles(*names):
        return [{"role": name, "content": "x"} for name in names]

    alternate = "After the optional system message, conversation roles must alternate user/assistant/..."
    assert blamed_message(roles("system", "user", "user"), alternate) == "messages[2]"
    assert blamed_message(roles("user", "user", "system"), alternate) == "messages[1]"
    assert (
        blamed_message(roles("user", "system", "user"), "System message must be at the beginning.")
        == "messages[1]"
    )
    assert blamed_message(roles("system", "user"), "System role not supported") == "messages[0]"
    # An error about another role: not the system message that happens to follow a turn.
    only = "Only user, assistant and system roles are supported!"
    assert blamed_message(roles("user", "assistant", "system", "user", "tool"), only) == "messages"
