"""`speculators-hf data` with a real chat template: tokens and loss mask through the installed transformers'
`apply_chat_template`, user-only prompts, batched and resumable regeneration of the replies."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_verifier

from speculators_hf.cli import main
from speculators_hf.training import DataError, load_blocks, load_records
from speculators_hf.training.data import (
    REGEN_FILE,
    generate_replies,
    regenerate_responses,
    tokenize_record,
    tokenize_records,
)

WORDS = ["the draft model", "why is speculative decoding exact", "fast output text", "how runs it on cpu and gpu"]


def chat_verifier(tokenizer, seed: int = 0):
    """A tiny random verifier over `tokenizer`'s ids that ends its replies with the tokenizer's eos
    (<|im_end|>) now and then, so replies in one batch end at different lengths."""
    verifier = make_verifier(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, seed=seed)
    with torch.no_grad():
        verifier.lm_head.weight[tokenizer.eos_token_id] *= 2.0
    return verifier


def user_only(n: int) -> list[dict]:
    """`n` user-only prompts of different lengths (the common way to hand over prompts)."""
    return [
        {"messages": [{"role": "user", "content": " ".join(WORDS[: 1 + i % 4]) + " " + WORDS[i % 4]}]} for i in range(n)
    ]


def reference_reply(verifier, tokenizer, messages, max_new_tokens):
    """What the verifier alone gives for one conversation: the chat template's prompt, generate(), decode."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    out = verifier.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


def test_chat_template_tokens_and_loss_mask(chat_tokenizer):
    """apply_chat_template(tokenize=True) returns a BatchEncoding (a Mapping, not a dict): the ids are its
    input_ids, not its keys."""
    messages = [{"role": "user", "content": "why is the draft fast"}, {"role": "assistant", "content": "exact output"}]
    ids, mask = tokenize_record(chat_tokenizer, {"messages": messages})
    assert ids == chat_tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    trained = chat_tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert "exact output" in trained and "fast" not in trained and "<|im_end|>" in trained


@pytest.fixture
def verifier_dir(tmp_path, chat_tokenizer):
    chat_verifier(chat_tokenizer).save_pretrained(tmp_path / "verifier")
    chat_tokenizer.save_pretrained(tmp_path / "verifier")
    return tmp_path / "verifier"


def data_argv(tmp_path, verifier_dir, records, *extra):
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    argv = ["data", "--verifier", str(verifier_dir), "--input", str(tmp_path / "chat.jsonl")]
    return [*argv, "--output", str(tmp_path / "data"), "--seq-len", "16", *extra]


def test_data_command_reads_a_chat_template(tmp_path, verifier_dir, chat_tokenizer):
    records = [
        {"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": "same exact output"}]}
        for w in WORDS * 4
    ]
    assert main(data_argv(tmp_path, verifier_dir, records)) == 0
    ids, mask = load_blocks(tmp_path / "data")
    expected, _ = tokenize_records(chat_tokenizer, records)
    flat = [t for seq, _ in expected for t in seq]
    assert ids.flatten().tolist() == flat[: ids.numel()]
    assert chat_tokenizer.convert_tokens_to_ids("<|im_start|>") in ids.flatten().tolist()
    trained = chat_tokenizer.decode([t for t, m in zip(ids.flatten().tolist(), mask.flatten().tolist()) if m])
    assert trained.count("same exact output") >= 3


def test_user_only_prompts_get_a_regenerated_reply(tmp_path, verifier_dir, chat_tokenizer):
    records = user_only(12)
    argv = data_argv(
        tmp_path, verifier_dir, records, "--regenerate", "--max-new-tokens", "8", "--regen-batch-size", "5"
    )
    assert main(argv) == 0
    info = json.loads((tmp_path / "data" / "data_info.json").read_text())
    assert info["records_without_assistant_tokens"] == 0 and info["trained_tokens"] > 12
    regenerated = [json.loads(line)["record"] for line in (tmp_path / "data" / REGEN_FILE).read_text().splitlines()[1:]]
    assert len(regenerated) == 12
    verifier = chat_verifier(chat_tokenizer)
    for line in (tmp_path / "data" / REGEN_FILE).read_text().splitlines()[1:]:
        entry = json.loads(line)
        source = records[entry["index"]]["messages"]
        messages = entry["record"]["messages"]
        assert messages[:-1] == source and messages[-1]["role"] == "assistant"
        assert messages[-1]["content"] == reference_reply(verifier, chat_tokenizer, source, 8)


