"""A config.json field of the wrong type is a validation error naming the field, the value and the expected type,
for every integer and boolean field of every registered family, whether or not the file has a
`speculators_config` block (without one, the default draft length is derived from the family's fields: that
must wait for their check). Text is never accepted for a number or a flag: the config would keep it as text
("false" being truthy)."""

from __future__ import annotations

import types
import typing

import pytest
from conftest import make_verifier

from speculators_hf.config import SpeculatorConfig, SpeculatorConfigError
from speculators_hf.models import FAMILIES

EXPECTED = {int: ("6", "a valid integer"), bool: ("false", "a valid boolean")}


def base_type(hint: typing.Any) -> typing.Any:
    """`int` for `Annotated[int, ...]`, the hint itself otherwise."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def typed_fields(config_class: type[SpeculatorConfig]) -> list[tuple[str, type, bool]]:
    """The family's integer and boolean fields: (name, type, whether it is a list of them), from their annotations."""
    found = []
    for name, info in config_class.fields_schema().model_fields.items():
        hint = info.annotation
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        for option in map(base_type, options):
            if option in EXPECTED:
                found.append((name, option, False))
            elif typing.get_origin(option) is list and base_type(typing.get_args(option)[0]) in EXPECTED:
                found.append((name, base_type(typing.get_args(option)[0]), True))
    return found


CASES = [
    (name, *field) for name, model_class in sorted(FAMILIES.items()) for field in typed_fields(model_class.config_class)
]


def test_every_family_has_typed_fields_to_check():
    fields = {(family, field) for family, field, _, _ in CASES}
    assert {family for family, _ in fields} >= {"dflash", "eagle", "eagle3", "peagle", "medusa", "mlp_speculator"}
    assert {
        ("dflash", "block_size"),
        ("dflash", "mask_token_id"),
        ("peagle", "eagle_aux_hidden_state_layer_ids"),
    } <= fields
    assert {("mlp_speculator", "n_candidates"), ("eagle3", "norm_before_residual")} <= fields


@pytest.mark.parametrize("block", ["with speculators_config", "without speculators_config"])
@pytest.mark.parametrize("family, field, kind, is_list", CASES)
def test_text_in_a_number_or_flag_field_names_the_field_value_and_type(family, field, kind, is_list, block):
    config = FAMILIES[family].config_for(make_verifier()).to_dict()
    text, expected = EXPECTED[kind]
    config[field] = [text] if is_list else text
    if block.startswith("without"):
        del config["speculators_config"]
    with pytest.raises(SpeculatorConfigError) as info:
        SpeculatorConfig.from_dict(config)
    message = str(info.value)
    assert f"{field}{'.0' if is_list else ''}: Input should be {expected} (got {text!r})" in message, message
    assert "unsupported operand" not in message
