"""Every `speculators-hf` subcommand answers bad input with ONE line on stderr that names the problem (and the
fix), exit code 2 for bad arguments and 1 for a failure while running, never a traceback; `--debug` shows the
traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import make_verifier

from speculators_hf.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, list[str]]:
    """Exit code, stdout and the lines printed on stderr."""
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


@pytest.fixture
def folders(tmp_path):
    """A file, a missing path, an empty folder and a saved verifier without a tokenizer."""
    afile = tmp_path / "a_file.txt"
    afile.write_text("not a folder\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    verifier = tmp_path / "verifier"
    make_verifier().save_pretrained(verifier)
    return {"file": str(afile), "missing": str(tmp_path / "missing"), "empty": str(empty), "verifier": str(verifier)}


CASES = {
    # name: (argv with {placeholders}, exit code, words the one line must contain)
    "demo: missing draft": (["demo", "--draft", "{missing}"], 2, ["--draft", "no such folder"]),
    "demo: draft is a file": (["demo", "--draft", "{file}"], 2, ["is a file"]),
    "demo: zero tokens": (["demo", "--max-new-tokens", "0"], 2, ["--max-new-tokens", ">= 1"]),
    "demo: not a draft": (["demo", "--draft", "{empty}"], 1, ["config.json"]),
    "bench: bad k": (["bench", "--k", "3,x"], 2, ["--k", "3,x"]),
    "bench: bad auto k": (["bench", "--k", "3,auto:x"], 2, ["--k", "3,auto:x", "auto:<max>"]),
    "bench: zero k": (["bench", "--k", "0,auto"], 2, ["--k", ">= 1"]),
    "bench: bad tree": (["bench", "--tree", "bushy"], 2, ["--tree", "bushy"]),
    "bench: out is a file": (["bench", "--out", "{file}"], 2, ["--out", "is a file"]),
    "bench: missing prompts": (["bench", "--prompts", "{missing}"], 2, ["--prompts", "no such file"]),
    "bench: missing verifier": (["bench", "--verifier", "{missing}"], 2, ["--verifier", "no such folder"]),
    "generate: bad tree": (["generate", "--tree", "dynamic:x"], 2, ["--tree"]),
    "generate: negative top-k": (["generate", "--top-k", "-1"], 2, ["--top-k"]),
    "generate: out-of-range top-p": (["generate", "--do-sample", "--top-p", "2"], 1, ["top_p=2.0", "(0, 1]"]),
    "inspect: missing": (["inspect", "{missing}"], 2, ["no such folder"]),
    "inspect: a file": (["inspect", "{file}"], 2, ["is a file"]),
    "inspect: not a draft": (["inspect", "{empty}"], 1, ["config.json"]),
    "inspect: a verifier, not a draft": (["inspect", "{verifier}"], 1, ["speculators_model_type"]),
    "push: missing": (["push", "{missing}", "org/name"], 2, ["no such folder"]),
    "push: a file": (["push", "{file}", "org/name"], 2, ["is a file"]),
    "push: not a draft": (["push", "{empty}", "org/name"], 1, ["config.json"]),
    "convert: no SRC": (["convert"], 2, ["SRC and DST are required"]),
    "convert: text for a number": (["convert", "{empty}", "{missing}", "--set", "block_size=abc"], 2,
                                   ["--set", "block_size=abc", "block_size", "valid integer", "'abc'"]),
    "convert: bad draft length": (["convert", "{empty}", "{missing}", "--set", "speculative_tokens=0"], 2,
                                  ["speculative_tokens", "greater than 0"]),
    "convert: missing source": (["convert", "{missing}", "{empty}"], 1, ["neither an existing folder"]),
    "convert: not a draft": (["convert", "{verifier}", "{missing}"], 1, ["convert: error:"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_on_stderr(case, folders, capsys):
    argv, expected_code, words = CASES[case]
    code, _, lines = run_cli([a.format(**folders) for a in argv], capsys)
    assert code == expected_code, (code, lines)
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert "Traceback" not in lines[0] and "error:" in lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def test_debug_shows_the_traceback(folders):
    argv = [sys.executable, "-m", "speculators_hf.cli", "inspect", folders["empty"]]
    quiet = subprocess.run(argv, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    loud = subprocess.run([*argv, "--debug"], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr and "--debug" in quiet.stderr
    assert loud.returncode == 1 and "Traceback" in loud.stderr


def test_results_of_a_good_run_still_go_to_stdout(capsys, tmp_path):
    from speculators_hf import Eagle3Speculator

    Eagle3Speculator.from_verifier(make_verifier(), draft_vocab_size=64).save_pretrained(tmp_path / "d")
    capsys.readouterr()
    code, out, lines = run_cli(["inspect", str(tmp_path / "d"), "--json"], capsys)
    assert code == 0 and not any("error" in line for line in lines) and json.loads(out)["family"] == "eagle3"


@pytest.mark.parametrize("case", ["convert: text for a number", "convert: missing source", "convert: not a draft"])
def test_convert_errors_leave_stdout_empty(case, folders):
    """convert, like every command, writes its error (and its notices) to stderr: nothing on stdout (a failure
    after its first notices: tests/unit/test_convert.py::test_cli)."""
    argv, expected_code, _ = CASES[case]
    args = [sys.executable, "-m", "speculators_hf.cli", *(a.format(**folders) for a in argv)]
    done = subprocess.run(args, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert done.returncode == expected_code and done.stdout == "", (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("speculators-hf convert: error: ") and "Traceback" not in done.stderr