def test_user_only_prompts_without_regenerate_are_reported(tmp_path, verifier_dir, capsys):
    with_reply = {"messages": [{"role": "user", "content": "fast"}, {"role": "assistant", "content": "exact output"}]}
    assert main(data_argv(tmp_path, verifier_dir, user_only(6) + [with_reply] * 4)) == 0
    out = capsys.readouterr().out
    assert "warning: 6 of 10 records have no assistant tokens" in out and "--regenerate" in out
    assert json.loads((tmp_path / "data" / "data_info.json").read_text())["records_without_assistant_tokens"] == 6
    assert main(data_argv(tmp_path, verifier_dir, user_only(8))) == 1
    assert "error: no tokens to train on: 8 of 8 records have no assistant tokens" in capsys.readouterr().err


def test_batched_regeneration_equals_one_at_a_time(chat_tokenizer):
    """Greedy replies from left-padded batches are, record by record, what the verifier alone gives; multi-turn
    chats get every assistant turn replaced in order, each continuing the regenerated conversation so far."""
    verifier = chat_verifier(chat_tokenizer)
    records = user_only(9)
    records.insert(3, {"text": "the draft model"})  # kept as it is
    records.append(
        {
            "messages": [
                {"role": "system", "content": "same output"},
                {"role": "user", "content": "why"},
                {"role": "assistant", "content": "old"},
                {"role": "user", "content": "how fast"},
                {"role": "assistant", "content": "old"},
            ]
        }
    )
    one = regenerate_responses(verifier, chat_tokenizer, records, max_new_tokens=10, batch_size=1)
    for batch_size in (4, 16):
        assert regenerate_responses(verifier, chat_tokenizer, records, max_new_tokens=10, batch_size=batch_size) == one
    assert one[3] == {"text": "the draft model"}
    lengths = set()
    for source, record in zip(records, one):
        if "messages" not in source:
            continue
        turns: list[dict] = []
        for message in [
            *source["messages"],
            *([{"role": "assistant"}] if source["messages"][-1]["role"] == "user" else []),
        ]:
            if message["role"] == "assistant":
                message = {"role": "assistant", "content": reference_reply(verifier, chat_tokenizer, turns, 10)}
                lengths.add(len(chat_tokenizer(message["content"]).input_ids))
            turns.append(message)
        assert record == {"messages": turns}
    assert len(lengths) > 1 and min(lengths) < 10  # some replies ended early (eos) inside a batch


def test_replies_are_cut_after_their_first_eos(chat_tokenizer):
    """Each reply stops at its own eos inside a batch. The pad token is the eos here, as in SmolLM2 and
    others, while the chat prompts themselves hold eos (<|im_end|> closes each turn): only the explicit
    attention mask tells padding from those."""
    verifier = chat_verifier(chat_tokenizer)
    eos = chat_tokenizer.eos_token_id
    prompts = [
        chat_tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, return_dict=True)["input_ids"]
        for r in user_only(8)
    ]
    assert len({len(p) for p in prompts}) > 1 and all(eos in p for p in prompts)
    replies = generate_replies(verifier, prompts, 12, eos, {eos})
    for prompt, reply in zip(prompts, replies):
        alone = verifier.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :].tolist()
        assert reply == alone
        assert eos not in reply[:-1]
    assert any(len(r) < 12 for r in replies)


class Interrupt(Exception):
    pass


def test_regeneration_resumes_after_an_interruption(tmp_path, chat_tokenizer):
    """Killed after two batches, the rerun generates only the records not yet saved and ends with the same
    data as a run that was never interrupted; a torn last line (killed mid-write) is dropped."""
    verifier = chat_verifier(chat_tokenizer)
    records = user_only(11)
    straight = regenerate_responses(verifier, chat_tokenizer, records, max_new_tokens=6, batch_size=3)

    calls, original = {"n": 0, "limit": 2}, verifier.generate

    def counting_generate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            raise Interrupt
        return original(*args, **kwargs)

    verifier.generate = counting_generate
    path = tmp_path / REGEN_FILE
    with pytest.raises(Interrupt):
        regenerate_responses(verifier, chat_tokenizer, records, max_new_tokens=6, batch_size=3, progress_file=path)
    assert len(path.read_text().splitlines()) == 1 + 6  # header + two batches of 3
    with open(path, "a") as f:
        f.write('{"index": 7, "key": "abc", "rec')  # a write cut short by the kill

    calls.update(n=0, limit=100)
    resumed = regenerate_responses(
        verifier, chat_tokenizer, records, max_new_tokens=6, batch_size=3, progress_file=path
    )
    assert calls["n"] == 2  # the 5 records left, in batches of 3
    assert resumed == straight
    assert len(path.read_text().splitlines()) == 1 + 11
    calls.update(n=0)
    assert regenerate_responses(verifier, chat_tokenizer, records, max_new_tokens=6, progress_file=path) == straight
    assert calls["n"] == 0  # everything was saved

    # an edited record is regenerated, the others are kept
    records[4] = {"messages": [{"role": "user", "content": "what is the output"}]}
    again = regenerate_responses(verifier, chat_tokenizer, records, max_new_tokens=6, progress_file=path)
    assert calls["n"] == 1 and again[:4] == straight[:4] and again[5:] == straight[5:] and again[4] != straight[4]


