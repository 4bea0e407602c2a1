"""How text becomes the verifier's input ids: through its chat template when it has one (as a chat model is
prompted in use), else as plain text. Shared by `speculators-hf data`, `demo`, `generate` and `bench`."""

from __future__ import annotations

from typing import Any


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation as the verifier sees it: its chat template (through the installed
    transformers' `apply_chat_template`), or "role: content" lines for a tokenizer without one;
    `add_generation_prompt` adds the header of the assistant's reply."""
    if has_chat_template(tokenizer):
        # transformers 5.2x returns a BatchEncoding here (a UserDict: a Mapping, not a dict); the ids are its
        # "input_ids" (iterating it would give its keys)
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
        )
        return [int(t) for t in encoded["input_ids"]]
    # No template (tiny or base models): plain "role: content" lines.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    if add_generation_prompt:
        text += "assistant:"
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def use_chat(tokenizer: Any, chat: bool | None) -> bool:
    """Whether to apply the chat template: `chat` when given (True without a template is an error), else
    whenever the tokenizer has one."""
    if chat is None:
        return has_chat_template(tokenizer)
    if chat and not has_chat_template(tokenizer):
        raise ValueError("--chat: this tokenizer has no chat template; leave --chat out to prompt with plain text")
    return chat


def prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """A user prompt's ids: the chat template with the assistant's reply header (`chat`), else the text as the
    tokenizer encodes it."""
    if chat:
        return chat_ids(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    return list(tokenizer(text).input_ids)
