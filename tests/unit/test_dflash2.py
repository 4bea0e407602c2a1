"""DFlash2 (`speculators_model_type = "dflash2"`): the reference forward of the `speculators` library matched to
1e-5 (tests/golden/speculators-0.9.0-dflash2, made by its make_golden.py with speculators 0.9.0: unary logits,
selector training candidates and their scores, with 2 and 3 convolution taps, with and without
`sample_from_anchor`) and checks that reject a wrong convolution or predecessor rule; the chain drafted token by
token (each slot rescored after the token picked before it) equal to that forward; exact output in both loops,
left-padded batches and `pipeline`; sampling that follows the verifier under several settings (and a check that
rejects a draft reporting the wrong q); loading with the package hidden; the library's saves converted in and
exported back with identical tensors; clear errors; and a training loss (tokens and selector) that learns, also
from `speculators-hf train`."""

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
from speculators_hf.models.dflash2 import GroupedDynamicConv, selector_training_candidates

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "speculators-0.9.0-dflash2"
VARIANTS = ["default", "anchor-k3"]


def golden_draft(variant: str) -> sh.DFlash2Speculator:
    """The library's saved draft, bound to a tiny verifier that holds the embedding and lm_head it was made with."""
    config = SpeculatorConfig.from_dict(json.loads((GOLDEN / variant / "config.json").read_text()))
    draft = sh.DFlash2Speculator(config).eval()
    missing, unexpected = draft.load_state_dict(load_file(GOLDEN / variant / "model.safetensors"), strict=False)
    assert missing == [] and unexpected == []
    golden = load_file(GOLDEN / variant / "golden.safetensors")
    verifier = make_verifier("qwen3", vocab_size=96, hidden_size=32, num_hidden_layers=6)
    with torch.no_grad():
        verifier.get_input_embeddings().weight.copy_(golden["embed"])
        verifier.get_output_embeddings().weight.copy_(golden["head"])
    return draft.bind_verifier(verifier)


