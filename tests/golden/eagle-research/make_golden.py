"""Regenerate this folder's golden data with the ORIGINAL research EAGLE-1/2 code (SafeAILab/EAGLE).

Run in a scratch venv, never the project's (it needs torch + transformers only), with a checkout of
SafeAILab/EAGLE whose eagle/model/{cnets1,configs,utils_c,choices,utils}.py are importable as the
package `eagle_ref` (copy them into a folder eagle_ref/ with an empty __init__.py):

    PYTHONPATH=/path/containing/eagle_ref python make_golden.py OUT_DIR

Writes OUT_DIR/config.json + pytorch_model.bin (a research-format EAGLE-1 draft as the Vicuna drafts
are published: config without `bias` (so fc has a bias) and without rope_theta, embed_tokens kept,
float32 tensors under a config that says float16) and OUT_DIR/golden.safetensors: a 6-position input
(verifier features [1, 6, H] and tokens [1, 6]) and the draft features that `cnets1.Model.forward`
computes for it (fc over cat(embedding, feature), causal attention, RoPE base 10000, no input norm).
"""

import json
import sys
from pathlib import Path

import torch
from eagle_ref.cnets1 import Model
from eagle_ref.configs import EConfig
from safetensors.torch import save_file

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
H, V = 32, 96
config = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": H, "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 2048,
    "model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
    "pad_token_id": 0, "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.28.1", "use_cache": True, "vocab_size": V,
}  # fmt: skip
(out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
econfig = EConfig.from_pretrained(out)
# transformers >= 5 standardises rope_scaling; the research code was written for 4.x, where a config.json
# without rope_scaling gives None and no rope_theta attribute (cnets1.LlamaRotaryEmbedding keeps base 10000).
econfig.rope_scaling = None
assert not hasattr(econfig, "rope_theta")
model = Model(econfig, load_emb=False, bias=True).eval()  # ea_model.py: bias = config.get("bias", True)
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.named_parameters():
        p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=gen))
state = {k: v.contiguous() for k, v in model.state_dict().items()}
torch.save(state, out / "pytorch_model.bin")

hidden_states = torch.randn(1, 6, H, generator=gen)
input_ids = torch.randint(3, V, (1, 6), generator=gen)
with torch.no_grad():
    features = model(hidden_states, input_ids=input_ids)  # the predicted next features (no norm, no head)
save_file(
    {"hidden_states": hidden_states, "input_ids": input_ids, "draft_features": features},
    str(out / "golden.safetensors"),
)
print("state", sorted(state), "golden features", tuple(features.shape), features[0, 0, :4])
