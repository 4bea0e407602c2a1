"""Training data for drafts: records -> token blocks with a loss mask -> verifier hidden states.

1. `load_records` reads jsonl: `{"text": ...}`, `{"messages": [{"role", "content"}, ...]}` (chat) or
   `{"prompt": ..., "response": ...}`.
2. `regenerate_responses` (optional, recommended) replaces every assistant reply with the verifier's
   own generation, so the draft learns the distribution it will be verified against.
3. `tokenize_record` applies the verifier's chat template; the loss mask covers assistant tokens
   (all tokens for plain text). `pack_blocks` concatenates records into fixed-length blocks.
4. Hidden states are computed on the fly during training (`DraftDataset(verifier=...)`) or cached
   once with `cache_features` as fp16/bf16 safetensors shards (resumable, with a size estimate).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..generation.capture import verifier_hidden_states

BLOCKS_FILE = "blocks.safetensors"
INFO_FILE = "data_info.json"


class DataError(ValueError):
    """Training data is malformed; the message names the record or file."""


# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------
def load_records(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a jsonl file of text, chat or prompt/response records."""
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
                record = {
                    "messages": [
                        {"role": "user", "content": record["prompt"]},
                        {"role": "assistant", "content": record.get("response", "")},
                    ]
                }
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    return records


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    if _has_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    # No template (tiny or base models): plain "role: content" lines.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    if add_generation_prompt:
        text += "assistant:"
    return list(tokenizer(text, add_special_tokens=False).input_ids)


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
        full = _chat_ids(tokenizer, messages[: i + 1])
        if full[: len(ids)] != ids:
            raise DataError(
                "the chat template renders earlier turns differently once a turn is added, so assistant tokens "
                "cannot be located; pass plain {'text': ...} records instead"
            )
        mask += [int(message["role"] == "assistant")] * (len(full) - len(ids))
        ids = full
    return ids, mask


def regenerate_responses(
    verifier: Any, tokenizer: Any, records: list[dict[str, Any]], max_new_tokens: int = 256, do_sample: bool = False
) -> list[dict[str, Any]]:
    """Replace each assistant reply by the verifier's own continuation of the conversation so far."""
    out = []
    for record in tqdm(records, desc="regenerating responses with the verifier", unit="record"):
        if "messages" not in record:
            out.append(record)
            continue
        messages: list[dict[str, str]] = []
        for message in record["messages"]:
            if message["role"] != "assistant":
                messages.append(message)
                continue
            prompt = torch.tensor([_chat_ids(tokenizer, messages, add_generation_prompt=True)], device=verifier.device)
            with torch.no_grad():
                gen = verifier.generate(prompt, max_new_tokens=max_new_tokens, do_sample=do_sample)
            reply = tokenizer.decode(gen[0, prompt.shape[1] :], skip_special_tokens=True)
            messages.append({"role": "assistant", "content": reply})
        out.append({"messages": messages})
    return out


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
    ids_tag = "-".join(map(str, sorted(set(layer_ids))))
    out = Path(directory) / f"features-{ids_tag}"
    out.mkdir(parents=True, exist_ok=True)
    hidden = verifier.config.get_text_config().hidden_size
    total = feature_cache_bytes(input_ids.shape[0], input_ids.shape[1], hidden, len(set(layer_ids)), dtype)
    print(
        f"caching verifier hidden states {sorted(set(layer_ids))}: {input_ids.shape[0]} blocks, about {total / 2**20:.1f} MiB in {out}"
    )
    starts = range(0, input_ids.shape[0], shard_blocks)
    for shard, start in enumerate(tqdm(starts, desc="verifier hidden states", unit="shard")):
        path = out / f"shard-{shard:05d}.safetensors"
        if path.exists():
            continue
        chunk = input_ids[start : start + shard_blocks]
        parts: list[list[torch.Tensor]] = []
        with torch.no_grad():
            for b in range(0, chunk.shape[0], batch_size):
                states = verifier_hidden_states(verifier, chunk[b : b + batch_size].to(verifier.device), layer_ids)
                parts.append([s.to("cpu", dtype) for s in states])
        tensors = {f"hidden.{i}": torch.cat([p[k] for p in parts]) for k, i in enumerate(sorted(set(layer_ids)))}
        tensors["block_index"] = torch.arange(start, start + chunk.shape[0])
        _atomic_save(tensors, path)
    return out


class DraftDataset(torch.utils.data.Dataset):
    """Blocks of (input_ids, loss_mask) and, from a feature cache, the verifier hidden states."""

    def __init__(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, feature_dir: str | os.PathLike | None = None):
        self.input_ids, self.loss_mask = input_ids, loss_mask
        self.features: list[list[torch.Tensor]] | None = None
        if feature_dir is not None:
            shards = sorted(Path(feature_dir).glob("shard-*.safetensors"))
            if not shards:
                raise DataError(f"no feature shards in {feature_dir}")
            loaded = [load_file(s) for s in shards]
            keys = sorted((k for k in loaded[0] if k.startswith("hidden.")), key=lambda k: int(k.split(".")[1]))
            stacked = [torch.cat([s[k] for s in loaded]) for k in keys]
            if stacked[0].shape[0] != input_ids.shape[0]:
                raise DataError(
                    f"{feature_dir} holds {stacked[0].shape[0]} blocks, the data {input_ids.shape[0]}: re-run caching"
                )
            self.features = [list(x) for x in zip(*stacked)]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.input_ids[i], "loss_mask": self.loss_mask[i]}
        if self.features is not None:
            item["features"] = self.features[i]
        return item


def iterate_records(tokenizer: Any, records: list[dict[str, Any]]) -> Iterator[tuple[list[int], list[int]]]:
    for record in records:
        yield tokenize_record(tokenizer, record)
