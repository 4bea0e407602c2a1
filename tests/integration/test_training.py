"""Training on CPU with tiny models: the loss falls, acceptance rises, resume is exact, checkpoints work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_greedy_exact, make_prompts, make_verifier, verifier_features
from transformers import AutoModelForCausalLM

import speculators_hf as sh
from speculators_hf.training import (
    DataError,
    DraftDataset,
    TrainConfig,
    cache_features,
    load_records,
    measure_acceptance,
    pack_blocks,
    select_draft_vocab,
    train,
)
from speculators_hf.training.data import tokenize_record


def learnable_verifier():
    """A tiny verifier whose attention barely matters, so its next token is mostly a function of the
    current one: random weights, but structure a one-layer draft can learn from a few thousand tokens
    (a fully random 4-layer verifier is chaotic and needs far more data than a unit test can afford)."""
    verifier = make_verifier(eos_token_id=None)
    with torch.no_grad():
        for layer in verifier.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.05)
    return verifier


def self_generated_blocks(verifier, n_prompts=128, seq_len=50):
    """Training data the way `speculators-hf data --regenerate` makes it: the verifier's own text."""
    seqs = []
    with torch.no_grad():
        for prompt in make_prompts(n_prompts, seed=1, min_len=1, max_len=4):
            out = verifier.generate(prompt, max_new_tokens=48, do_sample=True, temperature=0.5, top_k=0)
            seqs.append((out[0].tolist(), [0] * prompt.shape[1] + [1] * (out.shape[1] - prompt.shape[1])))
    return pack_blocks(seqs, seq_len)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    verifier = learnable_verifier()
    ids, mask = self_generated_blocks(verifier)
    return verifier, ids, mask, make_prompts(8, seed=99, min_len=2, max_len=4)


def new_eagle3(verifier, ids, mask):
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64)
    select_draft_vocab(draft, ids, mask)
    draft.init_from_verifier(verifier)
    return draft


def test_eagle3_training_lowers_loss_and_raises_acceptance(setup, tmp_path):
    verifier, ids, mask, held_out = setup
    draft = new_eagle3(verifier, ids, mask)
    before = measure_acceptance(verifier, draft, held_out, 32).tau
    config = TrainConfig(
        output_dir=str(tmp_path), steps=400, batch_size=8, learning_rate=5e-3, ttt_steps=4, log_every=50
    )
    result = train(draft, verifier, DraftDataset(ids, mask), config, eval_prompts=held_out)
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.8 * losses[0]
    after = result["evals"][-1]["tau"]
    print(f"EAGLE-3 tau on held-out prompts: {before:.2f} untrained -> {after:.2f} after 400 steps")
    assert before < 1.1 and after > 1.8

    # the saved draft loads through AutoModelForCausalLM and keeps the verifier's output exactly
    loaded = AutoModelForCausalLM.from_pretrained(result["final_dir"]).bind_verifier(verifier)
    stats = assert_greedy_exact(verifier, loaded, held_out + make_prompts(12, seed=5), max_new_tokens=32)
    assert stats.tau > 1.5
    summary = json.loads((tmp_path / "final" / "training_summary.json").read_text())
    assert summary["evals"][-1]["tau"] == after


def test_independent_training_raises_acceptance(setup, tmp_path):
    verifier, ids, mask, held_out = setup
    draft = sh.IndependentSpeculator.from_verifier(verifier)  # 2 layers of the verifier's shape
    before = measure_acceptance(verifier, draft, held_out, 32).tau
    config = TrainConfig(output_dir=str(tmp_path), steps=150, batch_size=8, learning_rate=5e-3, log_every=25)
    result = train(draft, verifier, DraftDataset(ids, mask), config, eval_prompts=held_out)
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
    assert result["evals"][-1]["tau"] > before + 0.5


