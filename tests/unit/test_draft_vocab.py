"""The default EAGLE-3 draft vocabulary: a quarter of the verifier's (benchmarks/draft_vocab.py), for
`from_verifier` / `config_from_verifier` and for `speculators-hf train` without --draft-vocab-size."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, make_verifier
from transformers import LlamaConfig

import speculators_hf as sh
from speculators_hf.cli import build_parser, main
from speculators_hf.training.data import save_blocks


@pytest.mark.parametrize(
    "vocab, expected",
    [(128256, 32064), (49152, 12288), (151936, 38016), (6144, 1536), (1000, 256), (96, 64), (40, 40)],
)
def test_default_is_a_quarter_of_the_verifier_vocabulary(vocab, expected):
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    assert sh.Eagle3Speculator.config_from_verifier(config).draft_vocab_size == expected
    assert sh.Eagle3Speculator.config_from_verifier(config, draft_vocab_size=vocab).draft_vocab_size == vocab


def test_from_verifier_default_and_the_full_vocabulary_on_request():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    assert draft.config.draft_vocab_size == 64 and draft.lm_head.weight.shape[0] == 64 and draft.d2t is not None
    full = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=VOCAB)
    assert full.config.draft_vocab_size == VOCAB and full.d2t is None


def test_train_command_uses_the_default_and_says_so(tmp_path, capsys):
    """`speculators-hf train` without --draft-vocab-size: a quarter of the vocabulary, made of the most
    frequent targets of the data (ids 40..79 here, the only ones trained on)."""
    verifier = make_verifier(eos_token_id=None)
    verifier.save_pretrained(tmp_path / "verifier")
    ids = torch.randint(40, 80, (24, 16), generator=torch.Generator().manual_seed(0))
    save_blocks(tmp_path / "data", ids, torch.ones_like(ids, dtype=torch.uint8), {"verifier": "verifier"})
    argv = ["train", "--verifier", str(tmp_path / "verifier"), "--data", str(tmp_path / "data"), "--output"]
    argv += [str(tmp_path / "out"), "--steps", "1", "--batch-size", "2", "--eval-blocks", "0", "--ttt-steps", "1"]
    assert main(argv) == 0
    config = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert config["draft_vocab_size"] == 64
    draft = sh.load_draft(tmp_path / "out" / "final")
    chosen = (torch.arange(64) + draft.d2t).tolist()
    assert set(range(40, 80)) <= set(chosen)
    train_help = next(
        a.help
        for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions  # type: ignore[union-attr]
        if "--draft-vocab-size" in a.option_strings
    )
    assert "a quarter of the verifier's vocabulary" in train_help
