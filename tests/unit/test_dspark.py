"""DSpark (`speculators_model_type = "dspark"`): the reference forward of the `speculators` library matched to 1e-5
for each Markov head type and with the confidence head (tests/golden/speculators-0.9.0-dspark, made by its
make_golden.py with speculators 0.9.0), the chain drafted token by token (each slot biased by the token picked
before it) equal to that forward, exact output in both loops, left-padded batches and `pipeline`, sampling that
follows the verifier (and a check that rejects a draft reporting the wrong q), loading with the package hidden,
the library's saves converted in and exported back with identical tensors, clear errors, and a training loss
(tokens and confidence) that learns, also from `speculators-hf train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    Replay,
    assert_rounds_match_recomputation,
    ks_critical_value,
    ks_uniform_statistic,
    make_prompts,
    make_verifier,
    propose_with,
    run_without_package,
    sampling_pit_values,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, pipeline

import speculators_hf as sh
from speculators_hf.config import SpeculatorConfig, SpeculatorConfigError
from speculators_hf.convert import ConversionError, convert, detect
from speculators_hf.generation.capture import verifier_hidden_states
from speculators_hf.generation.sampling import Sampler
from speculators_hf.models.dspark import MarkovHead

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "speculators-0.9.0-dspark"
VARIANTS = ["vanilla", "gated", "rnn", "confidence", "rnn-bonus-anchor"]


def golden_draft(variant: str) -> sh.DSparkSpeculator:
    """The library's saved draft, bound to a tiny verifier that holds the embedding it was made with."""
    config = SpeculatorConfig.from_dict(json.loads((GOLDEN / variant / "config.json").read_text()))
    draft = sh.DSparkSpeculator(config).eval()
    missing, unexpected = draft.load_state_dict(load_file(GOLDEN / variant / "model.safetensors"), strict=False)
    assert missing == [] and unexpected == []
    verifier = make_verifier("qwen3", vocab_size=96, hidden_size=32, num_hidden_layers=6)
    with torch.no_grad():
        verifier.get_input_embeddings().weight.copy_(load_file(GOLDEN / variant / "golden.safetensors")["embed"])
    return draft.bind_verifier(verifier)


def golden_outputs(draft, variant: str) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    golden = load_file(GOLDEN / variant / "golden.safetensors")
    with torch.no_grad():
        logits, confidence = draft.parallel_heads(
            golden["tokens"], list(golden["aux"].chunk(3, dim=-1)), golden["anchors"][None]
        )
    return logits[0].flatten(0, 1), None if confidence is None else confidence[0].flatten(), golden


def strong_markov(draft: sh.DSparkSpeculator) -> sh.DSparkSpeculator:
    """The Markov head with W1 rows N(0, 1) (the library starts them at N(0, 0.01)): a bias that outweighs the
    block's logits, so that every chain depends on its path."""
    with torch.no_grad():
        draft.markov_head.markov_w1.weight.normal_(generator=torch.Generator().manual_seed(0))
    return draft


def bigram_pair(kind: str = "vanilla", sample_from_anchor: bool = True, attention: float = 0.0, **verifier_kwargs):
    """A verifier whose next token depends on the last one only (its attention outputs scaled by `attention`,
    0: exactly), and a DSpark draft whose Markov head holds that verifier's table of next-token logits by last
    token over block logits of zero: it proposes the verifier's own distribution, token by token along its path
    (gated: a gate near 1 that varies with the slot's state; rnn: the output read from the W1 row alone)."""
    verifier = make_verifier("qwen3", **verifier_kwargs)
    vocab = verifier.config.vocab_size
    with torch.no_grad():
        for layer in verifier.model.layers:
            layer.self_attn.o_proj.weight.mul_(attention)
        table = verifier(torch.arange(vocab)[:, None]).logits[:, 0]  # [last token, next token]
    draft = sh.DSparkSpeculator.from_verifier(
        verifier, draft_vocab_size=vocab - 1, block_size=4, markov_rank=vocab, markov_head_type=kind,
        sample_from_anchor=sample_from_anchor, enable_confidence_head=False,
    )  # fmt: skip
    head = draft.markov_head
    with torch.no_grad():
        draft.lm_head.weight.zero_()
        head.markov_w1.weight.copy_(torch.eye(vocab))
        head.markov_w2.weight.copy_(table[:, : vocab - 1].T)  # the default draft vocabulary: ids 0 .. vocab - 2
        if kind == "gated":
            head.gate_proj.bias.fill_(3.0)
        elif kind == "rnn":
            head.joint_proj.weight.zero_()
            head.joint_proj.bias.zero_()
            head.joint_proj.weight[2 * vocab :, vocab : 2 * vocab] = 30.0 * torch.eye(vocab)  # tanh(30 e) = e
    return verifier, draft


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_the_speculators_library(variant):
    draft = golden_draft(variant)
    logits, confidence, golden = golden_outputs(draft, variant)
    torch.testing.assert_close(logits, golden["draft_logits"], rtol=1e-5, atol=1e-5)
    assert (confidence is None) == ("confidence_logits" not in golden)
    if confidence is not None:
        torch.testing.assert_close(confidence, golden["confidence_logits"], rtol=1e-5, atol=1e-5)


