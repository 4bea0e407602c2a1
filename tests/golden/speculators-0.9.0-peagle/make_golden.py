"""Regenerate this folder's golden data with the `speculators` library itself (0.9.0 from PyPI).

Run in a separate venv, never the project's (as ../speculators-0.9.0-eagle3/make_golden.py says):

    /tmp/specvenv/bin/python make_golden.py OUT_DIR

Writes OUT_DIR/config.json + model.safetensors exactly as speculators' `save_pretrained` does (its
config.py remote-code copy removed) and OUT_DIR/golden.safetensors: a 6-token sequence (aux states
[1, 6, 3H] and the token beside each), and the draft-vocabulary logits that speculators' own
PEagleDraftModel.forward computes for every (anchor, depth) entry with depths 0..2 (its COD sampling
replaced by the full set of anchors, captured at lm_head).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from speculators import SpeculatorModel
from speculators.config import SpeculatorsConfig, VerifierConfig
from speculators.losses.utils import resolve_loss_config
from speculators.models.peagle import PEagleSpeculatorConfig
from speculators.models.peagle import core as peagle_core
from speculators.proposals.greedy import GreedyTokenProposalConfig
from transformers import LlamaConfig

out = Path(sys.argv[1])
LENGTH, DEPTHS = 6, 3
layer = LlamaConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=500000.0,
)  # fmt: skip
config = PEagleSpeculatorConfig(
    transformer_layer_config=layer,
    draft_vocab_size=64,
    norm_before_residual=True,
    eagle_aux_hidden_state_layer_ids=[1, 4, 6],
    mask_token_id=95,
    speculators_config=SpeculatorsConfig(
        algorithm="peagle",
        proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=3)],
        default_proposal_method="greedy",
        verifier=VerifierConfig(name_or_path="tiny-org/tiny-verifier", architectures=["LlamaForCausalLM"]),
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

# every anchor at every depth (the library samples a random subset of them per depth)
anchor = torch.cat([torch.arange(LENGTH - d) for d in range(DEPTHS)])
depth = torch.cat([torch.full((LENGTH - d,), d) for d in range(DEPTHS)])
peagle_core.generate_cod_sample_indices = lambda **kwargs: (anchor, depth)

captured = []
model.lm_head.register_forward_hook(lambda module, args, output: captured.append(output.detach().clone()))
aux = torch.randn(1, LENGTH, 96, generator=gen)
tokens = torch.randint(3, 95, (1, LENGTH), generator=gen)
with torch.no_grad():
    model(
        hidden_states=aux,
        input_ids=tokens,
        document_ids=torch.zeros(1, LENGTH, dtype=torch.long),
        verifier_last_hidden_states=torch.randn(1, LENGTH, 32, generator=gen),
        num_depths=DEPTHS,
        loss_config=resolve_loss_config("kl_div", "eager"),  # the fused default needs Triton
    )
save_file(
    {"aux": aux, "tokens": tokens, "anchor": anchor, "depth": depth, "draft_logits": captured[0][0]},
    str(out / "golden.safetensors"),
)
