"""The benchmark runner measures real runs and reports them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_prompts, make_verifier

import speculators_hf as sh
from speculators_hf.bench import (
    interpolate,
    machine_description,
    markdown_table,
    plot_results,
    run_bench,
    verification_table,
    write_report,
)
from speculators_hf.generation.policy import verification_costs


def test_bench_runs_every_method_and_checks_exactness(tmp_path):
    verifier = make_verifier(num_hidden_layers=6)
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    small_lm = make_verifier(num_hidden_layers=1, seed=3)
    results = run_bench(verifier, make_prompts(3), {"eagle3": draft}, [2, 3], max_new_tokens=12, assistant_lm=small_lm)
    methods = [(r.method, r.k) for r in results]
    assert methods[0] == ("verifier alone", None)
    for k in (2, 3):
        assert (
            ("transformers assisted (small LM)", k) in methods
            and ("prompt lookup", k) in methods
            and ("eagle3", k) in methods
        )
    assert all(r.exact for r in results)
    ours = [r for r in results if r.method == "eagle3"]
    for r in ours:  # the ideal charges the tokens actually drafted per round (the first round drafts one)
        assert r.cost_ratio > 0 and 1 <= r.drafted_per_round <= r.k
        assert r.ideal_speedup == pytest.approx(r.tau / (1 + r.drafted_per_round * r.cost_ratio))
    assert all(r.tokens == 36 for r in results)

    out = write_report(results, tmp_path, {"machine": machine_description(), "command": "pytest"})
    text = (out / "results.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}: not strict JSON"))
    assert len(data["results"]) == len(results)
    assert next(r for r in data["results"] if r["method"] == "prompt lookup")["tau"] is None
    assert "| eagle3 | 2 |" in markdown_table(results)


def test_ideal_speedup_charges_what_was_drafted_and_the_verification_width():
    """An MLP speculator with 2 stages drafts at most 2 tokens whatever k: its ideal charges 2, not k = 5; with
    the verifier's pass cost by width, the width-charged ideal divides by v(k_d + 1) + k_d c."""
    verifier = make_verifier(num_hidden_layers=3)
    draft = sh.MLPSpeculator.from_verifier(verifier, n_predict=2)
    costs = {1: 1.0, 3: 1.5, 6: 2.0}
    (_alone, row) = run_bench(
        verifier, make_prompts(2), {"mlp": draft}, [5], max_new_tokens=10, prompt_lookup=False,
        verification_cost=costs, progress=False,
    )  # fmt: skip
    assert 1 < row.drafted_per_round <= 2
    k_d, c = row.drafted_per_round, row.cost_ratio
    assert row.ideal_speedup == pytest.approx(row.tau / (1 + k_d * c))
    width = 1.0 + 0.5 * k_d / 2  # linear between the widths 1 and 3
    assert row.ideal_speedup_width_charged == pytest.approx(row.tau / (width + k_d * c))
    assert row.measured_over_ideal == pytest.approx(row.speedup / row.ideal_speedup_width_charged)
    assert interpolate(costs, 4.5) == pytest.approx(1.75) and interpolate(costs, 9) == 2.0


def test_plot_has_one_question_per_panel(tmp_path):
    pytest.importorskip("matplotlib")
    verifier = make_verifier(num_hidden_layers=3)
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    results = run_bench(
        verifier, make_prompts(4), {"eagle3": draft}, [2, 3], max_new_tokens=6, prompt_lookup=False, batch_size=2,
        progress=False,
    )  # fmt: skip
    import matplotlib.pyplot as plt

    figures = []
    monkey_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return monkey_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        path = plot_results(results, {"machine": "test machine", "command": "bench"}, tmp_path / "p.png")
    finally:
        plt.Figure.savefig = monkey_savefig
    assert path is not None and path.stat().st_size > 0
    titles = [ax.get_title() for ax in figures[0].axes]
    assert titles == [
        "Speedup at each method's best k",
        "Acceptance length by k",
        "Throughput: batch 1 and batch 2 (own loop)",
    ]
    assert "test machine" in figures[0]._suptitle.get_text()
    for ax in figures[0].axes:  # legends outside the data (anchored right of the axes), never over it
        legend = ax.get_legend()
        assert legend is None or legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1


