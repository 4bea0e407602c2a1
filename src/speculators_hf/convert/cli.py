"""`speculators-hf convert SRC DST [--from auto|FORMAT] [--to ours|speculators|vllm|sglang] [--verifier ID_OR_PATH]
[--verifier-id ORG/NAME] [--dtype D] [--repo-id ORG/NAME]`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..arguments import config_override


def cmd_convert(args: argparse.Namespace) -> int:
    """Notices (what was detected, dropped, written; warnings) on stderr, as `train`'s: stdout holds only the
    `--list-known` table. An error raises, for `cli.main` to print as every command's: one line on stderr, exit 1
    (bad arguments: exit 2, from argparse)."""
    from . import convert, known_checkpoints

    if args.list_known:
        for entry in known_checkpoints():
            print(f"{entry['repo']:70s} {entry['format']:15s} {entry['status']}")
        return 0
    if args.src is None or args.dst is None:
        args.usage_error("SRC and DST are required (or --list-known)")
    convert(
        args.src,
        args.dst,
        from_format=args.from_format,
        verifier=args.verifier,
        to=args.to,
        overrides=dict(args.set or []),
        overwrite=args.overwrite,
        revision=args.revision,
        cache_dir=args.cache_dir,
        verifier_id=args.verifier_id,
        dtype=args.dtype,
        repo_id=args.repo_id,
        log=_say,
    )
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_parsers(sub: Any) -> None:
    from .formats import all_export_targets, all_specs

    formats = sorted(name for name, spec in all_specs().items() if spec.status == "supported")
    planned = sorted(name for name, spec in all_specs().items() if spec.status == "planned")
    parser = sub.add_parser(
        "convert",
        help="convert a published draft checkpoint (EAGLE-1/2/HASS, EAGLE-3, SpecForge, speculators, z-lab DFlash, "
        "Medusa, MLP speculator) to this format, or export to speculators/vLLM",
        description="Convert the draft checkpoint SRC (a folder or a Hub id; HF_HUB_OFFLINE=1 reads the local cache) "
        "into DST. --from auto detects the format from config fields and tensor names and prints what it found. "
        "Only safetensors are written; pickles are read with torch.load(weights_only=True); DST appears only "
        "when the conversion succeeded. Formats: "
        + ", ".join(f"{name} ({all_specs()[name].title})" for name in formats)
        + (f"; recognised but not converted: {', '.join(planned)}" if planned else "")
        + ". --to vllm writes what vLLM reads for the draft's family: the speculators format for EAGLE-3, P-EAGLE "
        "and DFlash, vLLM's "
        "native layouts for EAGLE-1 (method eagle; vLLM drops a fc bias, the export warns), Medusa (method medusa) "
        "and the MLP speculator (method mlp_speculator). --to sglang writes what SGLang 0.5.23 reads: EAGLE-3 as "
        "LlamaForCausalLMEagle3, DFlash as DFlashDraftModel.",
    )
    parser.add_argument("src", nargs="?", help="source checkpoint folder or Hub id")
    parser.add_argument("dst", nargs="?", help="output folder (must not exist, or be empty, unless --overwrite)")
    parser.add_argument("--from", dest="from_format", default="auto", choices=["auto", *formats])
    parser.add_argument(
        "--to",
        default="ours",
        choices=["ours", *all_export_targets()],
        help="ours (default: speculators-hf format), speculators (EAGLE-3, P-EAGLE, DFlash) or vllm (those, EAGLE-1, "
        "Medusa, MLP speculator)",
    )
    parser.add_argument(
        "--verifier",
        help="verifier Hub id or path: fills the verifier reference, is checked against the draft, and supplies "
        "the input embedding when the source has none (required for research EAGLE-3 and embedding-less EAGLE-1)",
    )
    parser.add_argument(
        "--verifier-id",
        metavar="ORG/NAME",
        help="the verifier's Hub id, written as the draft's verifier reference (speculators_config.verifier."
        "name_or_path) instead of a local --verifier folder: vLLM loads the verifier from that reference verbatim "
        "(`vllm serve DRAFT`) and `push` needs a Hub id. An export that names a local path warns",
    )
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="cast the floating-point weights (default: keep the source's dtype; bf16 halves an fp32 export)",
    )
    parser.add_argument(
        "--repo-id",
        metavar="ORG/NAME",
        help="the Hub id the result will be published under: the model card's snippets load the draft by it "
        "(without it the card says the id is unknown)",
    )
    parser.add_argument(
        "--set",
        action="append",
        type=config_override,
        metavar="KEY=VALUE",
        help="set a config field of the result, e.g. norm_before_residual=true or speculative_tokens=3 (repeatable; "
        "the value is checked against the field's type)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument("--revision", help="Hub revision of SRC")
    parser.add_argument("--cache-dir", help="Hugging Face cache folder")
    parser.add_argument("--list-known", action="store_true", help="list the published checkpoints known per format")
    parser.set_defaults(func=cmd_convert, usage_error=parser.error)
