"""The benchmark zoo ships this package's remote code beside each draft: it must be exactly what the package writes
today (`python -m speculators_hf.zoo` refreshes it), and a machine without the package must load and run it."""

from __future__ import annotations

import pytest
from conftest import run_without_package

from speculators_hf.zoo import remote_code_drift, zoo_dir

pytestmark = pytest.mark.skipif(zoo_dir() is None, reason="the benchmark zoo is not in this checkout")


def test_the_zoo_remote_code_equals_the_package_modules():
    assert remote_code_drift() == {}, "run `python -m speculators_hf.zoo` to refresh the zoo's remote code"


def test_the_committed_smollm2_draft_carries_todays_remote_code(tmp_path):
    """`benchmarks/smollm2/eagle3` (the README walkthrough's trained draft) ships remote code too: a user loading it
    with `trust_remote_code=True` must get the package's modules of this commit."""
    from pathlib import Path

    from speculators_hf.models import FAMILIES
    from speculators_hf.remote_code import write_remote_code

    folder = Path(__file__).resolve().parents[2] / "benchmarks" / "smollm2" / "eagle3"
    write_remote_code(FAMILIES["eagle3"], tmp_path)
    fresh = {p.name: p.read_bytes() for p in tmp_path.glob("speculators_*.py")}
    committed = {p.name: p.read_bytes() for p in folder.glob("speculators_*.py")}
    stale = sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))
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