def _stateless_rnn(self, embedded, hidden):
    """Mutant: the rnn state restarts at every slot."""
    return self.step(embedded, hidden, torch.zeros_like(embedded))[0]


@pytest.mark.parametrize(
    "variant, mutant, slots_changed",
    [
        ("vanilla", "shifted", [1, 2, 3]),  # each slot biased by its target's token instead of the one before
        ("gated", "no_bias", [0, 1, 2, 3]),
        ("rnn", "stateless", [1, 2, 3]),  # slot 0 starts from the zero state either way
        ("rnn-bonus-anchor", "stateless", [1, 2, 3]),  # slot 1 needs the state after the anchor slot's step
    ],
)
def test_the_reference_check_rejects_a_wrong_markov_rule(variant, mutant, slots_changed, monkeypatch):
    draft = golden_draft(variant)
    if mutant == "shifted":
        draft.config.sample_from_anchor = False  # read as: the previous token one slot later
    elif mutant == "no_bias":
        draft.markov_head = None
    else:
        monkeypatch.setattr(MarkovHead, "block_bias", _stateless_rnn)
    got, _, golden = golden_outputs(draft, variant)
    want = golden["draft_logits"]
    changed = [k for k in range(4) if not torch.allclose(got[k::4], want[k::4], atol=1e-5)]
    assert changed == slots_changed


@pytest.mark.parametrize("variant", ["vanilla", "gated", "rnn", "rnn-bonus-anchor"])
def test_drafting_token_by_token_equals_the_parallel_forward(variant):
    """A chain along given tokens (not the draft's own choices) has, at every depth, the logits the library's
    forward gives the block whose data are those tokens: each slot is biased by the token picked before it."""
    draft = golden_draft(variant)  # its W1 rows are N(0, 0.3): the bias matters
    n, k = 9, draft.config.tokens_per_block
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 90, (1, n), generator=gen)
    chain = torch.randint(3, 90, (1, k), generator=gen)
    states = [torch.randn(1, n - 1, 32, generator=gen) for _ in draft.verifier_layer_ids()]
    tokens, scores = propose_with(draft, prompt, states, k, Replay(chain))
    assert torch.equal(tokens, chain)
    features = [torch.cat([s, torch.zeros(1, k + 1, 32)], dim=1) for s in states]  # entries >= n - 1: unseen
    with torch.no_grad():
        logits = draft.parallel_forward(torch.cat([prompt, chain], dim=1), features, torch.tensor([[n - 1]]))
    first = int(not draft.config.sample_from_anchor)
    reference = draft.expand_vocab(logits[0, 0, first:])
    torch.testing.assert_close(torch.stack(scores, dim=1)[0], reference, rtol=1e-5, atol=1e-5)
    other, _ = propose_with(draft, prompt, states, k)  # the draft's own greedy chain differs: the bias mattered
    assert not torch.equal(other, chain)


