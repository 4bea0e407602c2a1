"""Training data for drafts: records -> token blocks with a loss mask -> verifier hidden states.

1. `load_records` reads jsonl: `{"text": ...}`, `{"messages": [{"role", "content"}, ...]}` (chat) or
   `{"prompt": ...[, "response": ...]}`.
2. `regenerate_responses` (optional, recommended) replaces every assistant reply with the verifier's
   own generation, so the draft learns the distribution it will be verified against, and gives chats
   that end without a reply (user-only prompts) one. Batched (left-padded, greedy output identical to
   one record at a time), with progress, and saved as it goes so that a rerun resumes.
3. `tokenize_record` applies the verifier's chat template (`chat_ids`); the loss mask covers assistant
   tokens (all tokens for plain text). `tokenize_records` also counts the records without any (nothing
   to train on). `pack_blocks` concatenates records into fixed-length blocks.
4. Hidden states are computed on the fly during training (`DraftDataset(verifier=...)`) or cached
   once with `cache_features` as fp16/bf16 safetensors shards (resumable, with a size estimate).
5. Training from cached features needs only the tensors the draft borrows: `verifier_parts` builds the
   verifier on the meta device and reads the tensors outside its decoder layers (embedding, final norm,
   lm_head) from the safetensors files that hold them, so the decoder's shards are never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..generation.capture import decoder_of, verifier_hidden_states
from ..models.checkpoint import SAFETENSORS_FILE, SAFETENSORS_INDEX, check_inside, meta_model, shard_names
from ..progress import Progress
from ..prompts import chat_ids

BLOCKS_FILE = "blocks.safetensors"
INFO_FILE = "data_info.json"


class DataError(ValueError):
    """Training data is malformed; the message names the record or file."""


# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------
def load_records(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a jsonl file of text, chat or prompt/response records (a prompt without a response becomes a
    user-only chat, whose reply `regenerate_responses` writes)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not ({"text", "messages", "prompt"} & set(record)):
                raise DataError(f"{path}:{line_no}: expected a 'text', 'messages' or 'prompt'/'response' record")
            if "prompt" in record:
                messages = [{"role": "user", "content": record["prompt"]}]
                if record.get("response"):
                    messages.append({"role": "assistant", "content": record["response"]})
                record = {"messages": messages}
            if "messages" in record:
                _check_messages(record["messages"], f"{path}:{line_no}")
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    return records


def _check_messages(messages: Any, where: str) -> None:
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise DataError(
            f'{where}: "messages" must be a non-empty list of {{"role": str, "content": str}} turns, e.g. '
            '[{"role": "user", "content": "..."}]'
        )


def tokenize_record(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = train on this token) of one record."""
    if "text" in record:
        text_ids = list(tokenizer(record["text"], add_special_tokens=False).input_ids)
        if tokenizer.eos_token_id is not None:
            text_ids.append(tokenizer.eos_token_id)
        return text_ids, [1] * len(text_ids)
    messages = record["messages"]
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        # the tokens message i adds = template(messages[:i+1]) minus template(messages[:i])
        full = chat_ids(tokenizer, messages[: i + 1])
        if full[: len(ids)] != ids:
            raise DataError(
                "the chat template renders earlier turns differently once a turn is added, so assistant tokens "
                "cannot be located; pass plain {'text': ...} records instead"
            )
        mask += [int(message["role"] == "assistant")] * (len(full) - len(ids))
        ids = full
    return ids, mask


def tokenize_records(
    tokenizer: Any, records: list[dict[str, Any]]
) -> tuple[list[tuple[list[int], list[int]]], dict[str, int]]:
    """(ids, mask) of every record, and counts: records, trained tokens, and records without a single
    trained token (a chat without an assistant turn: nothing to learn from it unless it is regenerated)."""
    sequences = [tokenize_record(tokenizer, record) for record in records]
    return sequences, {
        "records": len(records),
        "trained_tokens": sum(sum(mask) for _, mask in sequences),
        "records_without_assistant_tokens": sum(1 for _, mask in sequences if not any(mask)),
    }


