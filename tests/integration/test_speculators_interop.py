"""Training from the `speculators` library's offline data (`data --from-speculators`).

The fixture `fixtures/speculators_prepared` is the real output of the library's `speculators prepare-data`
(0.9.0: `speculators prepare-data --model <word-level tokenizer of ids < 96> --data rows.jsonl --seq-length 64
--num-preprocessing-workers 1` on six pre-tokenized rows; Arrow rows `input_ids`, `loss_mask`, `seq_len`). The
`hs_{i}.safetensors` files are written here in the layout its `generate-offline-data` writes (vLLM's
`hidden_states` [seq, layers, hidden] in bfloat16 for ids [2, N//2, N-3, N], N pre-norm, and `token_ids`)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_verifier
from safetensors.torch import load_file, save_file

from speculators_hf.cli import main
from speculators_hf.training import load_blocks
from speculators_hf.training.data import DataError, read_speculators_prepared

pytest.importorskip("pyarrow", reason="reading the library's prepared dataset needs pyarrow")

FIXTURE = Path(__file__).parent / "fixtures" / "speculators_prepared"
LAYERS = 8  # the library's default ids [2, 4, 5, 8] are distinct
SEQ_LEN = 16


def library_states(verifier, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(vLLM's hidden states [seq, 4, H] of ids 2, 4, 5 and the pre-norm 8, transformers' post-norm id 8)."""
    captured = {}
    hook = verifier.model.norm.register_forward_pre_hook(lambda _, args: captured.setdefault("pre", args[0]))
    with torch.no_grad():
        out = verifier.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    hook.remove()
    states = [out.hidden_states[i][0] for i in (2, 4, 5)] + [captured["pre"][0]]
    return torch.stack(states, dim=1), out.last_hidden_state[0]


@pytest.fixture
def library_data(tmp_path):
    """The verifier folder and a copy of the prepared dataset with its hs files (row 3's missing, as when the
    library skipped a failed sample); returns (verifier, rows, post-norm last states of each row)."""
    verifier = make_verifier(num_hidden_layers=LAYERS)
    verifier.save_pretrained(tmp_path / "verifier")
    shutil.copytree(FIXTURE, tmp_path / "prep")
    rows = read_speculators_prepared(tmp_path / "prep")
    (tmp_path / "prep" / "hidden_states").mkdir()
    post = []
    for i, (ids, _) in enumerate(rows):
        states, last = library_states(verifier, ids)
        post.append(last)
        if i != 3:
            tensors = {"hidden_states": states.to(torch.bfloat16), "token_ids": torch.tensor(ids)}
            save_file(tensors, tmp_path / "prep" / "hidden_states" / f"hs_{i}.safetensors")
    return verifier, rows, post


def run_import(tmp_path: Path, *extra: str, output: str = "data") -> int:
    argv = ["data", "--verifier", str(tmp_path / "verifier"), "--from-speculators", str(tmp_path / "prep")]
    return main([*argv, "--output", str(tmp_path / output), "--seq-len", str(SEQ_LEN), *extra])


def import_error(tmp_path: Path, capsys, *extra: str, output: str = "data") -> str:
    """The one error line of a failing import."""
    capsys.readouterr()
    assert run_import(tmp_path, *extra, output=output) != 0
    return capsys.readouterr().err


def test_rows_of_the_library_prepared_dataset_are_read(tmp_path):
    rows = read_speculators_prepared(FIXTURE)
    assert [len(ids) for ids, _ in rows] == [17, 28, 22, 24, 26, 12]  # its seq_len column
    assert all(len(ids) == len(mask) and set(mask) == {0, 1} for ids, mask in rows)
    with pytest.raises(DataError, match=r"no state\.json"):
        read_speculators_prepared(tmp_path)