def test_the_confidence_head_is_the_stop_signal_of_auto():
    """With the confidence head chosen as the signal, a chain that `auto` stops (`stop_below`) stops where the product of the head's
    predicted acceptances falls below the threshold; each prediction is sigmoid of the library's confidence logit
    for that slot along the chain. "probability" reads the draft's probabilities instead: moving the head's bias
    then changes nothing (and with the head, it is what moves the stop)."""
    draft = golden_draft("confidence")
    n, k = 9, draft.config.tokens_per_block
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 90, (1, n), generator=gen)
    states = [torch.randn(1, n - 1, 32, generator=gen) for _ in draft.verifier_layer_ids()]

    def chain(stop_below: float | None):
        from speculators_hf.generation.session import feed_and_draft

        features = [torch.nn.functional.pad(f, (0, 0, 1, 0)) for f in states]
        sampler = Sampler(do_sample=False)
        sampler.begin_round([0], [prompt[0]])
        with torch.no_grad():
            return feed_and_draft(draft, draft.new_tree_state(1), prompt, 0, features, k, sampler, stop_below)[0]

    assert draft.acceptance_signal == "probability" and draft.acceptance_signals == ("probability", "confidence")
    draft.acceptance_signal = "confidence"
    full = chain(None)
    assert full.size == k and full.confidence is None
    features = [torch.cat([s, torch.zeros(1, k + 1, 32)], dim=1) for s in states]
    with torch.no_grad():
        _, logits = draft.parallel_heads(torch.cat([prompt, full.tokens], dim=1), features, torch.tensor([[n - 1]]))
    first = int(not draft.config.sample_from_anchor)
    predicted = logits[0, 0, first:].sigmoid().cumprod(0)  # P(the chain is accepted up to each depth)
    stopped = chain(0.0)
    torch.testing.assert_close(stopped.confidence[0], predicted, rtol=1e-5, atol=1e-6)
    threshold = float(predicted[1] + predicted[2]) / 2  # between depths 2 and 3: stops after the third token
    assert chain(threshold).size == 3
    with torch.no_grad():
        draft.confidence_head.proj.bias.add_(20.0)  # predicts acceptance 1 everywhere: never stops
    assert chain(threshold).size == k
    draft.acceptance_signal = "probability"
    by_probability = chain(threshold).size
    with torch.no_grad():
        draft.confidence_head.proj.bias.sub_(40.0)
    assert chain(threshold).size == by_probability
    draft.acceptance_signal = "confidence"
    assert chain(threshold).size == 1


def test_greedy_exact_when_auto_stops_on_the_confidence_head():
    """The head's stop changes only how long the chains are: the output stays the verifier's in both loops."""
    verifier = make_verifier("qwen3", eos_token_id=None)
    draft = sh.DSparkSpeculator.from_verifier(verifier, draft_vocab_size=verifier.config.vocab_size, block_size=4)
    draft.acceptance_signal = "confidence"
    for prompt in make_prompts(2, seed=3):
        ref = verifier.generate(prompt, max_new_tokens=14, do_sample=False)
        got = verifier.generate(
            prompt, max_new_tokens=14, do_sample=False, assistant_model=draft, num_assistant_tokens="auto"
        )
        assert torch.equal(ref, got)
        assert torch.equal(ref, sh.generate(verifier, draft, prompt, tree="auto", max_new_tokens=14))


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[1] for p in prompts)
    ids, mask = torch.zeros(len(prompts), width, dtype=torch.long), torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[1] :], mask[i, width - p.shape[1] :] = p[0], 1
    return ids, mask


@pytest.mark.parametrize("kind, sample_from_anchor", [("vanilla", True), ("gated", True), ("rnn", False)])
def test_greedy_exact_in_both_loops_and_left_padded_batches(kind, sample_from_anchor):
    """Against a verifier close to the draft's table (attention at 5%): some proposals accepted, some not."""
    verifier, draft = bigram_pair(kind, sample_from_anchor, attention=0.05, eos_token_id=None)
    k = draft.config.tokens_per_block
    assert draft.config.speculative_tokens == k == 4 - (not sample_from_anchor) and draft.max_tree_depth() == k
    prompts = make_prompts(4, seed=7)
    for prompt in prompts[:2]:
        ref = verifier.generate(prompt, max_new_tokens=14, do_sample=False)
        for length in (2, 9, "auto"):  # 9: more than a block holds, cut to it
            got = verifier.generate(
                prompt, max_new_tokens=14, do_sample=False, assistant_model=draft, num_assistant_tokens=length
            )
            assert torch.equal(ref, got)
        for tree in (f"chain:{k}", "chain:4:0.3", "auto"):
            assert torch.equal(ref, sh.generate(verifier, draft, prompt, tree=tree, max_new_tokens=14))
    ids, mask = left_padded(prompts)
    out = sh.generate(verifier, draft, ids, mask, max_new_tokens=12, return_dict_in_generate=True)
    for i, prompt in enumerate(prompts):
        ref = verifier.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :]
        assert torch.equal(out.sequences[i, ids.shape[1] :], ref), i
    assert 0 < out.stats.accepted_tokens < out.stats.drafted_tokens