# --------------------------------------------------------------------------------------------------
# regenerating the replies with the verifier: batched, resumable
# --------------------------------------------------------------------------------------------------
REGEN_FILE = "regenerated.jsonl"
# Measured with benchmarks/regen_throughput.py (zoo verifier, 32 prompts, 64 new tokens, 1 thread of a shared
# 2-core CPU, three runs): 49-79 tokens/s one record at a time, 160-230 with 4-8 records per generate() call,
# 150-260 with 16 and 120-250 with 32: 16 is at the top, and a larger batch adds padding and cache without
# speed on a CPU. On a GPU, batches of 64 or more pay (--regen-batch-size).
REGEN_BATCH_SIZE = 16


def _reply_slots(messages: list[dict[str, str]]) -> list[dict[str, str] | None]:
    """The conversation with each assistant turn replaced by a slot (None) for the verifier to fill, and
    a slot appended when the last turn is not the assistant's (user-only prompts get their reply)."""
    turns: list[dict[str, str] | None] = [None if m["role"] == "assistant" else m for m in messages]
    if messages[-1]["role"] != "assistant":
        turns.append(None)
    return turns


def _record_key(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class _RegenStore:
    """Regenerated records, appended as they are made: one header line with the settings, then one line
    per record `{"index", "key", "record"}` (key = hash of the source record), each written with a single
    write and flushed. Reading back keeps the records whose key still matches the source (an edited input
    regenerates just what changed) and drops a torn last line, so a killed run loses at most the batch in
    flight and a rerun of the same command resumes."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path, self.settings = path, settings

    def load(self, records: list[dict[str, Any]], repair: bool = True) -> dict[int, dict[str, Any]]:
        """The records done; `repair=False` reads another process's file without changing it."""
        content = self.path.read_bytes() if self.path.exists() else b""
        if b"\n" not in content:  # nothing, or the first write torn (it holds the header): start over
            if repair:
                self.path.unlink(missing_ok=True)
            return {}
        lines = content.split(b"\n")
        try:
            header = json.loads(lines[0])["settings"]
        except (json.JSONDecodeError, KeyError, TypeError):
            header = None
        if header != self.settings:
            raise DataError(
                f"{self.path} holds replies regenerated with other settings ({header}, now {self.settings}); "
                "rerun with the same verifier and options to resume, or delete the file (or use another --output) "
                "to regenerate from scratch"
            )
        done: dict[int, dict[str, Any]] = {}
        good = len(lines[0]) + 1
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                index, key, record = int(entry["index"]), entry["key"], entry["record"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                break  # a torn last line (killed mid-write): dropped, and cut off below
            good += len(line) + 1
            if 0 <= index < len(records) and key == _record_key(records[index]):
                _check_messages(record.get("messages") if isinstance(record, dict) else None, f"{self.path}")
                done[index] = record
        if good < len(content) and repair:
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return done

    def append(self, entries: list[tuple[int, dict[str, Any], dict[str, Any]]]) -> None:
        """Append (index, source record, regenerated record) lines in one write."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        text = json.dumps({"settings": self.settings}) + "\n" if new else ""
        text += "".join(
            json.dumps({"index": i, "key": _record_key(src), "record": rec}, ensure_ascii=False) + "\n"
            for i, src, rec in entries
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def generate_replies(
    verifier: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_ids: Collection[int],
    do_sample: bool = False,
) -> list[list[int]]:
    """The verifier's continuation of each prompt, in one left-padded `generate()` call: each reply is cut
    after its first eos. Greedy, each row is what the verifier gives for that prompt alone (the attention
    mask hides the padding and positions count from each row's first real token)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.no_grad():
        out = verifier.generate(
            ids.to(verifier.device),
            attention_mask=mask.to(verifier.device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=pad_token_id,
        )
    replies = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_token_ids), len(row))
        replies.append(row[:end])
    return replies


def regenerate_responses(
    verifier: Any,
    tokenizer: Any,
    records: list[dict[str, Any]],
    max_new_tokens: int = 256,
    do_sample: bool = False,
    batch_size: int = REGEN_BATCH_SIZE,
    progress_file: str | os.PathLike | None = None,
    replier: Any = None,
    engine: str | None = None,
) -> list[dict[str, Any]]:
    """Replace each assistant reply of the chat records by the verifier's own continuation of the
    conversation so far, and give a reply to chats whose last turn is not the assistant's (user-only
    prompts). Text records are kept as they are.

    Records go through `generate()` `batch_size` at a time (left-padded, sorted by prompt length so that
    little is padding); greedy output is the same as one record at a time. With `progress_file` every
    finished batch is appended there, and a rerun with the same file, records and settings resumes: a
    kill loses at most the batch in flight. `replier(prompts, eos_ids)` replaces the verifier's `generate()`
    (another engine, named by `engine` in the saved settings: replies of two engines are never mixed)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    eos = getattr(verifier.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(sorted(eos_ids)), 0)
    settings = regen_settings(verifier, tokenizer, max_new_tokens, do_sample, engine)
    store = _RegenStore(Path(progress_file), settings) if progress_file is not None else None
    done = store.load(records) if store is not None else {}
    chats = [i for i, r in enumerate(records) if "messages" in r]
    todo = [i for i in chats if i not in done]
    # sorted by the length of the first prompt, so that a batch holds prompts of similar length
    todo.sort(key=lambda i: (len(chat_ids(tokenizer, _open_prompt(_reply_slots(records[i]["messages"])), True)), i))
    progress = Progress(len(chats), "regenerating replies with the verifier", "record", initial=len(chats) - len(todo))
    generated, started = 0, time.perf_counter()
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            turns = {i: _reply_slots(records[i]["messages"]) for i in batch}
            tokens = 0
            while True:
                # one generate() per round: the next open slot of every conversation that has one
                pending = [i for i in batch if None in turns[i]]
                if not pending:
                    break
                prompts = [chat_ids(tokenizer, _open_prompt(turns[i]), add_generation_prompt=True) for i in pending]
                if replier is not None:
                    replies = replier(prompts, eos_ids)
                else:
                    replies = generate_replies(verifier, prompts, max_new_tokens, pad, eos_ids, do_sample)
                for i, reply in zip(pending, replies):
                    tokens += len(reply)
                    turns[i][turns[i].index(None)] = {
                        "role": "assistant",
                        "content": tokenizer.decode(reply, skip_special_tokens=True),
                    }
            finished = [(i, records[i], {"messages": [t for t in turns[i] if t is not None]}) for i in batch]
            for i, _, record in finished:
                done[i] = record
            if store is not None:
                store.append(finished)
            generated += tokens
            rate = generated / max(time.perf_counter() - started, 1e-9)
            progress.update(len(batch), f"{generated} tokens, {rate:.1f} tokens/s")
    finally:
        progress.close()
    return [done.get(i, record) for i, record in enumerate(records)]


def regen_settings(
    verifier: Any, tokenizer: Any, max_new_tokens: int, do_sample: bool = False, engine: str | None = None
) -> dict[str, Any]:
    """What a regenerated reply depends on, saved in the progress file's header (a resume must match it)."""
    settings = {
        "verifier": getattr(verifier, "name_or_path", None) or verifier.config.name_or_path,
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "chat_template": hashlib.sha256(str(getattr(tokenizer, "chat_template", None)).encode()).hexdigest()[:16],
    }
    if engine is not None:
        settings["engine"] = engine
    return settings


def part_of(n: int, world_size: int, rank: int) -> range:
    """The contiguous `rank`-th of `world_size` parts of range(n) (sizes differ by at most one)."""
    if not 0 <= rank < world_size:
        raise DataError(f"--rank {rank}: must be in 0..{world_size - 1} for --world-size {world_size}")
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def regen_file(world_size: int = 1, rank: int = 0) -> str:
    """The progress file of one process's part of the regeneration."""
    return REGEN_FILE if world_size == 1 else f"regenerated-{rank}-of-{world_size}.jsonl"


def gather_regenerated(
    directory: Path, records: list[dict[str, Any]], settings: dict[str, Any], world_size: int
) -> tuple[list[dict[str, Any]], int]:
    """The records with the replies every part's progress file holds (read, never changed), and how many chats
    are not regenerated yet (parts still running)."""
    out, missing = list(records), 0
    for rank in range(world_size):
        part = part_of(len(records), world_size, rank)
        done = _RegenStore(directory / regen_file(world_size, rank), settings).load(
            records[part.start : part.stop], False
        )
        for k, i in enumerate(part):
            if k in done:
                out[i] = done[k]
            elif "messages" in records[i]:
                missing += 1
    return out, missing


def _open_prompt(turns: list[dict[str, str] | None]) -> list[dict[str, str]]:
    """The turns before the first open reply slot."""
    return turns[: turns.index(None)]  # type: ignore[return-value]


def pack_blocks(sequences: Iterable[tuple[list[int], list[int]]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (ids, mask) sequences and cut them into [N, seq_len] blocks (the tail is dropped)."""
    ids: list[int] = []
    mask: list[int] = []
    for seq_ids, seq_mask in sequences:
        ids += seq_ids
        mask += seq_mask
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(
            f"only {len(ids)} tokens of data: not one block of seq_len={seq_len}; add data or lower --seq-len"
        )
    return (
        torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len),
        torch.tensor(mask[: n * seq_len], dtype=torch.uint8).view(n, seq_len),
    )


def save_blocks(
    directory: str | os.PathLike, input_ids: torch.Tensor, loss_mask: torch.Tensor, info: dict[str, Any]
) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_save({"input_ids": input_ids.contiguous(), "loss_mask": loss_mask.contiguous()}, directory / BLOCKS_FILE)
    (directory / INFO_FILE).write_text(
        json.dumps({**info, "blocks": input_ids.shape[0], "seq_len": input_ids.shape[1]}, indent=2)
    )


def load_blocks(directory: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(directory) / BLOCKS_FILE
    if not path.exists():
        raise DataError(f"{path} not found: build training data first with `speculators-hf data`")
    tensors = load_file(path)
    return tensors["input_ids"].long(), tensors["loss_mask"]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# verifier hidden states
# --------------------------------------------------------------------------------------------------
def feature_cache_bytes(n_blocks: int, seq_len: int, hidden_size: int, n_layers: int, dtype: torch.dtype) -> int:
    return n_blocks * seq_len * hidden_size * n_layers * torch.finfo(dtype).bits // 8


def cache_features(
    verifier: Any,
    input_ids: torch.Tensor,
    layer_ids: list[int],
    directory: str | os.PathLike,
    shard_blocks: int = 64,
    batch_size: int = 8,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Compute the verifier hidden states of every block once and store them as safetensors shards
    under `directory/features-<ids>/`. Shards already written are kept, so an interrupted run resumes."""

    def compute(chunk: torch.Tensor, first: int) -> list[torch.Tensor]:
        parts: list[list[torch.Tensor]] = []
        with torch.no_grad():
            for b in range(0, chunk.shape[0], batch_size):
                states = verifier_hidden_states(verifier, chunk[b : b + batch_size].to(verifier.device), layer_ids)
                parts.append([s.to("cpu") for s in states])
        return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]

    hidden = verifier.config.get_text_config().hidden_size
    return write_feature_shards(input_ids, layer_ids, directory, hidden, compute, shard_blocks, dtype)


def write_feature_shards(
    input_ids: torch.Tensor,
    layer_ids: list[int],
    directory: str | os.PathLike,
    hidden_size: int,
    compute: Any,
    shard_blocks: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    world_size: int = 1,
    rank: int = 0,
) -> Path:
    """The shard loop of every engine: `compute(blocks [n, T], index of the first)` gives one [n, T, H] tensor per id of sorted
    `layer_ids`; each shard of `shard_blocks` blocks is written to `directory/features-<ids>/shard-N` through a
    temporary file (a kill leaves whole shards only) and skipped when it exists (a rerun resumes). With
    `world_size` > 1 this process writes only the `rank`-th contiguous part of the shards."""
    ids = sorted(set(layer_ids))
    out = Path(directory) / f"features-{'-'.join(map(str, ids))}"
    out.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, input_ids.shape[0], shard_blocks))
    mine = part_of(len(starts), world_size, rank)
    blocks = sum(min(shard_blocks, input_ids.shape[0] - starts[s]) for s in mine)
    total = feature_cache_bytes(blocks, input_ids.shape[1], hidden_size, len(ids), dtype)
    part = f" (part {rank + 1} of {world_size}: shards {mine.start}..{mine.stop - 1})" if world_size > 1 else ""
    print(f"caching verifier hidden states {ids}: {blocks} blocks{part}, about {total / 2**20:.1f} MiB in {out}")
    for shard in tqdm(mine, desc="verifier hidden states", unit="shard"):
        path = out / f"shard-{shard:05d}.safetensors"
        start = starts[shard]
        chunk = input_ids[start : start + shard_blocks]
        if path.exists() and _shard_holds(path, chunk):
            continue
        states = compute(chunk, start)
        tensors = {f"hidden.{i}": s.to(dtype).contiguous() for i, s in zip(ids, states)}
        tensors["block_index"] = torch.arange(start, start + states[0].shape[0])
        tensors["input_ids"] = chunk.contiguous()  # what the states are of: a rerun on other data recomputes
        _atomic_save(tensors, path)
    return out


def _shard_holds(path: Path, input_ids: torch.Tensor) -> bool:
    """Whether the feature shard at `path` was computed for these blocks (shards written before the blocks were
    stored in them are trusted, as before)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        if "input_ids" not in set(f.keys()):
            return True
        return torch.equal(f.get_tensor("input_ids"), input_ids)


class DraftDataset(torch.utils.data.Dataset):
    """Blocks of (input_ids, loss_mask) and, from a feature cache, the verifier hidden states: all the cache
    holds, or those of `layer_ids` (a cache of more layers, e.g. from one vLLM server for several families)."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        feature_dir: str | os.PathLike | None = None,
        layer_ids: list[int] | None = None,
    ):
        self.input_ids, self.loss_mask = input_ids, loss_mask
        self.features: list[list[torch.Tensor]] | None = None
        if feature_dir is not None:
            shards = sorted(Path(feature_dir).glob("shard-*.safetensors"))
            if not shards:
                raise DataError(f"no feature shards in {feature_dir}")
            loaded = [load_file(s) for s in shards]
            held = sorted(int(k.split(".")[1]) for k in loaded[0] if k.startswith("hidden."))
            wanted = held if layer_ids is None else sorted(set(layer_ids))
            if not set(wanted) <= set(held):
                raise DataError(
                    f"{feature_dir} holds the hidden states {held}, the draft reads {wanted}: cache them with "
                    f"`speculators-hf data --cache-features --layers {','.join(map(str, wanted))}` (or --family)"
                )
            stacked = [torch.cat([s[f"hidden.{i}"] for s in loaded]) for i in wanted]
            if stacked[0].shape[0] != input_ids.shape[0]:
                raise DataError(
                    f"{feature_dir} holds {stacked[0].shape[0]} blocks, the data {input_ids.shape[0]}: re-run caching"
                )
            if all("input_ids" in s for s in loaded) and not torch.equal(
                torch.cat([s["input_ids"] for s in loaded]), input_ids
            ):
                raise DataError(
                    f"{feature_dir} holds the hidden states of other blocks than the data's (the data was rebuilt "
                    "after they were cached): re-run `speculators-hf data ... --cache-features` to recompute them"
                )
            self.features = [list(x) for x in zip(*stacked)]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.input_ids[i], "loss_mask": self.loss_mask[i]}
        if self.features is not None:
            item["features"] = self.features[i]
        return item


