"""Hostile checkpoint files on load and convert: an index naming files outside the folder, a tiny file whose
config claims a huge model (refused before anything is allocated: checked in a subprocess under an
address-space limit), values `convert` refused but loading took (d2t out of range, NaN/inf, integer or bool
tensors where floats belong, broken transformer_layer_config values), and unbounded config counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_verifier, rewrite_weights
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import speculators_hf as sh
from speculators_hf.config import SpeculatorConfigError
from speculators_hf.convert import ConversionError, convert

INDEX = "model.safetensors.index.json"


def eagle3_draft(seed: int = 0) -> sh.Eagle3Speculator:
    torch.manual_seed(seed)
    return sh.Eagle3Speculator.from_verifier(make_verifier(), draft_vocab_size=64)


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


# --------------------------------------------------------------------------------------------------
# files outside the folder
# --------------------------------------------------------------------------------------------------
def sharded_draft_with_a_shard_outside(tmp_path: Path, how: str) -> tuple[Path, Path]:
    """A sharded draft whose first shard lies in a sibling folder, reached by `how`: a `..` entry of the
    index, an absolute path in the index, or a symlink in the folder. Returns (draft folder, outside file)."""
    folder, outside = tmp_path / "draft", tmp_path / "other"
    eagle3_draft().save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / INDEX).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside.mkdir()
    (folder / shard).rename(outside / shard)
    if how == "symlink":
        (folder / shard).symlink_to(outside / shard)
        return folder, outside / shard
    entry = f"../other/{shard}" if how == "dotdot" else str(outside / shard)
    index["weight_map"] = {k: entry if v == shard else v for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))
    return folder, outside / shard


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_convert_never_reads_a_shard_outside_the_source_folder(tmp_path, how):
    folder, outside = sharded_draft_with_a_shard_outside(tmp_path, how)
    with pytest.raises(ConversionError, match="outside the checkpoint folder") as err:
        convert(folder, tmp_path / "out")
    assert outside.name in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_load_never_reads_a_shard_outside_the_folder(tmp_path, how):
    folder, outside = sharded_draft_with_a_shard_outside(tmp_path, how)
    with pytest.raises(sh.SpeculatorLoadError, match="outside the checkpoint folder") as err:
        AutoModelForCausalLM.from_pretrained(folder)
    assert outside.name in str(err.value)


def test_a_sharded_draft_inside_its_folder_still_loads_and_converts(tmp_path):
    """The checks above refuse only what leaves the folder."""
    draft = eagle3_draft()
    draft.save_pretrained(tmp_path / "draft", max_shard_size="20KB")
    assert len(json.loads((tmp_path / "draft" / INDEX).read_text())["weight_map"]) > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "draft")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in draft.state_dict().items())
    convert(tmp_path / "draft", tmp_path / "out")
    assert sh.load_draft(tmp_path / "out").config.draft_vocab_size == 64


def test_an_lm_head_tied_to_its_embedding_is_saved_once_and_still_loads(tmp_path):
    """The tensors a config implies are learned with weights tied as loading ties them: a tied tensor stored
    once is not missing."""
    lm = make_verifier(seed=1, tie_word_embeddings=True)
    sh.IndependentSpeculator.from_model(lm, make_verifier()).save_pretrained(tmp_path / "draft")
    loaded = sh.load_draft(tmp_path / "draft")
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.lm_head.weight, lm.lm_head.weight)


# --------------------------------------------------------------------------------------------------
# a tiny file claiming a huge model: refused before any allocation
# --------------------------------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys, time
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from speculators_hf.convert import convert

    def vm_size():
        status = open("/proc/self/status").read()
        return int(status.split("VmSize:")[1].split()[0]) * 1024

    # at most 2 GiB more address space than the imports took: a model allocated from the claims fails at once
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + (2 << 30), resource.RLIM_INFINITY))

    def too_slow(*_):
        raise TimeoutError("still running after 60 s")

    signal.signal(signal.SIGALRM, too_slow)
    results = []
    for case in json.loads(sys.argv[1]):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        signal.alarm(60)
        try:
            if case["op"] == "load":
                AutoModelForCausalLM.from_pretrained(case["src"])
            else:
                convert(case["src"], case["dst"])
            error, message = None, ""
        except BaseException as err:
            error, message = type(err).__name__, str(err)[:3000]
        finally:
            signal.alarm(0)
        results.append({
            **case,
            "seconds": time.perf_counter() - start,
            "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024,
            "error": error,
            "message": message,
        })
    print("RESULTS" + json.dumps(results))
    """
)


def tiny_medusa(folder: Path) -> Path:
    """A saved Medusa draft of 2 heads over a verifier of hidden size 32 (about 30 KB)."""
    sh.MedusaSpeculator.from_verifier(make_verifier(), medusa_num_heads=2).save_pretrained(folder)
    return folder