def test_rounds_in_transformers_loop_match_drafting_from_scratch():
    """The block and the rnn state kept between rounds give what drafting from the whole prefix gives."""
    verifier = make_verifier()
    draft = sh.DSparkSpeculator.from_verifier(
        verifier, draft_vocab_size=verifier.config.vocab_size, block_size=4, markov_rank=16, markov_head_type="rnn"
    )
    assert_rounds_match_recomputation(verifier, strong_markov(draft))


def _sampled_pit(tree="chain:4", kind: str = "vanilla", accepted: int = 500) -> tuple[float, float]:
    """KS statistic (and critical value) of the PIT values of 150 sampled continuations drafted as `tree` (trees:
    `test_dspark_trees.py`) with a draft that proposes the verifier's own distribution (`bigram_pair`), so many
    tokens (more than `accepted`) are drafted ones."""
    verifier, draft = bigram_pair(kind, pad_token_id=None, eos_token_id=None)
    prompt = make_prompts(1, seed=3)[0]
    torch.manual_seed(0)
    out = sh.generate(
        verifier, draft, prompt.expand(150, -1), tree=tree, max_new_tokens=8, do_sample=True, top_k=0,
        return_dict_in_generate=True,
    )  # fmt: skip
    assert out.stats.accepted_tokens > accepted, out.stats
    values = sampling_pit_values(verifier, [row[None] for row in out.sequences], prompt.shape[1], 1.0)
    return ks_uniform_statistic(values), ks_critical_value(len(values), 1e-3)


def test_sampling_follows_the_verifier_and_the_check_rejects_a_wrong_q(monkeypatch):
    stat, crit = _sampled_pit()
    assert stat < crit
    # mutant: each token is drawn with its Markov bias, but the q reported for the acceptance test is the block's
    # unbiased one (the slot's logits are recognised by their storage when the chain picks from them)
    unbiased: dict[int, torch.Tensor] = {}
    slot_logits, pick = sh.DSparkSpeculator.slot_logits, Sampler.pick

    def recording(self, state, slot, previous, handles):
        logits, handles = slot_logits(self, state, slot, previous, handles)
        unbiased.clear()
        unbiased[logits.data_ptr()] = self.expand_vocab(state.tensors["block_logits"][:, slot])
        return logits, handles

    def wrong_q(self, logits, path=None):
        token, scores = pick(self, logits, path)
        drawn_without_bias = unbiased.pop(logits.data_ptr(), None)
        return token, scores if drawn_without_bias is None else self.scores(drawn_without_bias, path)

    monkeypatch.setattr(sh.DSparkSpeculator, "slot_logits", recording)
    monkeypatch.setattr(Sampler, "pick", wrong_q)
    stat, crit = _sampled_pit()
    assert stat > crit


def test_pipeline_returns_the_same_text(tiny_tokenizer):
    verifier = make_verifier(vocab_size=len(tiny_tokenizer))
    draft = strong_markov(sh.DSparkSpeculator.from_verifier(verifier, tokenizer=tiny_tokenizer, markov_rank=16))
    plain = pipeline("text-generation", model=verifier, tokenizer=tiny_tokenizer)
    assisted = pipeline("text-generation", model=verifier, tokenizer=tiny_tokenizer, assistant_model=draft)
    for text in ["the draft model", "fast"]:
        expected = plain(text, max_new_tokens=15, do_sample=False)[0]["generated_text"]
        assert assisted(text, max_new_tokens=15, do_sample=False)[0]["generated_text"] == expected