def test_bench_batched_rows_are_exact_per_row():
    """Batches of left-padded prompts: the verifier alone and the own loop, every row equal to the verifier
    run on that prompt by itself."""
    verifier = make_verifier(num_hidden_layers=4)
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    prompts = make_prompts(5, min_len=2, max_len=9)
    results = run_bench(verifier, prompts, {"eagle3": draft}, [3], max_new_tokens=10, prompt_lookup=False, batch_size=2)
    batched = [r for r in results if "batch 2" in r.method]
    assert [r.method for r in batched] == ["verifier alone (batch 2)", "eagle3 (batch 2, tree chain:3)"]
    assert all(r.exact and r.tokens == results[0].tokens for r in batched)


def test_bench_repeats_take_turns_and_report_the_median_run(monkeypatch):
    """Every prompt is run by every method in turn (transformers' loop calls the draft's `generate`, the own
    loop `speculators_hf.generate`), so a slow spell of the machine falls on all methods alike."""
    import speculators_hf.generation.loop as loop

    verifier = make_verifier(num_hidden_layers=3)
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    prompts = make_prompts(2)
    calls: list[str] = []

    def recorder(name, original):
        def recording(*args, **kwargs):
            if not calls or calls[-1] != name:
                calls.append(name)
            return original(*args, **kwargs)

        return recording

    monkeypatch.setattr(sh.Eagle3Speculator, "generate", recorder("assisted", sh.Eagle3Speculator.generate))
    monkeypatch.setattr(loop, "generate", recorder("own loop", loop.generate))
    results = run_bench(
        verifier, prompts, {"eagle3": draft}, [2], max_new_tokens=6, prompt_lookup=False, trees=["dynamic:3:2:4:1"],
        repeats=3,
    )  # fmt: skip
    assert calls == ["assisted", "own loop"] * len(prompts) * 3
    assert [r.method for r in results] == ["verifier alone", "eagle3", "eagle3 (tree dynamic:3:2:4:1)"]
    for r in results:
        runs = r.extra["seconds_of_each_run"]
        assert len(runs) == 3 and r.seconds == sorted(runs)[1] and r.exact
    assert results[2].tau >= 1.0 and results[1].cost_ratio > 0
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        run_bench(verifier, prompts, {}, [2], repeats=0)


def test_verification_costs_are_relative_to_one_token():
    verifier = make_verifier(num_hidden_layers=2)
    costs = verification_costs(verifier, [6, 3, 6], context=16, samples=3)
    assert sorted(costs) == [1, 3, 6] and costs[1] == 1.0 and all(c > 0 for c in costs.values())
    assert "| 6 |" in verification_table(costs)


def test_trees_are_skipped_for_drafts_that_draft_chains_in_one_pass():
    """A default `bench --tree dynamic:...` over every zoo family must not stop at P-EAGLE or DFlash."""
    from speculators_hf.bench import _can_draft

    verifier = make_verifier()
    dflash, eagle3 = sh.DFlashSpeculator.from_verifier(verifier), sh.Eagle3Speculator.from_verifier(verifier)
    assert [_can_draft(dflash, t) for t in ("chain:5", "auto:4", "dynamic:3:2:4", "[[0], [1]]")] == [
        True,
        True,
        False,
        False,
    ]
    assert _can_draft(eagle3, "dynamic:3:2:4")


def test_a_draft_with_a_confidence_head_gets_both_auto_stops():
    """DSpark's `auto` stops on its probability, or on its confidence head: the bench runs both (the comparison
    BENCHMARKS.md reports), and leaves the draft's own signal as it was."""
    verifier = make_verifier("qwen3", num_hidden_layers=4)
    dspark = sh.DSparkSpeculator.from_verifier(verifier, block_size=4, markov_rank=16)
    eagle3 = sh.Eagle3Speculator.from_verifier(verifier)
    seen = []
    original = type(dspark).predicted_acceptance

    def spy(self, state):
        seen.append(self.acceptance_signal)
        return original(self, state)

    type(dspark).predicted_acceptance = spy
    try:
        results = run_bench(
            verifier, make_prompts(2), {"dspark": dspark, "eagle3": eagle3}, ["auto"], max_new_tokens=8,
            prompt_lookup=False,
        )  # fmt: skip
    finally:
        type(dspark).predicted_acceptance = original
    assert [r.method for r in results] == [
        "verifier alone", "dspark (k auto)", "eagle3 (k auto)", "dspark (k auto, confidence stop)"
    ]  # fmt: skip
    assert all(r.exact for r in results)
    assert {"confidence", "probability"} <= set(seen)
    assert dspark.acceptance_signal == "probability"


