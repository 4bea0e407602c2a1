# Remote code of speculators_hf (https://pypi.org/project/speculators-hf/), from speculators_hf.generation.capture. Do not edit.
"""Capture the verifier's hidden states during its own forward passes (no extra verifier forward).

`VerifierTap` installs forward hooks on a decoder-only verifier (Llama, Qwen2/3, Mistral, ... any model
whose decoder exposes a `layers` ModuleList):

- a pre-hook on the base model notes where the pass starts (the verifier's cache length);
- for a layer index `i < num_layers`, a pre-hook on decoder layer `i` keeps its input, i.e.
  `hidden_states[i]` in transformers' `output_hidden_states` numbering (0 = embeddings);
- for `i == num_layers` (EAGLE-1, Medusa, MLP speculator: the post-norm last hidden state), a hook on
  the base model keeps `last_hidden_state`.

Only references are kept (nothing is copied or recomputed), and only while the tap is armed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class VerifierBindingError(ValueError):
    """The verifier cannot serve this draft (wrong architecture, fingerprint or state); see the message."""


def decoder_of(verifier: nn.Module) -> nn.Module:
    """The verifier's base decoder (the module holding `layers`)."""
    getter = getattr(verifier, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        decoder = getattr(verifier, "model", None)
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise VerifierBindingError(
            f"{type(verifier).__name__} has no decoder with a `layers` ModuleList; speculators_hf drafts need a "
            "decoder-only transformers model (e.g. LlamaForCausalLM, Qwen3ForCausalLM, MistralForCausalLM)."
        )
    return decoder


def verifier_hidden_states(verifier: nn.Module, input_ids: torch.Tensor, layer_ids: list[int]) -> list[torch.Tensor]:
    """The hidden states `VerifierTap` captures, computed with one plain forward (for training data):
    `hidden_states[i]` for i < num_layers and the post-norm last hidden state for i == num_layers,
    one [B, T, H] tensor per id, ascending."""
    decoder = decoder_of(verifier)
    num_layers = len(decoder.layers)  # type: ignore[arg-type]
    out = decoder(input_ids=input_ids, output_hidden_states=True)
    return [out.last_hidden_state if i == num_layers else out.hidden_states[i] for i in sorted(set(layer_ids))]


def _cache_length(kwargs: dict[str, Any]) -> int:
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


class VerifierTap:
    """Forward hooks that keep the verifier hidden states a draft needs, indexed by absolute position."""

    def __init__(self, verifier: nn.Module, layer_ids: list[int]):
        self.decoder = decoder_of(verifier)
        layers: nn.ModuleList = self.decoder.layers  # type: ignore[assignment]
        num_layers = len(layers)
        bad = [i for i in layer_ids if not 0 <= i <= num_layers]
        if bad:
            raise VerifierBindingError(
                f"the draft needs verifier hidden states {bad}, but the verifier has {num_layers} layers "
                f"(valid ids 0..{num_layers}); was the draft made for another verifier?"
            )
        self.layer_ids = sorted(set(layer_ids))
        self.num_layers = num_layers
        self.armed = False
        self.forwards = 0  # verifier forward passes seen while armed
        self.start = 0  # absolute position of the first token of the last pass
        self.states: dict[int, torch.Tensor] = {}
        self._handles = [self.decoder.register_forward_pre_hook(self._on_decoder_start, with_kwargs=True)]
        for i in self.layer_ids:
            if i < num_layers:
                self._handles.append(layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        if num_layers in self.layer_ids:
            self._handles.append(self.decoder.register_forward_hook(self._on_decoder_end))

    # hooks ---------------------------------------------------------------------------------------
    def _on_decoder_start(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.armed:
            self.start = _cache_length(kwargs)
            self.states = {}
            self.forwards += 1

    def _layer_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if self.armed:
                self.states[idx] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _on_decoder_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.armed:
            self.states[self.num_layers] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    # API -----------------------------------------------------------------------------------------
    def arm(self) -> None:
        self.armed, self.forwards, self.states, self.start = True, 0, {}, 0

    def disarm(self) -> None:
        self.armed, self.states = False, {}

    @property
    def hook_ids(self) -> set[int]:
        """The handle ids of the tap's hooks (they only observe: `lean.LeanPass` may run without them)."""
        return {handle.id for handle in self._handles}

    def remove(self) -> None:
        self.disarm()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def end(self) -> int:
        """Absolute position one past the last token of the last captured pass."""
        if not self.states:
            return self.start
        return self.start + next(iter(self.states.values())).shape[1]

    def features(self, begin: int, end: int) -> list[torch.Tensor] | None:
        """Captured states for absolute positions [begin, end), one [B, end-begin, H] tensor per layer id
        (ascending). None when nothing has been captured yet (before the verifier's prefill)."""
        if not self.states:
            return None
        if begin < self.start or end > self.end:
            raise VerifierBindingError(
                f"verifier hidden states for positions {begin}..{end - 1} are missing (the last verifier pass "
                f"covered {self.start}..{self.end - 1}). The verifier must run between draft rounds, as "
                "transformers' assisted generation does; do not call the draft's generate() yourself."
            )
        return [self.states[i][:, begin - self.start : end - self.start] for i in self.layer_ids]
