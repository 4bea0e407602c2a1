"""Regenerate this folder's golden data with the ORIGINAL research EAGLE-3 code (SafeAILab/EAGLE).

Run in a scratch venv, never the project's (it needs torch + transformers only), with a checkout of
SafeAILab/EAGLE whose eagle/model/{cnets,configs,utils_c,choices,utils}.py are importable as the
package `eagle_ref` (copy them into a folder eagle_ref/ with an empty __init__.py):

    PYTHONPATH=/path/containing/eagle_ref python make_golden.py OUT_DIR

Writes OUT_DIR/config.json + model.safetensors (a research-format draft: midlayer.*, fc, norm,
lm_head, d2t, t2d; no embed_tokens; config as eagle/traineagle3/config.json, no rope_theta) and
OUT_DIR/golden.safetensors: the verifier embedding the research code loads, a 6-position input
(aux states [1, 6, 3H] and tokens [1, 6]) and the draft-vocabulary logits lm_head(norm(h)) that
`cnets.Model.forward` computes for it (causal attention, RoPE base 10000).
"""

import json
import sys
from pathlib import Path

import torch
from eagle_ref.cnets import Model
from eagle_ref.configs import EConfig
from safetensors.torch import save_file

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
H, V, VD = 32, 96, 64
config = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": H, "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 2048,
    "model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
    "pad_token_id": 0, "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.28.1", "use_cache": True, "vocab_size": V, "draft_vocab_size": VD,
}  # fmt: skip
(out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
econfig = EConfig.from_pretrained(out)
# transformers >= 5 standardises rope_scaling into {"rope_type": "default", ...}; the research code was
# written for 4.x, where a config.json without rope_scaling gives None (and no rope_theta attribute,
# so cnets.LlamaRotaryEmbedding keeps its base of 10000). Restore the 4.x view:
econfig.rope_scaling = None
assert not hasattr(econfig, "rope_theta")
model = Model(econfig, load_emb=False).eval()
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.named_parameters():
        p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=gen))
    target = torch.randperm(V, generator=gen)[:VD].sort().values
    model.d2t.copy_(target - torch.arange(VD))
    model.t2d.zero_()
    model.t2d[target] = True
state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("embed_tokens")}
save_file(state, str(out / "model.safetensors"))

aux = torch.randn(1, 6, 3 * H, generator=gen)
input_ids = torch.randint(3, V, (1, 6), generator=gen)
with torch.no_grad():
    hidden = model(aux, input_ids=input_ids)  # the draft layer's output (fed back un-normed)
    logits = model.lm_head(model.norm(hidden))
save_file(
    {"verifier_embedding": model.embed_tokens.weight.detach().clone(), "aux": aux, "input_ids": input_ids,
     "draft_logits": logits},
    str(out / "golden.safetensors"),
)  # fmt: skip
print("golden logits", tuple(logits.shape), logits[0, 0, :4])
