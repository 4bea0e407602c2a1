"""Regenerate this folder's golden data with the `speculators` library itself (0.9.0 from PyPI).

Run in a separate venv, never the project's:

    python -m venv /tmp/specvenv && /tmp/specvenv/bin/pip install torch==2.13.0 speculators==0.9.0
    /tmp/specvenv/bin/pip uninstall -y torchvision torchaudio   # "operator torchvision::nms does not exist"
    /tmp/specvenv/bin/python make_golden.py OUT_DIR

Writes OUT_DIR/config.json + model.safetensors exactly as speculators' `save_pretrained` does (its
config.py remote-code copy removed) and OUT_DIR/golden.safetensors: 4 one-position inputs (aux states
[1, 1, 3H] and a token) and the draft-vocabulary logits that speculators' own Eagle3DraftModel.forward
computes for them (ttt_steps=1; captured at lm_head).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from speculators import SpeculatorModel
from speculators.config import SpeculatorsConfig, VerifierConfig
from speculators.models.eagle3 import Eagle3SpeculatorConfig
from speculators.proposals.greedy import GreedyTokenProposalConfig
from transformers import LlamaConfig

out = Path(sys.argv[1])
layer = LlamaConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=500000.0,
)  # fmt: skip
config = Eagle3SpeculatorConfig(
    transformer_layer_config=layer,
    draft_vocab_size=64,
    norm_before_residual=True,
    eagle_aux_hidden_state_layer_ids=[1, 4, 6],
    speculators_config=SpeculatorsConfig(
        algorithm="eagle3",
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

captured = []
model.lm_head.register_forward_hook(lambda module, args, output: captured.append(output.detach().clone()))
aux = torch.randn(4, 1, 96, generator=gen)
tokens = torch.randint(3, 96, (4,), generator=gen)
for k in range(4):
    with torch.no_grad():
        model(
            hidden_states=aux[k : k + 1],
            input_ids=tokens[k : k + 1, None],
            document_ids=torch.zeros(1, 1, dtype=torch.long),
            ttt_steps=1,
        )
save_file(
    {"aux": aux, "tokens": tokens, "draft_logits": torch.cat(captured).reshape(4, 64)}, str(out / "golden.safetensors")
)
