"""`speculators_hf.generate` takes its inputs as `verifier.generate` takes them: the same padding of finished rows,
the same warnings, and the same exception types for inputs transformers cannot generate from (with a message that
names the argument). Every case is compared with what `verifier.generate` does on it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, make_prompts, make_verifier
from transformers import GenerationConfig

import speculators_hf as sh
from speculators_hf.generation.loop import InputError

MAX_NEW = 12


def left_padded(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[1] :], mask[i, width - p.shape[1] :] = p[0], 1
    return ids, mask


def drafts(verifier) -> dict[str, sh.SpeculatorModel]:
    """An untrained EAGLE-3 (rejects nearly everything) and an exact copy (accepts everything, so eos falls
    inside a round's emitted tokens)."""
    return {
        "eagle3": sh.Eagle3Speculator.from_verifier(verifier, draft_vocab_size=64),
        "copy": sh.IndependentSpeculator.from_model(copy.deepcopy(verifier), verifier),
    }


# ------------------------------------------------------------------------------------------------
# padding of finished rows (issue 27 item 3)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def early_stop():
    """A verifier without pad id in its generation config (its model config keeps pad_token_id=0), prompts, and
    two eos ids, the larger first: row 0 meets the larger one after 3 tokens, no row meets the other."""
    verifier = make_verifier(eos_token_id=None)
    verifier.generation_config.pad_token_id = None
    prompts = make_prompts(3, seed=3)
    free = [verifier.generate(p, max_new_tokens=MAX_NEW, do_sample=False)[0, p.shape[1] :] for p in prompts]
    seen = {t for row in free for t in row.tolist()}
    stop, other = int(free[0][2]), min(set(range(3, VOCAB)) - seen)
    assert stop > other and stop not in free[0][:2].tolist() and verifier.config.pad_token_id == 0
    return verifier, prompts, [stop, other]


@pytest.mark.parametrize(
    "case",
    ["eos list, pad unset", "eos list via generation_config", "one eos, pad unset", "eos list, pad set"],
)
def test_finished_rows_are_padded_as_transformers_pads_them(early_stop, case):
    """pad_token_id, else the FIRST eos id (not the smallest), read from the generation config only."""
    verifier, prompts, eos = early_stop
    settings = {
        "eos list, pad unset": {"eos_token_id": eos},
        "eos list via generation_config": {"generation_config": GenerationConfig(eos_token_id=eos)},
        "one eos, pad unset": {"eos_token_id": eos[0]},
        "eos list, pad set": {"eos_token_id": eos, "pad_token_id": 7},
    }[case]
    ids, mask = left_padded(prompts)
    ref = verifier.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, **settings)
    finished = ref[0, ids.shape[1] + 3 :]
    assert finished.numel() > 0 and (finished == settings.get("pad_token_id", eos[0])).all()  # row 0 is padded
    for name, draft in drafts(verifier).items():
        out = sh.generate(verifier, draft, ids, mask, max_new_tokens=MAX_NEW, **settings)
        assert out.dtype == ref.dtype and torch.equal(out, ref), f"{name}:\n own {out.tolist()}\n hf  {ref.tolist()}"


@pytest.mark.parametrize("batch, with_mask", [(1, False), (2, True), (2, False)])
def test_missing_pad_warnings_are_transformers_own(early_stop, caplog, batch, with_mask):
    """The 'attention mask and pad token id were not set' warning comes exactly when verifier.generate gives it."""
    verifier, prompts, eos = early_stop
    ids = prompts[0].repeat(batch, 1)
    mask = torch.ones_like(ids) if with_mask else None
    message = "The attention mask and the pad token id were not set"
    caplog.clear()
    verifier.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, eos_token_id=eos)
    expected = message in caplog.text
    caplog.clear()
    sh.generate(verifier, drafts(verifier)["eagle3"], ids, mask, max_new_tokens=2, eos_token_id=eos)
    assert (message in caplog.text) == expected == (batch > 1 and not with_mask)