def test_bench_in_half_precision_reports_differences_without_failing():
    """bfloat16: near-ties decided the other way in the verifier's multi-token passes make rows differ from the
    verifier alone; the column says how many prompts and that every token was the verifier's argmax in its pass,
    and the row does not fail (the command exits 0). The batch row is reported, not re-checked."""
    from test_half_precision import NearTieFlips, near_copy

    from speculators_hf.bench import identity

    verifier = make_verifier().to(torch.bfloat16)
    draft = near_copy(verifier)
    with NearTieFlips(verifier, margin=0.5):
        results = run_bench(
            verifier, make_prompts(6, seed=4), {"copy": draft}, [4], max_new_tokens=16, prompt_lookup=False,
            trees=["chain:4"], batch_size=2, progress=False,
        )  # fmt: skip
    rows = {r.method: r for r in results}
    differing = [r for r in results if not r.exact]
    assert rows["copy"] in differing and rows["copy (tree chain:4)"] in differing
    for r in differing:
        assert r.dtype == "bfloat16" and r.prompts == 6 and 0 < r.prompts_differing <= 6 and not r.failed
        assert identity(r).startswith(f"differs at {r.prompts_differing} of 6 prompts (bfloat16: expected at near-ties")
    assert rows["copy"].verified_in_pass and "each token the verifier's argmax in its pass" in identity(rows["copy"])
    assert rows["copy (batch 2, tree chain:4)"].verified_in_pass is None
    assert identity(rows["verifier alone"]) == "yes"
    assert "| copy | 4 |" in markdown_table(results) and "| NO |" not in markdown_table(results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bench_flags_a_loop_that_emits_tokens_the_verifier_did_not_choose(monkeypatch, dtype):
    """A broken own loop (every draft token accepted) is NO in float32 and in half precision alike; in float32
    any difference is NO, even one the verifier's multi-token passes decided."""
    from test_half_precision import NearTieFlips, accept_every_draft_token, near_copy

    import speculators_hf.generation.loop as loop
    from speculators_hf.bench import identity

    verifier = make_verifier().to(dtype)
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    monkeypatch.setattr(loop, "accept_greedy", accept_every_draft_token)
    results = run_bench(
        verifier, make_prompts(3, seed=5), {"eagle3": draft}, [3], max_new_tokens=12, prompt_lookup=False,
        trees=["chain:3"], progress=False,
    )  # fmt: skip
    broken = results[-1]
    assert broken.method == "eagle3 (tree chain:3)" and not broken.exact and broken.failed
    assert identity(broken) == "NO" and "| NO |" in markdown_table(results)
    assert not any(r.failed for r in results[:-1])
    if dtype == torch.bfloat16:
        assert broken.verified_in_pass is False
        assert "is not the verifier's argmax" in broken.extra["not_verified"][0]
    else:  # float32: the guarantee is identity, whatever decided the difference
        monkeypatch.undo()
        copy_draft = near_copy(verifier)
        with NearTieFlips(verifier, margin=0.5):
            flipped = run_bench(
                verifier, make_prompts(6, seed=4), {"copy": copy_draft}, [4], max_new_tokens=16, prompt_lookup=False,
                progress=False,
            )  # fmt: skip
        assert not flipped[1].exact and flipped[1].failed and identity(flipped[1]) == "NO"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_cli_exits_non_zero_only_when_the_guarantee_is_broken(monkeypatch, tmp_path, capsys, dtype):
    """`speculators-hf bench` on the zoo with near-ties decided the other way in the verifier's multi-token passes:
    in bfloat16 the rows that differ say so and the command exits 0; in float32 they are NO and it exits 1."""
    from test_half_precision import NearTieFlips

    import speculators_hf.bench as bench
    from speculators_hf.cli import main

    original = bench.run_bench

    def with_flips(verifier, *args, **kwargs):
        with NearTieFlips(verifier, margin=4.0):
            return original(verifier, *args, **kwargs)

    monkeypatch.setattr(bench, "run_bench", with_flips)
    args = ["bench", "--families", "eagle3", "--k", "4", "--num-prompts", "2", "--max-new-tokens", "16",
            "--dtype", dtype, "--out", str(tmp_path)]  # fmt: skip
    code = main(args)
    captured = capsys.readouterr()
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["verifier alone", "prompt lookup", "eagle3"]
    assert rows[2]["prompts_differing"] > 0 and rows[2]["dtype"] == dtype
    if dtype == "bfloat16":
        assert code == 0 and "differs at" in captured.out and "| NO |" not in captured.out
        assert rows[2]["verified_in_pass"] is True
    else:
        assert code == 1 and "| NO |" in captured.out and "NOT identical to the verifier alone" in captured.err