def test_import_gives_blocks_and_features_of_the_library_data_then_trains(tmp_path, library_data, capsys):
    verifier, rows, post = library_data
    assert run_import(tmp_path, "--cache-dtype", "float32") == 0
    assert "1 of 6 rows have no hidden-state file and are left out: [3]" in capsys.readouterr().out
    kept = [i for i in range(len(rows)) if i != 3]
    ids, mask = load_blocks(tmp_path / "data")
    flat_ids = [t for i in kept for t in rows[i][0]]
    flat_mask = [m for i in kept for m in rows[i][1]]
    n = len(flat_ids) // SEQ_LEN
    assert ids.shape == (n, SEQ_LEN) and ids.flatten().tolist() == flat_ids[: n * SEQ_LEN]
    assert mask.flatten().tolist() == flat_mask[: n * SEQ_LEN]
    info = json.loads((tmp_path / "data" / "data_info.json").read_text())
    assert info["speculators_rows"] == kept

    features = tmp_path / "data" / "features-2-4-5-8"
    shard = load_file(next(features.glob("shard-*.safetensors")))
    with torch.no_grad():
        whole = verifier.model(input_ids=torch.tensor([rows[0][0]]), output_hidden_states=True).hidden_states
    first = rows[0][0]
    # ids < N: the library's tensors as they are (bfloat16 values); id N: the pre-norm state through the final norm
    for i in (2, 4, 5):
        expected = whole[i][0, :SEQ_LEN].to(torch.bfloat16).float()
        assert torch.equal(shard[f"hidden.{i}"][0], expected), i
    torch.testing.assert_close(shard["hidden.8"][0], post[0][:SEQ_LEN], rtol=2e-2, atol=2e-2)
    assert not torch.allclose(shard["hidden.8"][0], shard["hidden.5"][0])
    # a block that spans rows 0 and 1
    spill = len(first) - SEQ_LEN
    expected_post = torch.cat([post[0][SEQ_LEN:], post[1][: SEQ_LEN - spill]])
    torch.testing.assert_close(shard["hidden.8"][1], expected_post, rtol=2e-2, atol=2e-2)

    # a rerun resumes (shards kept), and the features train a draft that never loads the decoder
    assert run_import(tmp_path, "--cache-dtype", "float32") == 0
    argv = ["train", "--verifier", str(tmp_path / "verifier"), "--data", str(tmp_path / "data"), "--steps", "2"]
    argv += ["--features", str(features), "--output", str(tmp_path / "out"), "--batch-size", "2"]
    assert main([*argv, "--eval-blocks", "0", "--draft-vocab-size", "16"]) == 0
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()

    # hs_3 generated later: the import covers other rows now, and refuses to mix them with the old shards
    states, _ = library_states(verifier, rows[3][0])
    save_file(
        {"hidden_states": states.to(torch.bfloat16), "token_ids": torch.tensor(rows[3][0])},
        tmp_path / "prep" / "hidden_states" / "hs_3.safetensors",
    )
    assert re.search("holds an import of other rows", import_error(tmp_path, capsys))


def test_faults_are_named_and_nothing_is_written(tmp_path, library_data, capsys):
    hs = tmp_path / "prep" / "hidden_states"
    good = load_file(hs / "hs_1.safetensors")

    save_file({**good, "token_ids": good["token_ids"].roll(1)}, hs / "hs_1.safetensors")
    assert re.search(r"hs_1\.safetensors: its token_ids .* are not those of row 1", import_error(tmp_path, capsys))
    assert not (tmp_path / "data").exists()

    (hs / "hs_1.safetensors").write_bytes(b"\x00" * 40)
    assert re.search(r"hs_1\.safetensors is damaged .* delete it and rerun", import_error(tmp_path, capsys))

    save_file({**good, "hidden_states": good["hidden_states"][:, :3].contiguous()}, hs / "hs_1.safetensors")
    assert re.search("holds 3 layers, the files before it 4", import_error(tmp_path, capsys))
    for i in (0, 2, 4, 5):
        tensors = load_file(hs / f"hs_{i}.safetensors")
        save_file(
            {**tensors, "hidden_states": tensors["hidden_states"][:, :3].contiguous()}, hs / f"hs_{i}.safetensors"
        )
    assert re.search("hold 3 layers, not the library's default 4: pass their ids", import_error(tmp_path, capsys))
    assert re.search(r"--layers \[2, 4\]: the files hold 3 layers", import_error(tmp_path, capsys, "--layers", "2,4"))
    assert run_import(tmp_path, "--layers", "2,4,5") == 0
    assert (tmp_path / "data" / "features-2-4-5").is_dir()

    broken = load_file(hs / "hs_0.safetensors")
    broken["hidden_states"][3, 1, 0] = float("nan")
    save_file(broken, hs / "hs_0.safetensors")
    assert re.search(
        r"hs_0\.safetensors holds non-finite hidden states",
        import_error(tmp_path, capsys, "--layers", "2,4,5", output="again"),
    )
    assert not list((tmp_path / "again").glob("features-*/shard-*"))