# ------------------------------------------------------------------------------------------------
# input validation (issue 27 item 4)
# ------------------------------------------------------------------------------------------------
IDS = torch.tensor([[5, 6, 7]])
# name -> (input_ids, attention_mask, what the message names)
REFUSED_BY_BOTH = {
    "mask shorter than ids": (IDS, torch.ones(1, 2, dtype=torch.long), r"attention_mask has shape \[1, 2\] but "),
    "mask of another batch size": (IDS, torch.ones(2, 3, dtype=torch.long), r"shape \[2, 3\] but input_ids .*\[1, 3\]"),
    "1-D mask": (IDS, torch.ones(3, dtype=torch.long), r"attention_mask has shape \[3\] but input_ids has shape"),
    "3-D mask": (IDS, torch.ones(1, 1, 3, dtype=torch.long), r"attention_mask has shape \[1, 1, 3\]"),
    "1-D ids": (IDS[0], None, r"input_ids must be 2-D .* got shape \[3\]; for one prompt, pass input_ids\[None\]"),
    "3-D ids": (IDS[None], None, r"input_ids must be 2-D .* got shape \[1, 1, 3\]"),
    "float ids": (IDS.float(), None, r"input_ids must hold token ids .* got dtype torch.float32"),
    "empty prompt": (IDS[:, :0], None, r"input_ids is empty \(shape \[1, 0\]\)"),
    "empty batch": (IDS[:0], None, r"input_ids is empty \(shape \[0, 3\]\)"),
    "id = vocab size": (torch.tensor([[5, VOCAB, 7]]), None, rf"input_ids\[0, 1\] = {VOCAB} .* vocabulary has {VOCAB}"),
    "negative id": (torch.tensor([[5, 6, -1]]), None, rf"input_ids\[0, 2\] = -1 .* vocabulary has {VOCAB} ids"),
}


@pytest.mark.parametrize("case", list(REFUSED_BY_BOTH))
def test_inputs_verifier_generate_refuses_raise_the_same_type_with_a_clear_message(verifier, case):
    ids, mask, message = REFUSED_BY_BOTH[case]
    with pytest.raises(Exception) as hf:
        verifier.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with pytest.raises(type(hf.value), match=message) as own:
        sh.generate(verifier, drafts(verifier)["eagle3"], ids, mask, max_new_tokens=4)
    assert isinstance(own.value, (InputError, ValueError))


def test_out_of_vocabulary_id_in_the_assisted_loop_is_transformers_error(verifier):
    """verifier.generate alone fails in the embedding with an IndexError; with our drafts it fails the same way
    (in the verifier's embedding, or in the independent draft's, which runs first)."""
    ids = torch.tensor([[5, VOCAB, 7]])
    with pytest.raises(IndexError, match="index out of range"):
        verifier.generate(ids, max_new_tokens=4, do_sample=False)
    for draft in drafts(verifier).values():
        with pytest.raises(IndexError, match="index out of range"):
            verifier.generate(ids, max_new_tokens=4, do_sample=False, assistant_model=draft)


@pytest.mark.parametrize(
    "ids, mask",
    [
        (IDS.int(), None),
        (IDS, torch.ones(1, 3)),
        (IDS, torch.ones(1, 3, dtype=torch.bool)),
        (torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])),
    ],
    ids=["int32 ids", "float 0/1 mask", "bool mask", "padded rows, float mask"],
)
def test_inputs_verifier_generate_takes_give_its_tokens(verifier, ids, mask):
    ref = verifier.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for name, draft in drafts(verifier).items():
        out = sh.generate(verifier, draft, ids, mask, max_new_tokens=6)
        assert out.dtype == ref.dtype and torch.equal(out, ref), f"{name}: {out.tolist()} != {ref.tolist()}"


def test_masks_without_a_defined_output_are_refused(verifier):
    """verifier.generate accepts these and returns tokens that depend on meaningless values (a mask value of 2 or
    -1 shifts the positions; the extra column of a longer mask; the attention kernel for an all-padding row), so
    the loop refuses them, naming the entry or row."""
    ones = torch.ones(1, 3, dtype=torch.long)
    plain = verifier.generate(IDS, attention_mask=ones, max_new_tokens=6, do_sample=False)
    draft = drafts(verifier)["eagle3"]
    for value in (2, -1):
        mask = torch.tensor([[1, value, 1]])
        assert not torch.equal(verifier.generate(IDS, attention_mask=mask, max_new_tokens=6, do_sample=False), plain)
        with pytest.raises(ValueError, match=rf"attention_mask\[0, 1\] = {value}: the mask must hold 1 for a token"):
            sh.generate(verifier, draft, IDS, mask, max_new_tokens=6)

    longer = [verifier.generate(IDS, attention_mask=torch.tensor([m]), max_new_tokens=6, do_sample=False)
              for m in ([1, 1, 1, 0], [0, 1, 1, 1])]  # fmt: skip
    assert not torch.equal(*longer)
    with pytest.raises(RuntimeError, match=r"attention_mask has shape \[1, 4\] but input_ids has shape \[1, 3\]"):
        sh.generate(verifier, draft, IDS, torch.tensor([[1, 1, 1, 0]]), max_new_tokens=6)

    ids, mask = torch.tensor([[5, 6, 7], [9, 9, 9]]), torch.tensor([[1, 1, 1], [0, 0, 0]])
    by_kernel = []
    for kernel in ("sdpa", "eager"):
        verifier.config._attn_implementation = kernel
        by_kernel.append(verifier.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[1])
    assert not torch.equal(*by_kernel)
    with pytest.raises(ValueError, match=r"attention_mask is all zeros in row\(s\) \[1\]"):
        sh.generate(verifier, draft, ids, mask, max_new_tokens=6)
