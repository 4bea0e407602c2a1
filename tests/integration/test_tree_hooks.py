"""The three ways into the package's own loop besides `speculators_hf.generate`: transformers'
`custom_generate` hook, `speculators-hf generate`, and `speculators-hf bench --tree`."""

from __future__ import annotations

import json

import torch
from conftest import make_prompts, make_verifier
from test_batch import assert_rows_exact, left_padded

import speculators_hf as sh
from speculators_hf.bench import run_bench
from speculators_hf.cli import main
from speculators_hf.custom_generate import write_custom_generate


def test_custom_generate_hook_runs_the_tree_loop_from_a_draft_folder(tmp_path):
    verifier = make_verifier("qwen3")
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    draft.save_pretrained(tmp_path / "draft")
    write_custom_generate(tmp_path / "draft")
    prompts = make_prompts(3, seed=4)
    ids, mask = left_padded(prompts)
    out = verifier.generate(
        input_ids=ids, attention_mask=mask, custom_generate=str(tmp_path / "draft"), trust_remote_code=True,
        tree="dynamic:3:2:6", max_new_tokens=12, do_sample=False,
    )  # fmt: skip
    assert_rows_exact(verifier, prompts, out, 12)
    direct = sh.generate(verifier, draft, ids, mask, tree="dynamic:3:2:6", max_new_tokens=12)
    assert torch.equal(out, direct)
    # the loaded draft is reused for the next call with the same verifier
    again = verifier.generate(ids, attention_mask=mask, custom_generate=str(tmp_path / "draft"), trust_remote_code=True,
                              max_new_tokens=12)  # fmt: skip
    assert_rows_exact(verifier, prompts, again, 12)


def test_a_hook_file_written_by_an_earlier_version_still_runs(tmp_path):
    """Drafts pushed before the hook moved out of generation/ import it from there."""
    verifier = make_verifier("llama")
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    draft.save_pretrained(tmp_path / "draft")
    write_custom_generate(tmp_path / "draft")
    hook = tmp_path / "draft" / "custom_generate" / "generate.py"
    new_import = "from speculators_hf.custom_generate import custom_generate"
    assert new_import in hook.read_text()
    hook.write_text(
        hook.read_text().replace(new_import, new_import.replace(".custom_generate ", ".generation.custom_generate "))
    )
    prompts = make_prompts(2, seed=5)
    ids, mask = left_padded(prompts)
    out = verifier.generate(input_ids=ids, attention_mask=mask, custom_generate=str(tmp_path / "draft"),
                            trust_remote_code=True, max_new_tokens=8, do_sample=False)  # fmt: skip
    assert_rows_exact(verifier, prompts, out, 8)


def test_cli_generate_builtin_pair_is_exact(capsys):
    code = main(["generate", "--tree", "dynamic:3:2:6", "--prompt", "a", "--prompt", "longer prompt",
                 "--max-new-tokens", "6", "--check", "--json"])  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["identical"] is True
    assert len(data["rows"]) == 2 and all(row["emitted_tokens"] == 6 for row in data["rows"])
    assert data["stats"]["verifier_forwards"] >= 2


def test_bench_tree_rows_are_measured_and_exact():
    verifier = make_verifier(num_hidden_layers=4)
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    results = run_bench(
        verifier, make_prompts(2), {"eagle3": draft}, [2], max_new_tokens=10, prompt_lookup=False,
        trees=["dynamic:3:2:6", "chain:2"],
    )  # fmt: skip
    methods = {r.method: r for r in results}
    assert {"eagle3 (tree dynamic:3:2:6)", "eagle3 (tree chain:2)"} <= set(methods)
    assert all(r.exact and r.tau >= 1.0 for r in results)
    assert methods["eagle3 (tree chain:2)"].k == 2