def test_resume_after_interruption_equals_uninterrupted_run(setup, tmp_path):
    verifier, ids, mask, _ = setup
    config = dict(steps=8, batch_size=4, learning_rate=1e-3, ttt_steps=3, save_every=3, log_every=1, warmup_steps=2)

    torch.manual_seed(1)
    straight = new_eagle3(verifier, ids, mask)
    train(straight, verifier, DraftDataset(ids, mask), TrainConfig(output_dir=str(tmp_path / "a"), **config))

    torch.manual_seed(1)
    interrupted = new_eagle3(verifier, ids, mask)
    calls = {"n": 0}
    original = sh.Eagle3Speculator.training_loss

    def crash_after_5_steps(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    sh.Eagle3Speculator.training_loss = crash_after_5_steps
    try:
        with pytest.raises(KeyboardInterrupt):
            train(interrupted, verifier, DraftDataset(ids, mask), TrainConfig(output_dir=str(tmp_path / "b"), **config))
    finally:
        sh.Eagle3Speculator.training_loss = original
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-3"]

    torch.manual_seed(123)  # a different process state: everything needed comes from the checkpoint
    resumed = new_eagle3(verifier, ids, mask)
    result = train(resumed, verifier, DraftDataset(ids, mask), TrainConfig(output_dir=str(tmp_path / "b"), **config))
    assert [h["step"] for h in result["history"]] == list(range(1, 9))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_cached_features_equal_on_the_fly(setup, tmp_path):
    verifier, ids, mask, _ = setup
    draft = sh.Eagle3Speculator.from_verifier(verifier)
    folder = cache_features(
        verifier, ids[:10], draft.verifier_layer_ids(), tmp_path, shard_blocks=4, dtype=torch.float32
    )
    assert len(list(folder.glob("shard-*.safetensors"))) == 3
    dataset = DraftDataset(ids[:10], mask[:10], folder)
    expected = verifier_features(verifier, ids[7:8], draft.verifier_layer_ids())
    for got, want in zip(dataset[7]["features"], expected):
        torch.testing.assert_close(got, want[0])
    # resumable: an existing shard is not recomputed
    first = folder / "shard-00000.safetensors"
    stamp = first.stat().st_mtime_ns
    cache_features(verifier, ids[:10], draft.verifier_layer_ids(), tmp_path, shard_blocks=4, dtype=torch.float32)
    assert first.stat().st_mtime_ns == stamp


def test_features_of_other_blocks_are_recomputed_and_refused(setup, tmp_path):
    """Data rebuilt into the same folder (another --limit, other records): the shards of blocks that changed are
    computed again, and a dataset never pairs blocks with the states of others."""
    verifier, ids, mask, _ = setup
    layers = sh.Eagle3Speculator.from_verifier(verifier).verifier_layer_ids()
    folder = cache_features(verifier, ids[:8], layers, tmp_path, shard_blocks=4, dtype=torch.float32)
    rebuilt = torch.cat([ids[:4], ids[8:12]])  # the second shard's blocks changed
    with pytest.raises(DataError, match=r"other blocks than the data's.*--cache-features"):
        DraftDataset(rebuilt, mask[:8], folder)
    cache_features(verifier, rebuilt, layers, tmp_path, shard_blocks=4, dtype=torch.float32)
    expected = verifier_features(verifier, rebuilt[5:6], layers)
    for got, want in zip(DraftDataset(rebuilt, mask[:8], folder)[5]["features"], expected):
        torch.testing.assert_close(got, want[0])


def test_select_draft_vocab_takes_most_frequent_targets():
    verifier = make_verifier()
    draft = sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=3)
    ids = torch.tensor([[5, 5, 5, 9, 9, 40, 40, 40, 40, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]])  # 7 is not a target
    assert select_draft_vocab(draft, ids, mask).tolist() == [5, 9, 40]
    assert draft.t2d.nonzero().flatten().tolist() == [5, 9, 40]


def test_records_and_loss_mask(tmp_path, tiny_tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps({"text": "the draft model"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "fast"}, {"role": "assistant", "content": "exact output"}]}) + "\n"
        + json.dumps({"prompt": "gpu", "response": "cpu runs"}) + "\n"
    )  # fmt: skip
    records = load_records(path)
    assert len(records) == 3 and records[2]["messages"][1]["content"] == "cpu runs"
    ids, mask = tokenize_record(tiny_tokenizer, records[1])
    trained = tiny_tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert "exact output" in trained and "fast" not in trained
    ids, mask = tokenize_record(tiny_tokenizer, records[0])
    assert all(mask) and ids[-1] == tiny_tokenizer.eos_token_id


@pytest.mark.parametrize(
    "line, message", [("{not json", "not valid JSON"), ('{"title": "x"}', "expected a 'text', 'messages'")]
)
def test_bad_records_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2: {message}"):
        load_records(path)


def test_too_little_data_for_one_block():
    with pytest.raises(DataError, match="not one block of seq_len=64"):
        pack_blocks([([1, 2, 3], [1, 1, 1])], 64)


def test_bad_train_config():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(output_dir="x", learning_rate=0)


@pytest.mark.parametrize("family", ["eagle", "mlp_speculator", "medusa", "peagle", "dflash"])
def test_other_families_train(setup, tmp_path, family):
    """EAGLE-1/HASS (feature regression + 0.1 CE), MLP-speculator and Medusa (per-head CE), P-EAGLE (parallel
    depths) and DFlash (blocks at random anchors) losses fall and acceptance rises."""
    verifier, ids, mask, held_out = setup
    draft_class = {
        "eagle": sh.EagleSpeculator,
        "mlp_speculator": sh.MLPSpeculator,
        "medusa": sh.MedusaSpeculator,
        "peagle": sh.PEagleSpeculator,
        "dflash": sh.DFlashSpeculator,
    }
    # DFlash: every slot reads the block's first token through attention, which starts uniform: it needs a
    # larger step size to learn in a unit test's budget
    steps, lr, extra = (240, 1e-2, {"block_size": 4}) if family == "dflash" else (120, 3e-3, {})
    draft = draft_class[family].from_verifier(verifier, speculative_tokens=3, **extra)
    before = measure_acceptance(verifier, draft, held_out, 32).tau
    config = TrainConfig(output_dir=str(tmp_path), steps=steps, batch_size=8, learning_rate=lr, log_every=20)
    result = train(draft, verifier, DraftDataset(ids, mask), config, eval_prompts=held_out)
    assert result["history"][-1]["loss"] < 0.9 * result["history"][0]["loss"]
    after = result["evals"][-1]["tau"]
    print(f"{family} tau on held-out prompts: {before:.2f} untrained -> {after:.2f} after {steps} steps")
    assert after > before + 0.2
    loaded = AutoModelForCausalLM.from_pretrained(result["final_dir"]).bind_verifier(verifier)
    assert_greedy_exact(verifier, loaded, held_out[:4], max_new_tokens=16)
