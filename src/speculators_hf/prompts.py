"""How text becomes the verifier's input ids: through its chat template when it has one (as a chat model is
prompted in use), else as plain text. Shared by `speculators-hf data`, `demo`, `generate` and `bench`."""

from __future__ import annotations

from typing import Any

import torch


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


def prompt_tensors(prompts: list[Any], tokenizer: Any = None, chat: bool | None = None) -> list[torch.Tensor]:
    """Prompts given as token-id lists or text, as [1, n] id tensors: ids as they are, text through `prompt_ids`
    (the chat template as `use_chat` decides). `tokenizer` is needed only for text."""
    texts = [p for p in prompts if isinstance(p, str)]
    if texts and tokenizer is None:
        raise ValueError(f"prompt {texts[0][:40]!r} is text: a tokenizer is needed to turn it into ids")
    templated = use_chat(tokenizer, chat) if texts else False
    return [torch.tensor([p if isinstance(p, list) else prompt_ids(tokenizer, p, templated)]) for p in prompts]