def test_data_command_interrupted_then_rerun_writes_the_same_blocks(tmp_path, verifier_dir, monkeypatch, capsys):
    """Ctrl-C during `speculators-hf data --regenerate`, then the same command again: the blocks equal those
    of a run that was never interrupted."""
    from transformers import LlamaForCausalLM

    records = user_only(10)
    straight = data_argv(
        tmp_path, verifier_dir, records, "--regenerate", "--max-new-tokens", "6", "--regen-batch-size", "3"
    )
    assert main(straight) == 0
    expected = load_blocks(tmp_path / "data")

    argv = [str(tmp_path / "resumed") if a == str(tmp_path / "data") else a for a in straight]
    calls, original = {"n": 0}, LlamaForCausalLM.generate

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", interrupted)
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len((tmp_path / "resumed" / REGEN_FILE).read_text().splitlines()) == 1 + 6
    assert main(argv) == 0
    assert calls["n"] == 3 + 2  # the two batches left (4 records)
    got = load_blocks(tmp_path / "resumed")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_resuming_with_other_settings_is_refused(tmp_path, chat_tokenizer):
    verifier = chat_verifier(chat_tokenizer)
    path = tmp_path / REGEN_FILE
    regenerate_responses(verifier, chat_tokenizer, user_only(3), max_new_tokens=4, progress_file=path)
    with pytest.raises(DataError, match=r"other settings.*delete the file"):
        regenerate_responses(verifier, chat_tokenizer, user_only(3), max_new_tokens=5, progress_file=path)
    other_template = copy.deepcopy(chat_tokenizer)
    other_template.chat_template = chat_tokenizer.chat_template.replace(
        "<|im_start|>assistant", "<|im_start|> assistant"
    )
    with pytest.raises(DataError, match=r"other settings.*delete the file"):
        regenerate_responses(verifier, other_template, user_only(3), max_new_tokens=4, progress_file=path)


def test_a_torn_first_write_starts_over_and_a_tampered_line_is_refused(tmp_path, chat_tokenizer):
    verifier = chat_verifier(chat_tokenizer)
    path = tmp_path / REGEN_FILE
    path.write_text('{"settings": {"verif')  # killed while the header and the first batch were written
    straight = regenerate_responses(verifier, chat_tokenizer, user_only(3), max_new_tokens=4)
    assert (
        regenerate_responses(verifier, chat_tokenizer, user_only(3), max_new_tokens=4, progress_file=path) == straight
    )
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["record"] = {"messages": "not a chat"}
    path.write_text("\n".join([lines[0], json.dumps(entry), *lines[2:]]) + "\n")
    with pytest.raises(DataError, match='"messages" must be a non-empty list'):
        regenerate_responses(verifier, chat_tokenizer, user_only(3), max_new_tokens=4, progress_file=path)


def test_progress_lines_when_output_is_not_a_terminal(chat_tokenizer, capsys):
    regenerate_responses(chat_verifier(chat_tokenizer), chat_tokenizer, user_only(4), max_new_tokens=4, batch_size=2)
    err = capsys.readouterr().err  # progress goes to stderr, results to stdout
    assert "regenerating replies with the verifier: 4/4 record (100%)" in err
    assert "tokens/s" in err and "ETA 0:00" in err


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "user"}], "hello", [{"role": "user", "content": 3}]],
    ids=["empty", "no-content", "str", "int"],
)
def test_malformed_messages_name_the_line(tmp_path, messages):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=r'bad\.jsonl:2: "messages" must be a non-empty list'):
        load_records(path)


def test_a_prompt_without_a_response_is_a_user_only_chat(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "why"}) + "\n" + json.dumps({"prompt": "how", "response": "fast"}) + "\n")
    first, second = load_records(path)
    assert first == {"messages": [{"role": "user", "content": "why"}]}
    assert second["messages"][-1] == {"role": "assistant", "content": "fast"}
