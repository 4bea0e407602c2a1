"""Model cards from the family registry: every registered family (a family added later included) describes itself,
and its "Serve with vLLM" section says exactly what the family's `vllm_serving` facts say: the command that was
checked in vLLM (with its method and options), or why vLLM cannot serve it. Facts that name a results file agree
with the runs recorded there."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import make_verifier

import speculators_hf as sh
from speculators_hf.config import SpeculatorConfig

ROOT = Path(__file__).resolve().parents[2]
VERIFIER_ID = "tiny-org/tiny-llama"
REPO_ID = "tiny-org/tiny-llama-draft"
FAMILIES = sorted(sh.models.FAMILIES)  # every registered family


def draft_of(family: str):
    """An untrained draft of `family` for a named 8-layer verifier (a mask token where the family needs one)."""
    verifier = make_verifier(num_hidden_layers=8)
    verifier.name_or_path = VERIFIER_ID
    model_class = sh.models.FAMILIES[family]
    fields = model_class.config_class.fields_schema()
    needs_mask = fields is not None and "mask_token_id" in fields.model_fields
    return model_class.from_verifier(verifier, **({"mask_token_id": 90} if needs_mask else {}))


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return " ".join(text[start : end if end >= 0 else None].split())


def facts_of(family: str):
    """The family's own vLLM facts: declared by its model class itself, not inherited from the family it extends."""
    facts = vars(sh.models.FAMILIES[family]).get("vllm_serving")
    assert facts is not None, (
        f"family {family!r} states no vLLM facts of its own: give its model class `vllm_serving = VllmServing(...)` "
        "(the method and command checked in vLLM, or the reason vLLM cannot serve it)"
    )
    return facts


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_describes_itself(family):
    description = vars(sh.models.FAMILIES[family]).get("description", "")
    assert description.strip(), (
        f"family {family!r} has no `description` of its own (what its model card says it is; one inherited from the "
        "family it extends describes that family)"
    )
    about = section(str(sh.create_model_card(draft_of(family), repo_id=REPO_ID)), "What this draft is")
    assert " ".join(description.split()) in about
    assert "does not know" not in about and "does not describe" not in about


@pytest.mark.parametrize("repo_known", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_section_says_what_the_facts_say(family, repo_known):
    facts = facts_of(family)
    draft = draft_of(family)
    card = str(sh.create_model_card(draft, **({"repo_id": REPO_ID} if repo_known else {})))
    text = section(card, "Serve with vLLM")
    sh_draft = REPO_ID if repo_known else '"$DRAFT"'
    for words in (facts.reason, facts.notes.replace("{draft}", sh_draft), facts.prepare.replace("{draft}", sh_draft)):
        assert " ".join(words.split()) in text
    if facts.method is None:
        assert facts.reason, f"family {family!r}: vLLM facts without a method must say why (`reason`)"
        assert "--speculative-config" not in text and "vllm serve" not in text
        return
    assert not facts.reason
    # the --speculative-config argument, read as a shell reads it
    line = next(line for line in card.splitlines() if line.strip().startswith("--speculative-config"))
    argument = shlex.split(line.strip())[1]
    model = facts.folder or (REPO_ID if repo_known else "$DRAFT")
    k = draft.config.speculative_tokens
    assert json.loads(argument) == {
        "method": facts.method,
        "model": model,
        "num_speculative_tokens": k,
        **dict(facts.options),
    }
    assert f"vllm serve {VERIFIER_ID}" in text
    assert (f"vllm serve {sh_draft} " in text) == facts.serve_draft
    if facts.checked:
        assert f"Checked: {' '.join(facts.checked.split())}." in text
    else:
        assert "No run of vLLM has checked this command yet." in text


@pytest.mark.parametrize("family", FAMILIES)
def test_checked_commands_match_their_results(family):
    """A command whose facts name a results file was run there: an engine with exactly that method and options
    loaded the draft and gave the verifier's output (and so did `LLM(model=DRAFT)` when `serve_draft`). Facts that
    say vLLM cannot serve the family and name a results file: the card cites it, and no run there served the draft
    with a speculative method (an independent `draft_model` aside)."""
    facts = facts_of(family)
    assert facts.method is None or facts.checked, (
        f"family {family!r}: its vLLM command {facts.method!r} was not checked in vLLM (`checked` is empty): run it, "
        "and say where, or give the reason vLLM cannot serve the family (method None, `reason`)"
    )
    if not facts.results:
        return
    results = json.loads((ROOT / facts.results).read_text())
    runs = results["families"][family]["runs"]
    if facts.method is None:
        assert facts.results in facts.reason
        served = [run["label"] for run in runs if run["loaded"] and run["resolved"]["method"] != "draft_model"]
        assert runs and not served, f"family {family!r}: the card says vLLM cannot serve it, yet {served} did"
        return
    options = dict(facts.options)
    matching = [
        run
        for run in runs
        if run["mode"] == "spec_config"
        and run["method"] == facts.method
        and run["parallel_drafting_passed"] == options.get("parallel_drafting", False)
    ]
    assert matching and all(run["loaded"] and run["identical_to_verifier_alone"] for run in matching)
    assert matching[0]["resolved"]["method"] == facts.method
    if facts.serve_draft:
        alone = [run for run in runs if run["mode"] == "speculators"]
        assert alone and all(run["loaded"] and run["identical_to_verifier_alone"] for run in alone)
    if facts.method != "draft_model":  # without the method vLLM runs another proposer (or fails): why it is kept
        bare = [run for run in runs if run["mode"] == "spec_config" and run["method"] is None]
        assert bare and all(not run["loaded"] or run["resolved"]["method"] == "draft_model" for run in bare)


def test_a_family_this_version_does_not_know_is_said_so(tmp_path):
    config = SpeculatorConfig().to_dict()
    config.update(speculators_model_type="future_family", architectures=["FutureSpeculator"])
    text = str(sh.create_model_card(config, repo_id=REPO_ID))
    assert "which the speculators-hf that wrote this card does not know" in section(text, "What this draft is")
    assert "records no vLLM facts for the `future_family` family" in section(text, "Serve with vLLM")