def golden_outputs(draft, variant: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Our unary logits [16, V] of the golden blocks and our selector's scores of the library's training
    candidates [16, k] (after our predecessors), with the golden tensors."""
    golden = load_file(GOLDEN / variant / "golden.safetensors")
    with torch.no_grad():
        unary, hidden, previous = draft.parallel_heads(
            golden["tokens"], list(golden["aux"].chunk(3, dim=-1)), golden["anchors"][None]
        )
        unary, hidden, previous = unary[0].flatten(0, 1), hidden[0].flatten(0, 1), previous[0].flatten()
        scores = draft.candidate_selector.scores(unary, hidden, previous, golden["training_candidate_ids"])
    return unary, scores, golden


def changed_blocks(got: torch.Tensor, want: torch.Tensor) -> list[int]:
    return [b for b in range(4) if not torch.allclose(got[4 * b : 4 * b + 4], want[4 * b : 4 * b + 4], atol=1e-5)]


def changed_slots(got: torch.Tensor, want: torch.Tensor) -> list[int]:
    return [k for k in range(4) if not torch.allclose(got[k::4], want[k::4], atol=1e-5)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_the_speculators_library(variant):
    draft = golden_draft(variant)
    unary, scores, golden = golden_outputs(draft, variant)
    torch.testing.assert_close(unary, golden["unary_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, golden["candidate_logits"], rtol=1e-5, atol=1e-5)
    # the training candidates: our unary top-k, the library's target put last where it is missing
    top = unary.topk(draft.config.selector_top_k, dim=-1).indices
    candidates, places, found = selector_training_candidates(top, golden["target_ids"])
    assert torch.equal(candidates, golden["training_candidate_ids"])
    assert torch.equal(places, golden["target_positions"])
    assert 0 < int(found.sum()) < found.numel() or variant == "default"  # both cases occur in anchor-k3


@pytest.mark.parametrize(
    "variant, mutant, unary_blocks, score_slots",
    [
        ("default", "no_conv", [0, 1, 2, 3], [0, 1, 2, 3]),  # the identity instead of the trained convolutions
        ("default", "across_blocks", [1, 2, 3], [0, 1, 2, 3]),  # taps reach into the previous block's last slot
        ("default", "shifted", [], [1, 2, 3]),  # each slot rescored after its target instead of the token before
        ("anchor-k3", "shifted", [], [1, 2, 3]),  # slot 0 follows the anchor either way
    ],
)
def test_the_reference_check_rejects_a_wrong_rule(variant, mutant, unary_blocks, score_slots):
    draft = golden_draft(variant)
    for layer in draft.layers:
        for conv in (layer.attention_conv, layer.mlp_conv):
            if mutant == "no_conv":
                conv.reset_parameters()
            elif mutant == "across_blocks":
                conv.block_size = 1000
    if mutant == "shifted":
        draft.config.sample_from_anchor = not draft.config.sample_from_anchor  # read: the token one slot later
    unary, scores, golden = golden_outputs(draft, variant)
    assert changed_blocks(unary, golden["unary_logits"]) == unary_blocks
    assert changed_slots(scores, golden["candidate_logits"]) == score_slots


def test_the_convolution_is_the_library_s():
    """Each output slot mixes its own and earlier slots of its block only, each tap with base + delta weights."""
    conv = GroupedDynamicConv(hidden_size=4, block_size=3, taps=2, group_size=2)
    with torch.no_grad():
        conv.base_kernel.copy_(torch.arange(16.0).view(2, 2, 4))
    x = torch.randn(1, 6, 4)
    deltas = torch.randn(1, 6, 2, 2)
    out = conv.convolve(x, deltas, 1)
    base = conv.base_kernel[1]
    for k in range(6):
        want = (base[0] + deltas[0, k, 0].repeat_interleave(2)) * x[0, k]
        if k % 3:
            want = want + (base[1] + deltas[0, k, 1].repeat_interleave(2)) * x[0, k - 1]
        torch.testing.assert_close(out[0, k], want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_drafting_token_by_token_equals_the_parallel_forward(variant):
    """A chain along given tokens (not the draft's own choices) has, at every depth, the logits the forward gives
    the block whose data are those tokens (each slot's top-k rescored after the token before it), and a different
    token picked changes the next depth's logits."""
    draft = golden_draft(variant)
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
    got = torch.stack(scores, dim=1)[0]
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    assert (got > float("-inf")).sum(-1).tolist() == [draft.config.selector_top_k] * k  # top-k, zero elsewhere
    other = chain.clone()
    other[0, 0] = (chain[0, 0] + 1) % 90
    _, other_scores = propose_with(draft, prompt, states, k, Replay(other))
    torch.testing.assert_close(other_scores[0], scores[0])
    assert not torch.allclose(other_scores[1], scores[1])  # the path decides the next slot's scores


def bigram_pair(top_k: int | None = None, attention: float = 0.0, **verifier_kwargs):
    """A verifier whose next token depends on the last one only (its attention outputs scaled by `attention`,
    0: exactly), and a DFlash2 draft whose selector holds that verifier's table of next-token logits by last token:
    its layers pass the block's embeddings through (every mask slot the same state h, its unary logits near zero),
    its hidden projection maps h to ones, its predecessor codebook is the identity and its successor codebook the table less the unary logits,
    so with `top_k` = V (the default) it proposes the verifier's own distribution along its path, and with a
    smaller one that distribution restricted to the unary top-k."""
    verifier = make_verifier("qwen3", **verifier_kwargs)
    vocab = verifier.config.vocab_size
    with torch.no_grad():
        for layer in verifier.model.layers:
            layer.self_attn.o_proj.weight.mul_(attention)
        table = verifier(torch.arange(vocab)[:, None]).logits[:, 0]  # [last token, next token]
    draft = sh.DFlash2Speculator.from_verifier(
        verifier, block_size=4, selector_rank=vocab, selector_top_k=top_k or vocab
    ).eval()
    selector = draft.candidate_selector
    with torch.no_grad():
        for layer in draft.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        draft.norm.weight.mul_(0.01)  # unary logits near zero: the selector alone shapes the proposals
        hidden = draft.norm(draft.embed(torch.tensor([draft.mask_token])))[0]
        unary = draft.draft_logits(draft.embed(torch.tensor([draft.mask_token])))[0]
        selector.hidden_projection.weight.copy_(torch.ones(vocab, 1) * hidden / hidden.dot(hidden))
        selector.predecessor_codebook.copy_(torch.eye(vocab))
        selector.successor_codebook.copy_((table - unary).T)
    return verifier, draft


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[1] for p in prompts)
    ids, mask = torch.zeros(len(prompts), width, dtype=torch.long), torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[1] :], mask[i, width - p.shape[1] :] = p[0], 1
    return ids, mask


@pytest.mark.parametrize("sample_from_anchor", [False, True])
def test_greedy_exact_in_both_loops_and_left_padded_batches(sample_from_anchor):
    """Against a verifier close to the draft's table (attention at 5%): some proposals accepted, some not; a
    random draft predicting from the anchor slot too is exact as well."""
    if sample_from_anchor:
        verifier = make_verifier("qwen3", eos_token_id=None)
        draft = sh.DFlash2Speculator.from_verifier(verifier, block_size=4, sample_from_anchor=True, selector_rank=16)
    else:
        verifier, draft = bigram_pair(attention=0.05, eos_token_id=None)
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
    if not sample_from_anchor:
        assert 0 < out.stats.accepted_tokens < out.stats.drafted_tokens


def test_rounds_in_transformers_loop_match_drafting_from_scratch():
    """The block kept between rounds gives what drafting from the whole prefix gives."""
    verifier = make_verifier()
    draft = sh.DFlash2Speculator.from_verifier(verifier, block_size=4, selector_rank=16, selector_top_k=48)
    selector, gen = draft.candidate_selector, torch.Generator().manual_seed(0)
    with torch.no_grad():  # a selector that outweighs the unary logits: every chain depends on its path
        for weight in (selector.predecessor_codebook, selector.successor_codebook, selector.hidden_projection.weight):
            weight.normal_(std=0.5, generator=gen)
    assert_rounds_match_recomputation(verifier, draft)


def _sampled_pit(
    top_k: int | None = None, temperature: float = 1.0, accepted: int = 300, **warp
) -> tuple[float, float]:
    """KS statistic (and critical value) of the PIT values of 150 sampled continuations with a draft that proposes
    the verifier's own distribution (`bigram_pair`, restricted to the unary `top_k`), so many tokens (more than
    `accepted`) are drafted ones."""
    verifier, draft = bigram_pair(top_k, pad_token_id=None, eos_token_id=None)
    prompt = make_prompts(1, seed=3)[0]
    torch.manual_seed(0)
    out = sh.generate(
        verifier, draft, prompt.expand(150, -1), tree="chain:3", max_new_tokens=8, do_sample=True,
        temperature=temperature, top_k=0, return_dict_in_generate=True, **warp,
    )  # fmt: skip
    assert out.stats.accepted_tokens > accepted, out.stats
    values = sampling_pit_values(verifier, [row[None] for row in out.sequences], prompt.shape[1], temperature, **warp)
    return ks_uniform_statistic(values), ks_critical_value(len(values), 1e-3)


@pytest.mark.parametrize(
    "top_k, temperature, warp, accepted",
    [(None, 1.0, {}, 300), (24, 0.7, {"top_p": 0.9}, 100)],  # the second: candidates cut to the unary top 24
)
def test_sampling_follows_the_verifier(top_k, temperature, warp, accepted):
    stat, crit = _sampled_pit(top_k, temperature, accepted, **warp)
    assert stat < crit


def test_the_sampling_check_rejects_a_wrong_q(monkeypatch):
    """Mutant: each token is drawn from the selector's scores, but the q reported for the acceptance test is the
    block's unary one (the slot's logits are recognised by their storage when the chain picks from them)."""
    unary: dict[int, torch.Tensor] = {}
    slot_logits, pick = sh.DFlash2Speculator.slot_logits, Sampler.pick

    def recording(self, state, slot, previous):
        logits = slot_logits(self, state, slot, previous)
        unary.clear()
        unary[logits.data_ptr()] = self.expand_vocab(state.tensors["block_logits"][:, slot])
        return logits

    def wrong_q(self, logits, path=None):
        token, scores = pick(self, logits, path)
        drawn_by_selector = unary.pop(logits.data_ptr(), None)
        return token, scores if drawn_by_selector is None else self.scores(drawn_by_selector, path)

    monkeypatch.setattr(sh.DFlash2Speculator, "slot_logits", recording)
    monkeypatch.setattr(Sampler, "pick", wrong_q)
    stat, crit = _sampled_pit()
    assert stat > crit


def test_pipeline_returns_the_same_text(tiny_tokenizer):
    verifier = make_verifier(vocab_size=len(tiny_tokenizer))
    draft = sh.DFlash2Speculator.from_verifier(verifier, tokenizer=tiny_tokenizer, selector_rank=16)
    plain = pipeline("text-generation", model=verifier, tokenizer=tiny_tokenizer)
    assisted = pipeline("text-generation", model=verifier, tokenizer=tiny_tokenizer, assistant_model=draft)
    for text in ["the draft model", "fast"]:
        expected = plain(text, max_new_tokens=15, do_sample=False)[0]["generated_text"]
        assert assisted(text, max_new_tokens=15, do_sample=False)[0]["generated_text"] == expected


def test_loads_and_stays_exact_with_the_package_hidden(tmp_path):
    """Saved without the verifier's embedding and lm_head, with trained (not identity) convolutions, loaded as
    remote code, exact once bound."""
    verifier = make_verifier("qwen3")
    draft = sh.DFlash2Speculator.from_verifier(verifier, selector_rank=16, conv_kernel_size=3)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if "conv" in name:
                p.normal_(std=0.3, generator=torch.Generator().manual_seed(len(name)))
    verifier.save_pretrained(tmp_path / "verifier")
    draft.save_pretrained(tmp_path / "draft")
    saved = load_file(tmp_path / "draft" / "model.safetensors")
    assert {"layers.0.mlp_conv.kernel_projection.weight", "candidate_selector.successor_codebook"} <= set(saved)
    assert "embed_tokens.weight" not in saved and "lm_head.weight" not in saved
    prompts = [p.tolist() for p in make_prompts(3, seed=9)]
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        draft = AutoModelForCausalLM.from_pretrained("draft", trust_remote_code=True)
        assert type(draft).__name__ == "DFlash2Speculator" and draft.config.conv_kernel_size == 3
        verifier = AutoModelForCausalLM.from_pretrained("verifier").eval()
        draft.bind_verifier(verifier)
        for prompt in {prompts}:
            ids = torch.tensor(prompt)
            ref = verifier.generate(ids, max_new_tokens=12, do_sample=False)
            got = verifier.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
            assert torch.equal(ref, got), (ref, got)
        print("EXACT", float(draft.layers[0].mlp_conv.base_kernel.sum()))
        """,
        cwd=tmp_path,
    )
    assert f"EXACT {float(draft.layers[0].mlp_conv.base_kernel.detach().sum())}" in out


def test_a_new_draft_on_dflash_weights_computes_dflash_s_logits():
    """The convolutions start as the identity (the library's warm start from DFlash): DFlash's tensors loaded into
    a new DFlash2 give DFlash's logits as the unary ones."""
    verifier = make_verifier("qwen3")
    fields = {"block_size": 4, "num_layers": 2, "sliding_window_non_causal": True}
    dflash = sh.DFlashSpeculator.from_verifier(verifier, **fields)
    dflash2 = sh.DFlash2Speculator.from_verifier(verifier, selector_rank=8, **fields)
    missing, unexpected = dflash2.load_state_dict(dflash.state_dict(), strict=False)
    assert unexpected == [] and all("conv" in name or "candidate_selector" in name for name in missing)
    ids = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    features = [torch.randn(1, 10, 32) for _ in dflash.verifier_layer_ids()]
    anchors = torch.tensor([[1, 5]])
    with torch.no_grad():
        unary = dflash2.parallel_heads(ids, features, anchors)[0]
        torch.testing.assert_close(unary, dflash.parallel_forward(ids, features, anchors))


def test_errors_name_the_problem_and_the_fix():
    config = json.loads((GOLDEN / "default" / "config.json").read_text())
    with pytest.raises(SpeculatorConfigError, match=r"conv_kernel_size: Input should be greater than or equal to 1"):
        SpeculatorConfig.from_dict({**config, "conv_kernel_size": 0})
    with pytest.raises(SpeculatorConfigError) as err:
        SpeculatorConfig.from_dict(
            {**config, "draft_vocab_size": 64, "conv_group_size": 5, "conv_kernel_size": 5, "selector_top_k": 97}
        )
    for message in (
        "draft_vocab_size: 64, but a DFlash2 draft drafts over the verifier's whole vocabulary (its selector scores "
        "verifier ids); set draft_vocab_size to 96",
        "selector_top_k: 97 exceeds the vocabulary (96 tokens)",
        "conv_group_size: 5 does not divide transformer_layer_config.hidden_size (32); pick a divisor",
        "conv_kernel_size: 5 taps exceed block_size (4); use at most block_size taps",
    ):
        assert message in str(err.value)
    verifier = make_verifier("qwen3")
    with pytest.raises(SpeculatorConfigError, match="set draft_vocab_size to 96"):
        sh.DFlash2Speculator.from_verifier(verifier, draft_vocab_size=64)


def test_the_training_loss_learns_tokens_and_the_selector():
    """A few optimiser steps on two sequences lower the loss of every slot and the selector's."""
    verifier = make_verifier("qwen3")
    draft = sh.DFlash2Speculator.from_verifier(verifier, block_size=4, selector_rank=16, selector_top_k=8)
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
    slots = [f"acc_{j}" for j in range(3)]
    assert sorted(metrics) == sorted(
        [*slots, "candidate_recall", "loss", "selector_loss", *(f"selector_{s}" for s in slots)]
    )
    assert last < 0.5 * first and last_metrics["selector_loss"] < 0.5 * metrics["selector_loss"]
    assert all(last_metrics[s] > metrics[s] for s in slots), (metrics, last_metrics)
    assert last_metrics["candidate_recall"] > metrics["candidate_recall"]
    conv = draft.layers[0].attention_conv
    assert conv.kernel_projection.weight.grad is not None and bool(conv.kernel_projection.weight.grad.any())
    assert bool(draft.candidate_selector.successor_codebook.grad.any())


def test_trains_from_the_cli_with_its_own_arguments(tmp_path):
    """`train --family dflash2 --draft-arg selector_top_k=8`: the arguments reach `from_verifier`, the draft trains
    and stays exact; a wrong one is refused in one line."""
    from speculators_hf.cli import main
    from speculators_hf.training.data import save_blocks

    verifier = make_verifier(eos_token_id=None)
    verifier.save_pretrained(tmp_path / "verifier")
    ids = torch.randint(3, 90, (10, 16), generator=torch.Generator().manual_seed(0))
    save_blocks(tmp_path / "data", ids, torch.ones_like(ids, dtype=torch.uint8), {"verifier": "verifier"})
    argv = ["train", "--verifier", str(tmp_path / "verifier"), "--data", str(tmp_path / "data"), "--steps", "2"]
    argv += ["--family", "dflash2", "--batch-size", "2", "--eval-blocks", "0", "--draft-arg", "block_size=4"]
    args = ["--draft-arg", "selector_top_k=8", "--draft-arg", "selector_rank=16", "--draft-arg", "conv_kernel_size=3"]
    assert main([*argv, "--output", str(tmp_path / "out"), *args]) == 0
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").bind_verifier(verifier)
    assert isinstance(draft, sh.DFlash2Speculator)
    assert (draft.config.selector_top_k, draft.config.conv_kernel_size, draft.config.speculative_tokens) == (8, 3, 3)
    prompt = make_prompts(1)[0]
    ref = verifier.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(ref, verifier.generate(prompt, max_new_tokens=8, do_sample=False, assistant_model=draft))
    with pytest.raises(SystemExit, match=r"(?s)--draft-arg .*not accepted by a new dflash2 draft.*conv_group_size: 5"):
        main([*argv, "--output", str(tmp_path / "bad"), "--draft-arg", "conv_group_size=5"])


# --------------------------------------------------------------------------------------------------
# conversion: the library's saves in, `--to speculators` / `--to vllm` out
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, warns", [("default", False), ("anchor-k3", True)])
def test_the_library_save_converts_in_keeps_its_outputs_and_exports_back(tmp_path, variant, warns):
    assert detect(GOLDEN / variant).name == "speculators_dflash2"
    out = convert(GOLDEN / variant, tmp_path / "ours")
    draft = sh.load_draft(out)
    assert isinstance(draft, sh.DFlash2Speculator)
    draft.bind_verifier(golden_draft(variant).verifier)
    unary, scores, golden = golden_outputs(draft, variant)
    torch.testing.assert_close(unary, golden["unary_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, golden["candidate_logits"], rtol=1e-5, atol=1e-5)
    original = load_file(GOLDEN / variant / "model.safetensors")
    source = json.loads((GOLDEN / variant / "config.json").read_text())
    for target in ("speculators", "vllm"):
        messages: list[str] = []
        exported = convert(out, tmp_path / target, to=target, log=messages.append)
        again = load_file(exported / "model.safetensors")
        assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
        config = json.loads((exported / "config.json").read_text())
        assert set(source) <= set(config) and config["model_type"] == "speculators"
        fields = ("speculators_model_type", "conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")
        assert all(config[key] == source[key] for key in (*fields, "sample_from_anchor", "sliding_window_non_causal"))
        warned = [m for m in messages if "vLLM's DFlash2 model" in m and "1 + num_speculative_tokens" in m]
        assert bool(warned) == warns, messages


def test_a_mismatched_convolution_tensor_is_named(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text((GOLDEN / "anchor-k3" / "config.json").read_text())
    tensors = load_file(GOLDEN / "anchor-k3" / "model.safetensors")
    tensors["layers.1.mlp_conv.kernel_projection.weight"] = torch.zeros(12, 32)  # as if 16 channels a kernel
    save_file(tensors, str(source / "model.safetensors"))
    with pytest.raises(
        ConversionError,
        match=r"'layers\.1\.mlp_conv\.kernel_projection\.weight' has shape \(12, 32\), the config implies \(24, 32\)",
    ):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