def test_loads_and_stays_exact_with_the_package_hidden(tmp_path):
    verifier = make_verifier("qwen3")
    draft = sh.DSparkSpeculator.from_verifier(verifier, draft_vocab_size=64, markov_rank=16, markov_head_type="rnn")
    strong_markov(draft)
    verifier.save_pretrained(tmp_path / "verifier")
    draft.save_pretrained(tmp_path / "draft")
    saved = load_file(tmp_path / "draft" / "model.safetensors")
    assert {"markov_head.joint_proj.weight", "confidence_head.proj.weight"} <= set(saved)
    assert "embed_tokens.weight" not in saved
    prompts = [p.tolist() for p in make_prompts(3, seed=9)]
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        draft = AutoModelForCausalLM.from_pretrained("draft", trust_remote_code=True)
        assert type(draft).__name__ == "DSparkSpeculator" and draft.config.markov_head_type == "rnn"
        verifier = AutoModelForCausalLM.from_pretrained("verifier").eval()
        draft.bind_verifier(verifier)
        for prompt in {prompts}:
            ids = torch.tensor(prompt)
            ref = verifier.generate(ids, max_new_tokens=12, do_sample=False)
            got = verifier.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
            assert torch.equal(ref, got), (ref, got)
        print("EXACT", float(draft.markov_head.joint_proj.weight.sum()))
        """,
        cwd=tmp_path,
    )
    assert f"EXACT {float(draft.markov_head.joint_proj.weight.detach().sum())}" in out


def test_without_a_markov_head_it_is_dflash():
    """markov_rank 0 and no confidence head: DFlash's tensors and DFlash's logits."""
    verifier = make_verifier("qwen3")
    fields = {"draft_vocab_size": 64, "block_size": 4, "sample_from_anchor": True}
    dspark = sh.DSparkSpeculator.from_verifier(verifier, markov_rank=0, enable_confidence_head=False, **fields)
    dflash = sh.DFlashSpeculator.from_verifier(verifier, **fields)
    assert dspark.state_dict().keys() == dflash.state_dict().keys()
    dflash.load_state_dict(dspark.state_dict())
    ids = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    features = [torch.randn(1, 10, 32) for _ in dspark.verifier_layer_ids()]
    anchors = torch.tensor([[1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(
            dspark.parallel_forward(ids, features, anchors), dflash.parallel_forward(ids, features, anchors)
        )


def test_errors_name_the_problem_and_the_fix():
    config = json.loads((GOLDEN / "vanilla" / "config.json").read_text())
    with pytest.raises(SpeculatorConfigError, match=r"markov_head_type: Input should be 'vanilla', 'gated' or 'rnn'"):
        SpeculatorConfig.from_dict({**config, "markov_head_type": "lstm"})
    with pytest.raises(SpeculatorConfigError, match=r"markov_rank: Input should be greater than or equal to 0"):
        SpeculatorConfig.from_dict({**config, "markov_rank": -1})
    with pytest.raises(
        SpeculatorConfigError, match=r"confidence_head_with_markov: .*markov_rank is 0 .*set confidence_head_with_mar"
    ):
        SpeculatorConfig.from_dict({**config, "markov_rank": 0, "enable_confidence_head": True})
    assert SpeculatorConfig.from_dict({**config, "markov_rank": 0}).markov_rank == 0  # no confidence head: fine


def test_the_training_loss_learns_tokens_and_confidence():
    """A few optimiser steps on two sequences lower the loss of every slot and the confidence head's error."""
    verifier = make_verifier("qwen3")
    draft = sh.DSparkSpeculator.from_verifier(
        verifier, draft_vocab_size=64, block_size=4, markov_rank=16, markov_head_type="gated"
    )
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    draft.prepare_training(ids, torch.ones_like(ids), verifier)
    with torch.no_grad():
        features = [f.detach() for f in verifier_hidden_states(verifier, ids, draft.verifier_layer_ids())]
    loss_mask = torch.ones_like(ids)
    optimiser = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    torch.manual_seed(0)
    first, metrics = draft.training_loss(ids, loss_mask, features)
    for _ in range(40):
        loss, _ = draft.training_loss(ids, loss_mask, features)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    last, last_metrics = draft.training_loss(ids, loss_mask, features)
    assert sorted(metrics) == ["acc_0", "acc_1", "acc_2", "acc_3", "confidence_error", "confidence_loss", "loss"]
    assert last < 0.5 * first
    assert all(last_metrics[f"acc_{j}"] > metrics[f"acc_{j}"] for j in range(4)), (metrics, last_metrics)
    assert last_metrics["confidence_error"] < metrics["confidence_error"]
    assert draft.markov_head.gate_proj.weight.grad is not None and draft.confidence_head.proj.weight.grad is not None


