"""The benchmark zoo ships this package's remote code beside each draft: it must be exactly what the package writes
today (`python -m speculators_hf.zoo` refreshes it), and a machine without the package must load and run it."""

from __future__ import annotations

import pytest
from conftest import run_without_package

from speculators_hf.zoo import folder_remote_code_drift, remote_code_drift, smollm2_draft_dir, zoo_dir

pytestmark = pytest.mark.skipif(zoo_dir() is None, reason="the benchmark zoo is not in this checkout")


def test_the_zoo_remote_code_equals_the_package_modules():
    assert remote_code_drift() == {}, "run `python -m speculators_hf.zoo` to refresh the zoo's remote code"


def test_the_committed_smollm2_draft_carries_todays_remote_code():
    """`benchmarks/smollm2/eagle3` (the README walkthrough's trained draft) ships remote code too: a user loading it
    with `trust_remote_code=True` must get the package's modules of this commit."""
    folder = smollm2_draft_dir()
    assert folder is not None, "benchmarks/smollm2/eagle3 is missing from this checkout"
    stale = folder_remote_code_drift(folder, "eagle3")
    assert not stale, f"{stale} differ: run `python -m speculators_hf.zoo` to refresh {folder} and the zoo"


def test_a_zoo_draft_runs_as_remote_code_without_the_package(tmp_path):
    root = zoo_dir()
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        hub = {str(root / "hub")!r}
        kw = dict(cache_dir=hub, local_files_only=True)
        verifier = AutoModelForCausalLM.from_pretrained("speculators-hf/zoo-verifier", **kw)
        draft = AutoModelForCausalLM.from_pretrained("speculators-hf/zoo-eagle3", trust_remote_code=True, **kw)
        draft.bind_verifier(verifier)
        prompt = torch.tensor([[ord(c) % 200 + 10 for c in "def main(argv):"]])
        ref = verifier.generate(prompt, max_new_tokens=24, do_sample=False)
        out = verifier.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=draft)
        print("identical", torch.equal(ref, out), "tau", draft.generation_stats.tau)
        """,
        tmp_path,
    )
    assert "identical True" in out and float(out.split("tau ")[1]) > 1.5
