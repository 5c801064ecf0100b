"""Profiles survive the trip through the launchpad, and the launchpad explains every field."""

from dataclasses import fields, replace

import pytest
from dagster._config import validate_config

from rugpt_assets import settings
from rugpt_assets.core.configs import ExportConfig, MergeConfig, RecipeConfig, TrainConfig

SECTIONS = {"recipe": RecipeConfig, "train": TrainConfig, "merge": MergeConfig, "export": ExportConfig}


@pytest.mark.parametrize("profile_name", sorted(settings.PROFILES))
@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_profile_round_trips_through_the_launchpad(profile_name, section):
    defaults = getattr(settings.PROFILES[profile_name](), section)
    config_class = settings.launchpad_config("RoundTrip", defaults)
    assert settings.config_to_dataclass(config_class(), SECTIONS[section]) == defaults


def test_launchpad_values_reach_the_dataclass():
    changed = replace(TrainConfig(), lora_r=8, precision="bf16", lora_target_modules=["c_attn", "c_proj"], system_prompt="")
    config_class = settings.launchpad_config("TrainRunConfig", TrainConfig())
    values = {f.name: getattr(changed, f.name) for f in fields(TrainConfig)}
    assert settings.config_to_dataclass(config_class(**values), TrainConfig) == changed


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_launchpad_field_has_a_description(section):
    schema = settings.launchpad_config("Described", SECTIONS[section]()).to_config_schema().as_field().config_type
    described = {name: field.description for name, field in schema.fields.items()}
    assert set(described) == {f.name for f in fields(SECTIONS[section])}
    assert all(len(text or "") > 10 for text in described.values()), described


def test_closed_choices_are_enums_in_the_launchpad():
    schema = settings.launchpad_config("Choices", TrainConfig()).to_config_schema().as_field().config_type
    assert not validate_config(schema, {"precision": "half"}).success
    assert validate_config(schema, {"precision": "bf16"}).success


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"load_in_8bit": True, "load_in_4bit": True}, "load_in_8bit and load_in_4bit are both true"),
        ({"pack_tokens": 512, "max_tokens_count": 1000}, "pack_tokens=512 is below max_tokens_count=1000"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0 must be at least 1"),
        ({"device": "tpu"}, "TrainConfig.device='tpu' is not one of: auto, cpu, cuda"),
    ],
)
def test_impossible_settings_are_rejected_with_the_reason(changes, message):
    config_class = settings.launchpad_config("TrainRunConfig", TrainConfig())
    launchpad = config_class.model_construct(**{f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)} | changes)
    with pytest.raises(ValueError, match=message):
        settings.config_to_dataclass(launchpad, TrainConfig)


def test_one_switch_gives_the_seed_recipe_on_rugpt35(monkeypatch):
    monkeypatch.setenv("RUGPT_SEED_RECIPE", "1")
    assert settings.rugpt35_profile().train == replace(TrainConfig(), device="cuda", packing=False)
    monkeypatch.delenv("RUGPT_SEED_RECIPE")
    fast = settings.rugpt35_profile().train
    assert (fast.load_in_8bit, fast.attn_implementation, fast.compile_blocks) == (False, "packed_varlen", True)
