"""Regenerate this folder's golden data with the `speculators` library itself (0.9.0 from PyPI).

Run in a separate venv, never the project's (as ../speculators-0.9.0-dspark/make_golden.py says):

    HF_HUB_OFFLINE=1 /work/venvs/speculators/bin/python make_golden.py OUT_DIR

For each variant below, writes OUT_DIR/<variant>/config.json + model.safetensors exactly as speculators'
`save_pretrained` does (its config.py remote-code copy removed) and OUT_DIR/<variant>/golden.safetensors: a
12-token sequence (aux states [1, 12, 3H], its tokens), the verifier embedding and lm_head the draft borrows
(`embed`, `head`: DFlash2 needs the full vocabulary, so its lm_head is the verifier's), four anchors, and what
speculators' own DFlash2DraftModel.forward computes for the blocks at those anchors (its random anchor choice
replaced by these, eager attention, captured where it calls compute_metrics): the unary logits
(`unary_logits` [4 * block_size, V]), the verifier's target ids (`target_ids`, the argmax of its targets), the
selector's training candidates (`training_candidate_ids` [4 * block_size, top_k]: the unary top-k, the target
injected at rank k when missing), the target's rank among them (`target_positions`) and their selector scores
(`candidate_logits`). Two Qwen3 layers (sliding window 4, then full attention), selector rank 8; every
parameter random, the convolutions included (not their identity start).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from speculators import SpeculatorModel
from speculators.config import SpeculatorsConfig, VerifierConfig
from speculators.losses.eager import tv_loss
from speculators.losses.utils import resolve_loss_config
from speculators.models.dflash import core as dflash_core
from speculators.models.dflash2 import DFlash2SpeculatorConfig
from speculators.models.dflash2 import core as dflash2_core
from speculators.proposals.greedy import GreedyTokenProposalConfig
from transformers import Qwen3Config

out = Path(sys.argv[1])
LENGTH, BLOCK = 12, 4
ANCHORS = [0, 3, 5, 8]
VARIANTS = {  # name -> DFlash2 fields
    # the library's defaults (2 taps, 16 channels a kernel, bidirectional sliding layers, slot 0 the anchor)
    "default": {"selector_top_k": 4},
    # 3 taps over groups of 8 channels, causal sliding layers, slot 0 predicting
    "anchor-k3": dict(
        selector_top_k=6,
        conv_kernel_size=3,
        conv_group_size=8,
        sliding_window_non_causal=False,
        sample_from_anchor=True,
    ),
}

anchors = torch.tensor(ANCHORS)
dflash_core.select_anchors = lambda loss_mask, num_anchors, block_size: (anchors, torch.ones(4, dtype=torch.bool))
captured = {}


def capture(unary_logits, targets, training_candidate_ids, candidate_logits, target_positions, *args, **kwargs):
    captured["unary_logits"] = unary_logits[0].detach().clone()
    captured["target_ids"] = targets[0].argmax(-1)
    captured["training_candidate_ids"] = training_candidate_ids[0].clone()
    captured["target_positions"] = target_positions[0].clone()
    captured["candidate_logits"] = candidate_logits[0].detach().clone()
    return torch.zeros(()), {}


dflash2_core.compute_metrics = capture

for index, (name, fields) in enumerate(VARIANTS.items()):
    layer = Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "full_attention"], sliding_window=4, use_sliding_window=True,
    )  # fmt: skip
    layer._attn_implementation = "eager"  # the library's float-mask path (flex attention needs compilation)
    sample_from_anchor = fields.get("sample_from_anchor", False)
    config = DFlash2SpeculatorConfig(
        transformer_layer_config=layer,
        draft_vocab_size=96,
        block_size=BLOCK,
        aux_hidden_state_layer_ids=[1, 3, 5],
        mask_token_id=95,
        selector_rank=8,
        **fields,
        speculators_config=SpeculatorsConfig(
            algorithm="dflash2",
            proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=BLOCK - 1 + int(sample_from_anchor))],
            default_proposal_method="greedy",
            verifier=VerifierConfig(name_or_path="tiny-org/tiny-verifier", architectures=["Qwen3ForCausalLM"]),
        ),
    )
    model = SpeculatorModel.registered_model_class_from_config(config)(config).eval()
    gen = torch.Generator().manual_seed(index)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            p.copy_((1.0 if param_name.endswith("norm.weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=gen))
    folder = out / name
    model.save_pretrained(folder)
    (folder / "config.py").unlink(missing_ok=True)

    aux = torch.randn(1, LENGTH, 96, generator=gen)
    tokens = torch.randint(3, 95, (1, LENGTH), generator=gen)
    captured.clear()
    with torch.no_grad():
        model(
            hidden_states=aux,
            input_ids=tokens,
            loss_mask=torch.ones(1, LENGTH, dtype=torch.long),
            verifier_last_hidden_states=torch.randn(1, LENGTH, 32, generator=gen),
            document_ids=torch.zeros(1, LENGTH, dtype=torch.long),
            max_anchors=len(ANCHORS),
            loss_config=resolve_loss_config("kl_div", "eager"),  # the fused defaults need Triton
            tv_loss_fn=tv_loss,
        )
    save_file(
        {
            "aux": aux,
            "tokens": tokens,
            "anchors": anchors,
            "embed": model.embed_tokens.weight.detach().clone(),
            "head": model.lm_head.weight.detach().clone(),
            **captured,
        },
        str(folder / "golden.safetensors"),
    )
