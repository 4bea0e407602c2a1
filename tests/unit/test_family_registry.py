"""A family is one class that declares everything about itself, and registration builds every table: a toy family
defined here, in a test module alone, loads through AutoConfig/AutoModelForCausalLM, is offered by the CLI, gets
its model card, trains with `speculators_hf.training.train` and `speculators-hf train`, and runs in the bench."""

from __future__ import annotations

import json
from typing import Annotated, Any

import pytest
import torch
from conftest import OneTokenDraft, assert_greedy_exact, make_prompts, make_verifier
from pydantic import Field, StrictInt
from transformers import AutoConfig, AutoModelForCausalLM

import speculators_hf as sh
from speculators_hf.cli import main
from speculators_hf.config import SpeculatorConfig
from speculators_hf.models import FAMILIES
from speculators_hf.models.objectives import masked_cross_entropy


class ToyConfig(SpeculatorConfig):
    family = "toy"
    hidden_size: Annotated[StrictInt, Field(gt=0, le=4096)] = 32  # declared once: type, bound and default


class ToyDraft(OneTokenDraft):
    """One linear head on the verifier's last hidden state at t and the embedding of token t+1: predicts t+2."""

    config_class = ToyConfig
    title = "Toy draft"
    card_details = (("width (`hidden_size`)", "hidden_size"),)

    def training_loss(self, input_ids, loss_mask, features, steps=None):
        logits = self(input_ids[:, 1:-1], features[0][:, :-2])
        ce, acc = masked_cross_entropy(logits, input_ids[:, 2:], loss_mask[:, 2:].bool())
        return ce, {"loss": ce.item(), "acc_0": acc}

    @classmethod
    def config_from_verifier(cls, verifier_config, speculative_tokens: int = 1, **fields: Any):
        config = ToyConfig(hidden_size=verifier_config.hidden_size, **fields)
        config.speculative_tokens = speculative_tokens
        return config


@pytest.fixture
def toy_family():
    """Registers the toy family for one test, and takes it out of the registry again afterwards."""
    before, configs = dict(FAMILIES), dict(SpeculatorConfig.families)
    sh.register_family(ToyDraft)
    yield ToyDraft
    FAMILIES.clear()
    FAMILIES.update(before)
    SpeculatorConfig.families.clear()
    SpeculatorConfig.families.update(configs)


def test_a_registered_family_loads_through_the_auto_classes(toy_family, tmp_path):
    verifier = make_verifier()
    draft = ToyDraft.from_verifier(verifier)
    draft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["speculators_model_type"] == "toy" and config["architectures"] == ["ToyDraft"]
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ToyConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, ToyDraft) and isinstance(sh.load_draft(tmp_path), ToyDraft)
    assert_greedy_exact(verifier, loaded.bind_verifier(verifier), make_prompts(2), max_new_tokens=8)
    with pytest.raises(sh.SpeculatorConfigError, match="hidden_size: Input should be less than or equal to 4096"):
        ToyConfig(hidden_size=5000)


def test_a_registered_family_gets_its_card_and_trains(toy_family, tmp_path):
    from speculators_hf.training import DraftDataset, TrainConfig, train

    verifier = make_verifier()
    draft = ToyDraft.from_verifier(verifier)
    card = str(sh.create_model_card(draft))
    assert "Toy draft" in card and "width (`hidden_size`)" in card
    ids = torch.randint(3, 96, (16, 12), generator=torch.Generator().manual_seed(0))
    result = train(
        draft, verifier, DraftDataset(ids, torch.ones_like(ids)), TrainConfig(output_dir=str(tmp_path), steps=4)
    )
    assert len(result["history"]) == 1 and (tmp_path / "final" / "config.json").exists()
    with pytest.raises(ValueError, match="ttt_steps=2: the Toy draft loss has no unrolled steps"):
        train(ToyDraft.from_verifier(verifier), verifier, DraftDataset(ids, torch.ones_like(ids)),
              TrainConfig(output_dir=str(tmp_path / "b"), steps=2, ttt_steps=2))  # fmt: skip


def test_a_registered_family_is_offered_by_the_cli_and_runs_in_the_bench(toy_family, tmp_path, capsys):
    from speculators_hf.bench import run_bench
    from speculators_hf.training.data import save_blocks

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "toy" in capsys.readouterr().out
    verifier = make_verifier()
    verifier.save_pretrained(tmp_path / "verifier")
    ids = torch.randint(3, 96, (20, 12), generator=torch.Generator().manual_seed(0))
    save_blocks(tmp_path / "data", ids, torch.ones_like(ids, dtype=torch.uint8), {"verifier": "verifier"})
    args = ["train", "--verifier", str(tmp_path / "verifier"), "--data", str(tmp_path / "data"), "--output",
            str(tmp_path / "out"), "--family", "toy", "--steps", "2", "--eval-blocks", "0"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((tmp_path / "out" / "final" / "config.json").read_text())["speculators_model_type"] == "toy"
    results = run_bench(verifier, make_prompts(2), {"toy": ToyDraft.from_verifier(verifier)}, [1], max_new_tokens=6,
                        prompt_lookup=False, progress=False)  # fmt: skip
    assert [r.method for r in results] == ["verifier alone", "toy"] and all(r.exact for r in results)


def test_hass_trains_from_the_cli_with_unrolled_steps(tmp_path):
    """EAGLE with --ttt-steps 3 is HASS: the loss unrolls three steps (a metric per step); a family whose loss
    does not unroll refuses the option."""
    from speculators_hf.training.data import save_blocks

    verifier = make_verifier()
    verifier.save_pretrained(tmp_path / "verifier")
    ids = torch.randint(3, 96, (20, 12), generator=torch.Generator().manual_seed(0))
    save_blocks(tmp_path / "data", ids, torch.ones_like(ids, dtype=torch.uint8), {"verifier": "verifier"})
    common = ["train", "--verifier", str(tmp_path / "verifier"), "--data", str(tmp_path / "data"), "--steps", "2",
              "--eval-blocks", "0", "--log-every", "1"]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "hass"), "--family", "eagle", "--ttt-steps", "3"]) == 0
    log = [json.loads(line) for line in (tmp_path / "hass" / "training_log.jsonl").read_text().splitlines()]
    assert {"acc_0", "acc_1", "acc_2"} <= set(log[-1]) and "acc_3" not in log[-1]
    assert main([*common, "--output", str(tmp_path / "eagle1"), "--family", "eagle"]) == 0
    log = [json.loads(line) for line in (tmp_path / "eagle1" / "training_log.jsonl").read_text().splitlines()]
    assert "acc_0" in log[-1] and "acc_1" not in log[-1]  # EAGLE-1/2: one step
    assert main([*common, "--output", str(tmp_path / "medusa"), "--family", "medusa", "--ttt-steps", "3"]) == 1
