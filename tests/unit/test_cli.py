"""The `speculators-hf` command."""

from __future__ import annotations

import json

import pytest
from conftest import make_verifier

import speculators_hf as sh
from speculators_hf.cli import main


def test_demo_builtin_pair_is_exact(capsys):
    assert main(["demo", "--max-new-tokens", "12", "--repeats", "0"]) == 0
    out = capsys.readouterr().out
    assert "identical to the verifier alone: yes" in out
    assert "tau=" in out and "speedup" in out


def test_inspect(tmp_path, capsys):
    sh.Eagle3Speculator.from_verifier(make_verifier(), draft_vocab_size=64).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "eagle3"
    assert info["verifier"]["vocab_size"] == 96
    assert info["tensors"]["lm_head.weight"] == [64, 32]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "demo" in capsys.readouterr().out


def test_bench_cli_on_the_zoo(tmp_path, capsys):
    """`speculators-hf bench` on the embedded zoo: a tree row, repeats, and the verifier's cost by width."""
    args = ["bench", "--families", "eagle3", "--k", "2", "--num-prompts", "2", "--max-new-tokens", "6",
            "--no-prompt-lookup", "--tree", "dynamic:3:2:4:1", "--repeats", "2", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| eagle3 (tree dynamic:3:2:4:1) | 3 |" in printed and "tokens verified in one pass" in printed
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["repeats"] == 2 and sorted(meta["verification_cost"]) == ["1", "3", "5"]
