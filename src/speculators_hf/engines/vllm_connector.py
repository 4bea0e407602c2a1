"""A vLLM KV connector that writes the verifier's hidden states synchronously (loaded BY vLLM, in vLLM's
environment: it imports only vLLM, torch and safetensors, never speculators_hf).

vLLM's `ExampleHiddenStatesConnector` (the `extract_hidden_states` speculative method) copies each finished
request's hidden states to pinned host memory on a CUDA stream and writes them from a thread pool; on a CPU
build `pin_memory=True` fails. This subclass extracts them and writes `{shared_storage_path}/{request id}
.safetensors` (`hidden_states` [tokens, layers, hidden], `token_ids` [tokens]) in the worker step itself, on
any device, through a temporary file renamed into place (a reader never sees a part), then releases the
`.lock` file's flock as the reference does. Load it with
`--kv-transfer-config '{"kv_connector": "SyncHiddenStatesConnector", "kv_connector_module_path":
"vllm_connector", ...}'` and this folder on PYTHONPATH (`speculators-hf serve-features` does both).
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)


class _Done:
    """Stands for the reference connector's CUDA copy event: the write is over when it is recorded."""

    @staticmethod
    def query() -> bool:
        return True


class SyncHiddenStatesConnector(ExampleHiddenStatesConnector):
    """`ExampleHiddenStatesConnector` with the extraction and the write done synchronously (CPU and GPU)."""

    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        if self._kv_cache is None:
            raise RuntimeError("SyncHiddenStatesConnector: no hidden-state cache registered")
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slots = (offsets[None, :] + blocks[:, None] * self._block_size).flatten().to(self._kv_cache.device)
        states = extract_from_kv_cache(self._kv_cache, slots, pending.token_ids.shape[0]).to("cpu").contiguous()
        tensors = {"hidden_states": states, "token_ids": pending.token_ids.clone().contiguous()}
        os.makedirs(os.path.dirname(pending.filename) or ".", exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        try:
            tmp = f"{pending.filename}.tmp-{os.getpid()}"
            save_file(tensors, tmp)
            os.replace(tmp, pending.filename)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases LOCK_EX: readers waiting on LOCK_SH go on
        self._req_copy_events[pending.req_id] = _Done()  # type: ignore[assignment]
