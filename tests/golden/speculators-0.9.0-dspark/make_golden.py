"""Regenerate this folder's golden data with the `speculators` library itself (0.9.0 from PyPI).

Run in a separate venv, never the project's (torch first, so that pip keeps the CPU build; torchvision and
torchaudio, which pull another torch, are not needed):

    python3 -m venv /work/venvs/speculators
    /work/venvs/speculators/bin/pip install torch==2.13.0 && /work/venvs/speculators/bin/pip install speculators==0.9.0
    HF_HUB_OFFLINE=1 /work/venvs/speculators/bin/python make_golden.py OUT_DIR

For each variant below, writes OUT_DIR/<variant>/config.json + model.safetensors exactly as speculators'
`save_pretrained` does (its config.py remote-code copy removed) and OUT_DIR/<variant>/golden.safetensors: a
12-token sequence (aux states [1, 12, 3H], its tokens), the verifier embedding the draft borrows (`embed`), four
anchors, and what speculators' own DSparkDraftModel.forward computes for the blocks at those anchors (its random
anchor choice replaced by these, eager attention, captured where it calls compute_metrics): the draft-vocabulary
logits with the Markov bias (`draft_logits` [4 * block_size, Vd]) and, with the confidence head, its logits
(`confidence_logits` [4 * block_size]). One Qwen3 layer, a reduced draft vocabulary (64 of 96), Markov rank 8.
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
from speculators.models.dspark import DSparkSpeculatorConfig
from speculators.models.dspark import core as dspark_core
from speculators.proposals.greedy import GreedyTokenProposalConfig
from transformers import Qwen3Config

out = Path(sys.argv[1])
LENGTH, BLOCK = 12, 4
ANCHORS = [0, 3, 5, 8]
VARIANTS = {  # name -> DSpark fields
    "vanilla": {"markov_head_type": "vanilla", "enable_confidence_head": False},
    "gated": {"markov_head_type": "gated", "enable_confidence_head": False},
    "rnn": {"markov_head_type": "rnn", "enable_confidence_head": False},
    # the library's defaults: vanilla head, confidence head reading [hidden; W1 row], slot 0 predicting
    "confidence": {"markov_head_type": "vanilla"},
    # the anchor slot predicting nothing (its rnn step still runs) and a confidence head on the hidden state only
    "rnn-bonus-anchor": {"markov_head_type": "rnn", "sample_from_anchor": False, "confidence_head_with_markov": False},
}

anchors = torch.tensor(ANCHORS)
dflash_core.select_anchors = lambda loss_mask, num_anchors, block_size: (anchors, torch.ones(4, dtype=torch.bool))
captured = {}


def capture(logits, targets, confidence_logits, *args, **kwargs):
    captured["draft_logits"] = logits[0].detach().clone()
    if confidence_logits is not None:
        captured["confidence_logits"] = confidence_logits[0].detach().clone()
    return torch.zeros(()), {}


dspark_core.compute_metrics = capture

for index, (name, fields) in enumerate(VARIANTS.items()):
    layer = Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-6,
    )  # fmt: skip
    layer._attn_implementation = "eager"  # the library's float-mask path (flex attention needs compilation)
    sample_from_anchor = fields.get("sample_from_anchor", True)
    config = DSparkSpeculatorConfig(
        transformer_layer_config=layer,
        draft_vocab_size=64,
        block_size=BLOCK,
        aux_hidden_state_layer_ids=[1, 3, 5],
        mask_token_id=95,
        markov_rank=8,
        **fields,
        speculators_config=SpeculatorsConfig(
            algorithm="dspark",
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
        target = torch.randperm(96, generator=gen)[:64].sort().values
        model.d2t.copy_(target - torch.arange(64))
        model.t2d.zero_()
        model.t2d[target] = True
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
            **captured,
        },
        str(folder / "golden.safetensors"),
    )
