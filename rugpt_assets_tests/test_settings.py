"""The environment is read in one place, profiles survive the trip through the launchpad, and the
launchpad explains every field."""

import re
from dataclasses import fields, replace
from pathlib import Path

import pytest
from dagster._config import Shape, validate_config

from rugpt_assets import settings
from rugpt_assets.core.configs import ExportConfig, MergeConfig, RecipeConfig, TrainConfig

SECTIONS = {"recipe": RecipeConfig, "train": TrainConfig, "merge": MergeConfig, "export": ExportConfig}


@pytest.mark.parametrize("profile_name", sorted(settings.PROFILES))
@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_profile_round_trips_through_the_launchpad(profile_name, section):
    defaults = getattr(settings.PROFILES[profile_name](settings.Environment()), section)
    config_class = settings.launchpad_config(defaults)
    assert settings.config_to_dataclass(config_class(), SECTIONS[section]) == defaults


def test_launchpad_values_reach_the_dataclass():
    changed = replace(TrainConfig(), lora_r=8, precision="bf16", lora_target_modules=["c_attn", "c_proj"], system_prompt="")
    config_class = settings.launchpad_config(TrainConfig())
    values = {f.name: getattr(changed, f.name) for f in fields(TrainConfig)}
    assert settings.config_to_dataclass(config_class(**values), TrainConfig) == changed


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_launchpad_field_has_a_description(section):
    schema = settings.launchpad_config(SECTIONS[section]()).to_config_schema().as_field().config_type
    assert isinstance(schema, Shape)
    described = {name: field.description for name, field in schema.fields.items()}
    assert set(described) == {f.name for f in fields(SECTIONS[section])}
    assert all(len(text or "") > 10 for text in described.values()), described


def test_closed_choices_are_enums_in_the_launchpad():
    schema = settings.launchpad_config(TrainConfig()).to_config_schema().as_field().config_type
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
    config_class = settings.launchpad_config(TrainConfig())
    launchpad = config_class.model_construct(**{f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)} | changes)
    with pytest.raises(ValueError, match=message):
        settings.config_to_dataclass(launchpad, TrainConfig)


def test_one_switch_gives_the_seed_recipe_on_rugpt35():
    seed = settings.rugpt35_profile(settings.Environment.read({"RUGPT_SEED_RECIPE": "1"}))
    assert seed.train == replace(TrainConfig(), device="cuda", packing=False)
    fast = settings.rugpt35_profile(settings.Environment.read({})).train
    assert (fast.load_in_8bit, fast.attn_implementation, fast.compile_blocks) == (False, "packed_varlen", True)


def test_environment_reads_every_variable_by_its_name_and_type(tmp_path):
    env = settings.Environment.read(
        {
            "RUGPT_PROFILE": "rugpt35",
            "RUGPT_SOURCES_DIR": str(tmp_path / "mirror"),
            "RUGPT_DEMO_TRAIN_STEPS": "7",
            "RUGPT_MIN_RETRAIN_HOURS": "0.5",
            "RUGPT_OBSERVE_CRON": "*/5 * * * *",
            "DAGSTER_HOME": str(tmp_path),
            "RUGPT_STORAGE_DIR": "",  # empty means unset
        }
    )
    assert (env.profile, env.demo_train_steps, env.min_retrain_hours, env.observe_cron) == ("rugpt35", 7, 0.5, "*/5 * * * *")
    assert env.storage_root == tmp_path.resolve() / "storage" / "artifacts"
    assert env.local_sources_dir == (tmp_path / "mirror").resolve()
    profile = settings.build_profile(env)
    assert (profile.name, profile.source_mode) == ("rugpt35", "local")  # a local mirror instead of the hub
    assert settings.demo_profile(env).train.max_steps == 7
    defaults = settings.Environment.read({})
    assert defaults == settings.Environment()
    assert defaults.local_sources_dir == settings.BUNDLED_SAMPLES_DIR and settings.build_profile(defaults).name == "demo"
    assert settings.rugpt35_profile(defaults).source_mode == "hub"


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"RUGPT_DEMO_TRAIN_STEPS": "many"}, "RUGPT_DEMO_TRAIN_STEPS='many' is not a valid int"),
        ({"RUGPT_MIN_RETRAIN_HOURS": "6h"}, "RUGPT_MIN_RETRAIN_HOURS='6h' is not a valid float"),
    ],
)
def test_a_malformed_variable_is_named(environ, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        settings.Environment.read(environ)


def test_an_unknown_profile_is_named():
    with pytest.raises(ValueError, match="RUGPT_PROFILE='big' is not a profile; choose one of: demo, rugpt35"):
        settings.build_profile(settings.Environment(profile="big"))


def test_every_variable_has_a_name_and_a_meaning():
    names = [f.metadata["env"] for f in fields(settings.Environment)]
    assert len(names) == len(set(names))
    assert all(len(f.metadata["help"]) > 10 for f in fields(settings.Environment))


def test_only_settings_reads_the_environment():
    """One home: no other module of the package reads environment variables (core gets values
    passed down; torch.distributed and dagster_pipes read their own launch variables)."""
    package = Path(settings.__file__).parent
    readers = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if path != Path(settings.__file__) and re.search(r"os\.environ|getenv\(", path.read_text(encoding="utf-8"))
    ]
    assert readers == []
