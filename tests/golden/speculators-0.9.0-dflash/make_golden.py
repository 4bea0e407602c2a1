"""Regenerate this folder's golden data with the `speculators` library itself (0.9.0 from PyPI).

Run in a separate venv, never the project's (as ../speculators-0.9.0-eagle3/make_golden.py says):

    HF_HUB_OFFLINE=1 /tmp/specvenv/bin/python make_golden.py OUT_DIR

Writes OUT_DIR/config.json + model.safetensors exactly as speculators' `save_pretrained` does (its
config.py remote-code copy removed) and OUT_DIR/golden.safetensors: a 12-token sequence (aux states
[1, 12, 3H], its tokens), the verifier embedding the draft borrows (`embed`), four anchors, and the
draft-vocabulary logits [4 * block_size, Vd] that speculators' own DFlashDraftModel.forward computes for the
blocks at those anchors (its random anchor choice replaced by these, eager attention, captured at lm_head).
The draft has two layers, one sliding-window (window 4, causal in the block) and one full attention, so
both masks and the window are covered.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from speculators import SpeculatorModel
from speculators.config import SpeculatorsConfig, VerifierConfig
from speculators.losses.utils import resolve_loss_config
from speculators.models.dflash import DFlashSpeculatorConfig
from speculators.models.dflash import core as dflash_core
from speculators.proposals.greedy import GreedyTokenProposalConfig
from transformers import Qwen3Config

out = Path(sys.argv[1])
LENGTH, BLOCK = 12, 4
ANCHORS = [0, 3, 5, 8]
layer = Qwen3Config(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-6,
    layer_types=["sliding_attention", "full_attention"], sliding_window=4, use_sliding_window=True,
)  # fmt: skip
layer._attn_implementation = "eager"  # the library's float-mask path (flex attention needs compilation)
config = DFlashSpeculatorConfig(
    transformer_layer_config=layer,
    draft_vocab_size=64,
    block_size=BLOCK,
    aux_hidden_state_layer_ids=[1, 3, 5],
    mask_token_id=95,
    speculators_config=SpeculatorsConfig(
        algorithm="dflash",
        proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=BLOCK - 1)],
        default_proposal_method="greedy",
        verifier=VerifierConfig(name_or_path="tiny-org/tiny-verifier", architectures=["Qwen3ForCausalLM"]),
    ),
)
model = SpeculatorModel.registered_model_class_from_config(config)(config).eval()
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.named_parameters():
        p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=gen))
    target = torch.randperm(96, generator=gen)[:64].sort().values
    model.d2t.copy_(target - torch.arange(64))
    model.t2d.zero_()
    model.t2d[target] = True
model.save_pretrained(out)
(out / "config.py").unlink(missing_ok=True)

anchors = torch.tensor(ANCHORS)
dflash_core.select_anchors = lambda loss_mask, num_anchors, block_size: (anchors, torch.ones(4, dtype=torch.bool))
captured = []
model.lm_head.register_forward_hook(lambda module, args, output: captured.append(output.detach().clone()))
aux = torch.randn(1, LENGTH, 96, generator=gen)
tokens = torch.randint(3, 95, (1, LENGTH), generator=gen)
with torch.no_grad():
    model(
        hidden_states=aux,
        input_ids=tokens,
        loss_mask=torch.ones(1, LENGTH, dtype=torch.long),
        verifier_last_hidden_states=torch.randn(1, LENGTH, 32, generator=gen),
        document_ids=torch.zeros(1, LENGTH, dtype=torch.long),
        max_anchors=len(ANCHORS),
        loss_config=resolve_loss_config("kl_div", "eager"),  # the fused default needs Triton
    )
save_file(
    {
        "aux": aux,
        "tokens": tokens,
        "anchors": anchors,
        "embed": model.embed_tokens.weight.detach().clone(),
        "draft_logits": captured[0][0],
    },
    str(out / "golden.safetensors"),
)