def test_trains_from_the_cli_with_its_own_arguments(tmp_path):
    """`train --family dspark --draft-arg markov_head_type=gated`: the arguments reach `from_verifier`, the draft
    trains and stays exact; a wrong one is refused in one line."""
    from speculators_hf.cli import main
    from speculators_hf.training.data import save_blocks

    verifier = make_verifier(eos_token_id=None)
    verifier.save_pretrained(tmp_path / "verifier")
    ids = torch.randint(3, 90, (10, 16), generator=torch.Generator().manual_seed(0))
    save_blocks(tmp_path / "data", ids, torch.ones_like(ids, dtype=torch.uint8), {"verifier": "verifier"})
    argv = ["train", "--verifier", str(tmp_path / "verifier"), "--data", str(tmp_path / "data"), "--steps", "2"]
    argv += ["--family", "dspark", "--batch-size", "2", "--eval-blocks", "0", "--draft-arg", "block_size=4"]
    args = ["--draft-arg", "markov_head_type=gated", "--draft-arg", "markov_rank=16"]
    assert main([*argv, "--output", str(tmp_path / "out"), *args]) == 0
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").bind_verifier(verifier)
    assert isinstance(draft, sh.DSparkSpeculator) and draft.config.markov_head_type == "gated"
    assert (draft.config.markov_rank, draft.config.speculative_tokens) == (16, 4)
    prompt = make_prompts(1)[0]
    ref = verifier.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(ref, verifier.generate(prompt, max_new_tokens=8, do_sample=False, assistant_model=draft))
    with pytest.raises(
        SystemExit, match=r"(?s)--draft-arg .*not accepted by a new dspark draft.*markov_head_type: Input should be"
    ):
        main([*argv, "--output", str(tmp_path / "bad"), "--draft-arg", "markov_head_type=lstm"])


# --------------------------------------------------------------------------------------------------
# conversion: the library's saves in, `--to speculators` / `--to vllm` out
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, warns", [("confidence", False), ("rnn-bonus-anchor", True)])
def test_the_library_save_converts_in_keeps_its_logits_and_exports_back(tmp_path, variant, warns):
    assert detect(GOLDEN / variant).name == "speculators_dspark"
    out = convert(GOLDEN / variant, tmp_path / "ours")
    draft = sh.load_draft(out)
    assert isinstance(draft, sh.DSparkSpeculator)
    reference = golden_draft(variant)
    draft.bind_verifier(reference.verifier)
    logits, confidence, golden = golden_outputs(draft, variant)
    torch.testing.assert_close(logits, golden["draft_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(confidence, golden["confidence_logits"], rtol=1e-5, atol=1e-5)
    original = load_file(GOLDEN / variant / "model.safetensors")
    source = json.loads((GOLDEN / variant / "config.json").read_text())
    for target in ("speculators", "vllm"):
        messages: list[str] = []
        exported = convert(out, tmp_path / target, to=target, log=messages.append)
        again = load_file(exported / "model.safetensors")
        assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
        config = json.loads((exported / "config.json").read_text())
        assert set(source) <= set(config) and config["model_type"] == "speculators"
        fields = ("speculators_model_type", "markov_rank", "markov_head_type", "sample_from_anchor")
        assert all(config[key] == source[key] for key in fields)
        warned = [m for m in messages if "vLLM builds only the vanilla Markov head" in m]
        assert bool(warned) == warns, messages


def test_a_mismatched_markov_tensor_is_named(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text((GOLDEN / "gated" / "config.json").read_text())
    tensors = load_file(GOLDEN / "gated" / "model.safetensors")
    tensors["markov_head.gate_proj.weight"] = torch.zeros(8, 32)
    save_file(tensors, str(source / "model.safetensors"))
    with pytest.raises(
        ConversionError, match=r"'markov_head\.gate_proj\.weight' has shape \(8, 32\), the config implies \(8, 40\)"
    ):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