# --------------------------------------------------------------------------------------------------
# the verifier without its decoder layers
# --------------------------------------------------------------------------------------------------
def verifier_parts(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "cpu",
    **download: Any,
) -> Any:
    """The verifier `AutoModelForCausalLM` with only the tensors OUTSIDE its decoder layers (token embedding,
    final norm, lm_head, ...) read from its safetensors, by name, from the files that hold them (index-aware:
    the shards that hold only decoder layers are never opened or downloaded). The decoder layers stay on the
    meta device, allocated nowhere: enough to create a draft, bind it and train it from cached features; a
    forward pass raises. Tied tensors stay tied. `dtype` "auto": the config's dtype, else the stored one."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.utils import cached_file

    name = str(name_or_path)
    config = AutoConfig.from_pretrained(name, **download)
    model = meta_model(AutoModelForCausalLM.from_config, config)
    model.name_or_path = config._name_or_path = name
    with contextlib.suppress(OSError):  # the eos ids replies end at, as from_pretrained reads them
        model.generation_config = GenerationConfig.from_pretrained(name, **download)
    decoder = decoder_of(model)
    layers = next(n for n, m in model.named_modules() if m is decoder.layers) + "."
    state = model.state_dict(keep_vars=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    wanted: dict[int, list[str]] = {}  # one entry per tensor object: its names (several when tied)
    for key, tensor in state.items():
        if not key.startswith(layers):
            wanted.setdefault(id(tensor), []).append(key)

    from safetensors import safe_open

    quiet = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
    index = cached_file(name, SAFETENSORS_INDEX, **quiet, **download)
    if index is not None:
        shard_names(Path(index))  # refuses names that lead out of the folder
        weight_map: dict[str, str] = json.loads(Path(index).read_text())["weight_map"]
    else:
        single = cached_file(name, SAFETENSORS_FILE, **quiet, **download)
        if single is None:
            raise DataError(
                f"verifier {name}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}; training from features reads the "
                "borrowed tensors from safetensors files (save the verifier with save_pretrained)"
            )
        with safe_open(single, "pt") as f:
            weight_map = dict.fromkeys(f.keys(), SAFETENSORS_FILE)
    plan: dict[str, list[tuple[str, list[str]]]] = {}  # shard -> [(stored name, the model's names)]
    for keys in wanted.values():
        stored = next((k for k in keys if k in weight_map), None)
        if stored is None:
            if keys[0] not in params:
                continue  # a buffer computed at init (e.g. rotary frequencies): unused without the decoder
            raise DataError(
                f"verifier {name}: {keys[0]} (outside the decoder layers: needed without them) is not in its "
                f"{SAFETENSORS_INDEX if index else SAFETENSORS_FILE}; the checkpoint does not match its config"
            )
        plan.setdefault(weight_map[stored], []).append((stored, keys))
    if dtype == "auto":
        dtype = config.dtype if isinstance(config.dtype, torch.dtype) else "stored"
    for shard, entries in sorted(plan.items()):
        path = cached_file(name, shard, **download)
        if path is None:  # pragma: no cover - cached_file raises for a missing entry
            raise DataError(f"verifier {name}: {shard}, named by {SAFETENSORS_INDEX}, is missing")
        check_inside(Path(path), Path(path).parent, "verifier shard")
        with safe_open(path, "pt", device="cpu") as f:
            for stored, keys in entries:
                tensor = f.get_tensor(stored)
                if tensor.shape != state[keys[0]].shape:
                    raise DataError(
                        f"verifier {name}: {stored} in {shard} is {list(tensor.shape)}, its config makes it "
                        f"{list(state[keys[0]].shape)}: the checkpoint does not match its config"
                    )
                if tensor.is_floating_point() and dtype != "stored":
                    tensor = tensor.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
                tensor = tensor.to(device)
                is_param = keys[0] in params
                value = torch.nn.Parameter(tensor, requires_grad=False) if is_param else tensor
                for key in keys:  # the same object under every name: tied tensors stay tied
                    module_name, _, leaf = key.rpartition(".")
                    module = model.get_submodule(module_name)
                    (module._parameters if is_param else module._buffers)[leaf] = value

    def refuse(*_: Any, **__: Any) -> None:
        raise RuntimeError(
            f"verifier {name} was loaded without its decoder layers (`verifier_parts`, for training from cached "
            "features): it cannot run. Load the whole verifier (from_pretrained) to compute hidden states or generate."
        )

    decoder.register_forward_pre_hook(refuse)
    return model.eval()


def pre_norm_last(verifier: Any, states: torch.Tensor, layer_id: int) -> torch.Tensor:
    """vLLM's (and the `speculators` library's) hidden state `layer_id` in this package's numbering: the same
    tensor, except id N (the number of layers), which vLLM takes BEFORE the final norm and this package after it
    (transformers' `hidden_states[N]`): that one is passed through the verifier's own final norm."""
    from ..generation.capture import decoder_of

    if layer_id != verifier.config.get_text_config().num_hidden_layers:
        return states
    norm = getattr(decoder_of(verifier), "norm", None)
    if norm is None:
        raise DataError(
            f"{type(verifier).__name__} has no final `norm`: its post-norm last hidden state (id {layer_id}) cannot "
            "be made from vLLM's pre-norm one; drop that id (--layers)"
        )
    weight = next(norm.parameters())
    with torch.no_grad():
        return norm(states.to(weight.device, weight.dtype)).to("cpu", states.dtype)


# --------------------------------------------------------------------------------------------------
# data from the `speculators` library (its `prepare-data` + `generate-offline-data`)
# --------------------------------------------------------------------------------------------------
SPECULATORS_HIDDEN = "hidden_states"  # generate-offline-data's default folder, inside the prepared dataset


def speculators_layer_ids(num_layers: int) -> list[int]:
    """The ids of the library's default files, in file order: EAGLE-3's [2, N//2, N-3] and N, the last layer's
    output before the final norm (`verifier_last_hidden_states`)."""
    return [2, num_layers // 2, num_layers - 3, num_layers]


def read_speculators_prepared(prepared: str | os.PathLike) -> list[tuple[list[int], list[int]]]:
    """(input_ids, loss_mask) of every row of the dataset `speculators prepare-data` saved (`datasets`'
    `save_to_disk`: `state.json` naming Arrow stream files with `input_ids`, `loss_mask` and `seq_len`), in row
    order: row i is the sample of `hs_{i}.safetensors`. Needs pyarrow (`pip install pyarrow`)."""
    try:
        import pyarrow as pa
        import pyarrow.ipc
    except ImportError:
        raise DataError("reading a `speculators` prepared dataset needs pyarrow: pip install pyarrow") from None
    prepared = Path(prepared)
    state = prepared / "state.json"
    if not state.exists():
        raise DataError(
            f"{prepared} is not a dataset saved by `speculators prepare-data` (no state.json): pass the folder "
            "given to its --output"
        )
    files = [prepared / entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    rows: list[tuple[list[int], list[int]]] = []
    for path in files:
        check_inside(path, prepared, "prepared data file")
        with pa.memory_map(str(path)) as source:
            table = pyarrow.ipc.open_stream(source).read_all()
        missing = {"input_ids", "loss_mask"} - set(table.column_names)
        if missing:
            raise DataError(f"{path}: no column {sorted(missing)} (has {table.column_names}): not prepare-data output")
        for ids, mask in zip(table["input_ids"].to_pylist(), table["loss_mask"].to_pylist()):
            if len(ids) != len(mask) or not ids:
                raise DataError(f"{path}: row {len(rows)}: {len(ids)} input_ids, {len(mask)} loss_mask values")
            rows.append((ids, [int(bool(m)) for m in mask]))
    return rows


def import_speculators(
    prepared: str | os.PathLike,
    verifier: Any,
    output: str | os.PathLike,
    seq_len: int,
    hidden_dir: str | os.PathLike | None = None,
    layer_ids: list[int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    shard_blocks: int = 64,
) -> Path:
    """This package's blocks and feature shards from the `speculators` library's offline data: its prepared
    dataset (`prepared`: token ids and loss masks) and its `hs_{i}.safetensors` files (`hidden_dir`, default
    `prepared/hidden_states`: `hidden_states` [seq, layers, hidden] and `token_ids` [seq] of row i).

    `layer_ids` are the library's (vLLM's) ids of the files' layers in file order, default
    `speculators_layer_ids` for 4-layer files; id N (pre-norm) becomes this package's post-norm id N through the
    verifier's final norm (`pre_norm_last`; `verifier` may be `verifier_parts`), the others are kept. Rows are
    packed in order into `seq_len` blocks like `pack_blocks`; rows without a file (the library skips the samples
    that failed) are left out and counted. Every file is checked before anything is written (it opens, names
    these tensors, holds the row's token ids, and the shape agrees with the others and the verifier); finiteness
    is checked as the shards are written. Resumable like `write_feature_shards`. Returns the feature folder."""
    text = verifier.config.get_text_config()
    n_layers, hidden = text.num_hidden_layers, text.hidden_size
    hidden_dir = Path(hidden_dir) if hidden_dir is not None else Path(prepared) / SPECULATORS_HIDDEN
    rows = read_speculators_prepared(prepared)
    from safetensors import safe_open

    kept, skipped, width = [], [], None
    for i, (ids, _) in enumerate(rows):
        path = hidden_dir / f"hs_{i}.safetensors"
        if not path.exists():
            skipped.append(i)
            continue
        try:
            with safe_open(str(path), "pt") as f:
                names = set(f.keys())
                if not {"hidden_states", "token_ids"} <= names:
                    raise DataError(f"{path} holds {sorted(names)}, not hidden_states and token_ids")
                states = f.get_slice("hidden_states")
                shape, kind = list(states.get_shape()), states.get_dtype()
                stored = f.get_tensor("token_ids").tolist()
        except DataError:
            raise
        except Exception as err:  # safetensors raises its own types for a truncated or damaged file
            raise DataError(
                f"{path} is damaged ({err}): delete it and rerun `speculators generate-offline-data` (it regenerates "
                "missing files), then this command"
            ) from None
        if stored != ids:
            raise DataError(
                f"{path}: its token_ids ({len(stored)}) are not those of row {i} of {prepared} ({len(ids)}): the "
                "files and the prepared dataset are of different runs (hs_{i} is row i of the dataset they were made from)"
            )
        if kind not in ("BF16", "F16", "F32") or len(shape) != 3 or shape[0] != len(ids) or shape[2] != hidden:
            raise DataError(
                f"{path}: hidden_states {kind} {shape}, expected a float [{len(ids)}, layers, {hidden}] (tokens, "
                f"layers, the verifier's hidden size): is it of this verifier?"
            )
        if width is None:
            width = shape[1]
        elif shape[1] != width:
            raise DataError(f"{path} holds {shape[1]} layers, the files before it {width}: mixed runs")
        kept.append(i)
    if width is None:
        raise DataError(f"no hs_{{i}}.safetensors for any of the {len(rows)} rows of {prepared} in {hidden_dir}")
    if layer_ids is None:
        if width != 4:
            raise DataError(
                f"{hidden_dir}: the files hold {width} layers, not the library's default 4: pass their ids in file "
                "order (--layers, the --target-layer-ids vLLM was started with, and N last if it was included)"
            )
        layer_ids = speculators_layer_ids(n_layers)
    if len(layer_ids) != width or len(set(layer_ids)) != width or not all(0 <= i <= n_layers for i in layer_ids):
        raise DataError(
            f"--layers {layer_ids}: the files hold {width} layers; give {width} distinct ids in 0..{n_layers}"
        )
    if skipped:
        print(f"warning: {len(skipped)} of {len(rows)} rows have no hidden-state file and are left out: {skipped[:10]}")
    sequences = [rows[i] for i in kept]
    input_ids, loss_mask = pack_blocks(sequences, seq_len)
    info = {"verifier": verifier.name_or_path, "source": f"speculators:{prepared}", "speculators_rows": kept}
    output = Path(output)
    previous = output / INFO_FILE
    if previous.exists() and json.loads(previous.read_text()).get("speculators_rows", kept) != kept:
        raise DataError(
            f"{output} holds an import of other rows (hidden-state files were added or removed since): its feature "
            "shards would not match; use another --output or delete it"
        )
    save_blocks(output, input_ids, loss_mask, {**info, "records": len(kept), "trained_tokens": int(loss_mask.sum())})
    starts = [0]
    for ids, _ in sequences:
        starts.append(starts[-1] + len(ids))
    order = sorted(range(width), key=lambda j: layer_ids[j])  # file column of each sorted id

    def compute(blocks: torch.Tensor, first: int) -> list[torch.Tensor]:
        begin, end = first * seq_len, (first + blocks.shape[0]) * seq_len
        pieces = []
        k = next(k for k in range(len(kept)) if starts[k + 1] > begin)
        while starts[k] < end:
            path = hidden_dir / f"hs_{kept[k]}.safetensors"
            states = load_file(path)["hidden_states"]
            if not bool(torch.isfinite(states).all()):
                raise DataError(
                    f"{path} holds non-finite hidden states (inf or nan): delete it and rerun `speculators "
                    "generate-offline-data`, then this command (the shards written so far are kept)"
                )
            pieces.append(states[max(begin - starts[k], 0) : end - starts[k]])
            k += 1
        states = torch.cat(pieces).view(blocks.shape[0], seq_len, width, hidden)
        return [pre_norm_last(verifier, states[:, :, j], layer_ids[j]) for j in order]

    return write_feature_shards(input_ids, layer_ids, output, hidden, compute, shard_blocks, dtype)
