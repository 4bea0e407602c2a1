"""Prompts as ids: token-id lists as given, text through the chat template where the tokenizer has one."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_verifier

import speculators_hf as sh
from speculators_hf.bench import load_pair
from speculators_hf.prompts import chat_ids, prompt_tensors


def test_ids_pass_through_and_need_no_tokenizer():
    out = prompt_tensors([[5, 6, 7], [8]])
    assert [t.tolist() for t in out] == [[[5, 6, 7]], [[8]]] and all(t.dtype == torch.long for t in out)


def test_text_goes_through_the_chat_template_when_there_is_one(chat_tokenizer, tiny_tokenizer):
    [templated] = prompt_tensors(["the draft"], chat_tokenizer)
    expected = chat_ids(chat_tokenizer, [{"role": "user", "content": "the draft"}], add_generation_prompt=True)
    assert templated[0].tolist() == expected
    [plain] = prompt_tensors(["the draft"], chat_tokenizer, chat=False)
    assert plain[0].tolist() == list(chat_tokenizer("the draft").input_ids) != expected
    mixed = prompt_tensors([[4, 4], "the draft"], tiny_tokenizer)  # no template: the text as encoded
    assert mixed[0].tolist() == [[4, 4]] and mixed[1][0].tolist() == list(tiny_tokenizer("the draft").input_ids)


def test_text_without_a_tokenizer_is_an_error_naming_the_prompt():
    with pytest.raises(ValueError, match=r"prompt 'hello there' is text: a tokenizer is needed"):
        prompt_tensors([[1, 2], "hello there"])


def test_load_pair_gives_a_bound_draft_and_prompt_tensors(tmp_path, tiny_tokenizer):
    """The benchmark scripts' loader: a float32 verifier from its folder, the draft bound to it, the prompts as ids."""
    make_verifier("llama").save_pretrained(tmp_path / "verifier")
    tiny_tokenizer.save_pretrained(tmp_path / "verifier")
    verifier = make_verifier("llama")
    sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64).save_pretrained(tmp_path / "draft")
    (tmp_path / "prompts.json").write_text(json.dumps([[5, 6, 7], "the draft is fast", [9]]))
    loaded, draft, prompts = load_pair(tmp_path / "verifier", tmp_path / "draft", tmp_path / "prompts.json", 2, "torch")
    assert draft.verifier is loaded and loaded.dtype == torch.float32
    assert [p.shape[0] for p in prompts] == [1, 1] and prompts[0].tolist() == [[5, 6, 7]]
    assert prompts[1][0].tolist() == list(tiny_tokenizer("the draft is fast").input_ids)