def research_medusa(folder: Path, layers: int) -> Path:
    """A Medusa-1 source (FasterDecoding layout) of one head and ONE layer of hidden size 8, whose config says
    `layers` layers per head (the lm_head key uses that count, as the original code names it)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"medusa_num_heads": 1, "medusa_num_layers": layers, "base_model_name_or_path": "org/verifier"})
    )
    tensors = {"0.0.linear.weight": torch.zeros(8, 8), "0.0.linear.bias": torch.zeros(8)}
    tensors[f"0.{layers}.weight"] = torch.zeros(16, 8)
    save_file(tensors, str(folder / "medusa_lm_head.safetensors"))
    return folder


def test_tiny_files_claiming_huge_models_fail_fast_without_allocating(tmp_path):
    huge_layers = research_medusa(tmp_path / "medusa1-1e8-layers", 10**8)
    ours_layers = tiny_medusa(tmp_path / "medusa-1e8-layers")
    edit_config(ours_layers, lambda c: c.update(medusa_num_layers=10**8))
    ours_sizes = tiny_medusa(tmp_path / "medusa-huge-within-bounds")  # 64 heads x 64 layers of width 65536
    edit_config(ours_sizes, lambda c: c.update(medusa_num_heads=64, medusa_num_layers=64, hidden_size=1 << 16))
    lm = tmp_path / "independent-1e6-layers"
    verifier = make_verifier()
    sh.IndependentSpeculator.from_model(make_verifier(seed=1), verifier).save_pretrained(lm)
    edit_config(lm, lambda c: c["draft_model_config"].update(num_hidden_layers=10**6))
    wide = tmp_path / "eagle3-wide"
    eagle3_draft().save_pretrained(wide)
    edit_config(wide, lambda c: c["transformer_layer_config"].update(hidden_size=1 << 16, intermediate_size=1 << 18))
    sizes = {
        p.name: sum(f.stat().st_size for f in p.iterdir() if f.suffix == ".safetensors") for p in tmp_path.iterdir()
    }
    assert max(sizes.values()) < 200_000, sizes  # every weight file is tiny
    cases = [
        {"op": "convert", "src": str(huge_layers), "dst": str(tmp_path / "out1"), "want": "ConversionError"},
        {"op": "load", "src": str(ours_layers), "want": "SpeculatorConfigError"},
        {"op": "convert", "src": str(ours_layers), "dst": str(tmp_path / "out2"), "want": "ConversionError"},
        {"op": "load", "src": str(ours_sizes), "want": "SpeculatorLoadError"},
        {"op": "convert", "src": str(ours_sizes), "dst": str(tmp_path / "out3"), "want": "ConversionError"},
        {"op": "load", "src": str(lm), "want": "SpeculatorConfigError"},
        {"op": "load", "src": str(wide), "want": "SpeculatorLoadError"},
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0 and "RESULTS" in proc.stdout, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    for result in results:
        where = f"{result['op']} {Path(result['src']).name}: {result['error']} {result['message'][:300]}"
        assert result["error"] == result["want"], where
        assert result["seconds"] < 5, (where, result["seconds"])
        assert result["rss_growth_mb"] < 200, (where, result["rss_growth_mb"])
    by_case = {(r["op"], Path(r["src"]).name): r["message"] for r in results}
    assert "at most 64" in by_case[("convert", "medusa1-1e8-layers")]
    assert "medusa_num_layers" in by_case[("load", "medusa-1e8-layers")]
    assert "less than or equal to 64" in by_case[("load", "medusa-1e8-layers")]
    assert (
        "blocks.0.layers.0.weight: checkpoint has shape (32, 32), config expects (65536, 65536)"
        in (by_case[("load", "medusa-huge-within-bounds")])
    )
    assert "draft_model_config.num_hidden_layers" in by_case[("load", "independent-1e6-layers")]
    assert "fc.weight: checkpoint has shape" in by_case[("load", "eagle3-wide")]


def test_config_counts_and_draft_length_are_bounded(tmp_path):
    folder = tiny_medusa(tmp_path / "medusa")
    edit_config(folder, lambda c: c["speculators_config"]["proposal_methods"][0].update(speculative_tokens=1600))
    with pytest.raises(SpeculatorConfigError, match=r"speculative_tokens: Input should be less than or equal to 64 "
                       r"\(got 1600\)"):  # fmt: skip
        sh.load_draft(folder)
    from speculators_hf.config import MAX_SPECULATIVE_TOKENS

    assert MAX_SPECULATIVE_TOKENS == 64
    draft = eagle3_draft()
    with pytest.raises(SpeculatorConfigError, match="speculative_tokens"):
        draft.config.speculative_tokens = MAX_SPECULATIVE_TOKENS + 1
    draft.config.speculative_tokens = MAX_SPECULATIVE_TOKENS  # the bound itself is allowed
    for field, value in [("medusa_num_heads", 65), ("medusa_num_layers", 1e8), ("hidden_size", 1 << 19)]:
        with pytest.raises(SpeculatorConfigError, match=field):
            sh.MedusaSpeculatorConfig(**{field: value})
    with pytest.raises(SpeculatorConfigError, match="n_predict"):
        sh.MLPSpeculatorConfig(n_predict=10**8, emb_dim=8, vocab_size=16)


# --------------------------------------------------------------------------------------------------
# values: what convert refuses, loading refuses too
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_eagle3(tmp_path):
    eagle3_draft().save_pretrained(tmp_path / "draft")
    return tmp_path / "draft"


def test_d2t_out_of_the_verifier_vocabulary_is_refused_at_load(saved_eagle3):
    def edit(weights):
        weights["d2t"][5] = 1000  # draft id 5 -> verifier id 1005, the verifier has 96

    rewrite_weights(saved_eagle3, edit)
    with pytest.raises(
        sh.SpeculatorLoadError, match=r"d2t: maps 1 draft ids outside the verifier vocabulary \[0, 96\)"
    ):
        AutoModelForCausalLM.from_pretrained(saved_eagle3)


def test_d2t_mapping_two_draft_ids_to_one_verifier_id_is_refused(saved_eagle3):
    rewrite_weights(saved_eagle3, lambda w: w["d2t"].__setitem__(1, -1))  # draft ids 0 and 1 -> verifier id 0
    with pytest.raises(sh.SpeculatorLoadError, match="d2t: maps 1 draft ids to a verifier id another draft id"):
        sh.load_draft(saved_eagle3)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_load_and_convert(saved_eagle3, tmp_path, value):
    rewrite_weights(saved_eagle3, lambda w: w["layers.0.mlp.up_proj.weight"].__setitem__((3, 4), value))
    with pytest.raises(sh.SpeculatorLoadError, match=r"layers\.0\.mlp\.up_proj\.weight: holds NaN or inf values"):
        AutoModelForCausalLM.from_pretrained(saved_eagle3)
    with pytest.raises(ConversionError, match=r"layers\.0\.mlp\.up_proj\.weight"):
        convert(saved_eagle3, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "dtype", "message"),
    [
        ("fc.weight", torch.int32, r"fc\.weight: checkpoint has dtype I32 \(integer\), config expects a float tensor"),
        ("norm.weight", torch.bool, r"norm\.weight: checkpoint has dtype BOOL \(bool\), config expects a float tensor"),
        ("d2t", torch.float32, r"d2t: checkpoint has dtype F32 \(float\), config expects an integer tensor"),
    ],
)
def test_a_tensor_of_another_dtype_class_is_refused_not_cast(saved_eagle3, name, dtype, message):
    rewrite_weights(saved_eagle3, lambda w: w.__setitem__(name, w[name].to(dtype)))
    with pytest.raises(sh.SpeculatorLoadError, match=message):
        AutoModelForCausalLM.from_pretrained(saved_eagle3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_attention_heads": 0}, r"transformer_layer_config\.num_attention_heads: must be an integer in 1\.\.1024 "
         r"\(got 0\)"),
        ({"hidden_size": -8}, r"transformer_layer_config\.hidden_size: must be an integer in 1\.\.262144 \(got -8\)"),
        ({"hidden_act": "nope"}, r"transformer_layer_config\.hidden_act: unknown activation 'nope'; transformers knows"),
        ({"head_dim": 0}, r"transformer_layer_config\.head_dim: must be an integer in 1\.\.262144 \(got 0\)"),
        ({"num_key_value_heads": 3}, r"transformer_layer_config\.num_attention_heads: 4 query heads cannot be shared "
         r"evenly by 3 key-value heads"),
        ({"hidden_size": 30, "head_dim": None}, r"transformer_layer_config\.hidden_size: 30 is not a multiple of "
         r"num_attention_heads \(4\)"),
        ({"intermediate_size": 64.5}, r"transformer_layer_config\.intermediate_size: must be an integer"),
        ({"rms_norm_eps": -1e-6}, r"transformer_layer_config\.rms_norm_eps: must be a positive number"),
        ({"model_type": "no-such-model"}, r"transformer_layer_config\.model_type 'no-such-model' is not a model type"),
    ],
)  # fmt: skip
def test_bad_transformer_layer_config_values_name_the_field(saved_eagle3, changes, message):
    edit_config(saved_eagle3, lambda c: c["transformer_layer_config"].update(changes))
    with pytest.raises(SpeculatorConfigError, match=message):
        AutoModelForCausalLM.from_pretrained(saved_eagle3)
    with pytest.raises(SpeculatorConfigError, match=message):
        sh.load_draft(saved_eagle3)
