"""The `speculators-hf` command."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_verifier

import speculators_hf as sh
from speculators_hf.cli import main
from speculators_hf.cpu_kernels import onednn_linear_available


def test_demo_is_exact_and_says_what_it_measured(capsys):
    assert main(["demo", "--max-new-tokens", "12", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "identical to the verifier alone: yes (all 2 runs)" in out
    assert "tau " in out and "median of 2 runs" in out and "speedup" in out and "machine: " in out
    assert ("cpu kernels: oneDNN" in out) == onednn_linear_available()


@pytest.fixture
def assisted_output_changed(monkeypatch):
    """A method whose output differs from the verifier alone: the bench's runner changes the last token of every
    output generated with a draft. The demo and the bench must say NO and exit non-zero."""
    import speculators_hf.bench as bench

    original = bench._run

    def wrong(verifier, prompts, max_new_tokens, **kwargs):
        outputs, seconds = original(verifier, prompts, max_new_tokens, **kwargs)
        if kwargs.get("assistant_model") is not None:
            outputs = [torch.cat([o[:, :-1], (o[:, -1:] + 1) % 50], dim=1) for o in outputs]
        return outputs, seconds

    monkeypatch.setattr(bench, "_run", wrong)


def test_demo_says_no_when_the_output_differs(assisted_output_changed, capsys):
    assert main(["demo", "--max-new-tokens", "8", "--repeats", "1"]) == 1
    assert "identical to the verifier alone: NO" in capsys.readouterr().out


def test_bench_says_no_when_the_output_differs(assisted_output_changed, tmp_path, capsys):
    args = ["bench", "--families", "eagle3", "--k", "2", "--num-prompts", "2", "--max-new-tokens", "6",
            "--no-prompt-lookup", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "| eagle3 | 2 |" in captured.out and "| NO |" in captured.out
    assert "NOT identical to the verifier alone: eagle3 (k=2)" in captured.err
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["exact"] for r in rows] == [True, False]


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
    assert meta["cpu_kernels"] == ("onednn" if onednn_linear_available() else "torch")  # the default, auto


def test_bench_cli_auto_rows(tmp_path, capsys):
    """`--k auto` adds a row per draft in transformers' loop, `--tree auto` one in the own loop, both exact."""
    args = ["bench", "--families", "eagle3", "--k", "2,auto", "--num-prompts", "1", "--max-new-tokens", "6",
            "--no-prompt-lookup", "--tree", "auto:4", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| eagle3 (k auto) |  |" in printed and "| eagle3 (tree auto:4) |  |" in printed
    assert "| NO |" not in printed


@pytest.fixture
def chat_pair(tmp_path, chat_tokenizer):
    """A verifier folder with a chat tokenizer, and a draft folder that names it."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "verifier"
    make_verifier().save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    verifier = AutoModelForCausalLM.from_pretrained(folder)
    sh.Eagle3Speculator.from_verifier(verifier, tokenizer=chat_tokenizer).save_pretrained(tmp_path / "draft")
    return folder, tmp_path / "draft"


def test_demo_and_bench_prompt_a_chat_model_through_its_template(chat_pair, chat_tokenizer, tmp_path, monkeypatch):
    """With a chat template, demo and bench wrap the prompt as a user turn + the assistant's header (the default),
    and --no-chat sends the plain text."""
    import speculators_hf.bench as bench

    verifier_dir, draft_dir = chat_pair
    seen: list[list[int]] = []
    original = bench.run_bench

    def recording(verifier, prompts, *args, **kwargs):
        seen.extend(p[0].tolist() for p in prompts)
        return original(verifier, prompts, *args, **kwargs)

    monkeypatch.setattr(bench, "run_bench", recording)
    start = chat_tokenizer.convert_tokens_to_ids("<|im_start|>")
    header = chat_tokenizer("assistant\n", add_special_tokens=False).input_ids
    assert main(["demo", "--draft", str(draft_dir), "--prompt", "why is the draft fast", "--repeats", "1",
                 "--max-new-tokens", "4"]) == 0  # fmt: skip
    assert seen[-1][0] == start and seen[-1][-len(header) - 1 :] == [start, *header]
    prompts = tmp_path / "prompts.json"
    prompts.write_text('["why is the draft fast"]')
    bench_args = ["bench", "--verifier", str(verifier_dir), "--draft", f"d={draft_dir}", "--prompts", str(prompts),
                  "--k", "2", "--max-new-tokens", "4", "--no-prompt-lookup", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(bench_args) == 0
    assert seen[-1][0] == start
    assert main([*bench_args, "--no-chat"]) == 0
    assert seen[-1] == chat_tokenizer("why is the draft fast").input_ids


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "src", "dst", "--set", "mask_token_id"],
        ["train", "--verifier", "v", "--data", ".", "--output", "o", "--draft-arg", "=3"],
    ],
)
def test_key_value_options_are_refused_in_one_line_without_an_equals_sign(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("kernels", ["torch", "onednn"])
def test_generate_checks_its_output_with_either_cpu_kernels(kernels, capsys, monkeypatch):
    """Both kernels give the verifier's output; generate packs quietly (its stdout may be JSON, its errors one line
    on stderr), demo and bench say so in their report."""
    if kernels == "onednn" and not onednn_linear_available():
        pytest.skip("this torch has no oneDNN linear")
    import speculators_hf.cli as cli
    from speculators_hf.cpu_kernels import use_cpu_kernels

    packed = []
    monkeypatch.setattr(cli, "use_cpu_kernels", lambda *a: packed.append(use_cpu_kernels(*a)) or packed[-1])
    assert main(["generate", "--cpu-kernels", kernels, "--check", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr()
    assert "identical to the verifier alone: yes" in printed.out and "prepacked" not in printed.out + printed.err
    assert (packed[0] is not None and packed[0].count > 0) == (kernels == "onednn")
