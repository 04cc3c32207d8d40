import dataclasses
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from conftest import REPO
from utils import (
    Config,
    DataConfig,
    ModelConfig,
    SECTIONS,
    Section,
    TrainingConfig,
    UserError,
    config_from_dict,
    config_to_dict,
    load_config,
)


def test_shipped_config_loads_and_validates():
    config = load_config(str(REPO / "configs.yaml"))
    assert config.model.vocab_size == 4096
    assert config.data.raw_text_path == "data/shakespeare.txt"
    assert config.training.max_steps > 0


def test_configs_yaml_documents_every_field_of_every_section():
    lines = (REPO / "configs.yaml").read_text().splitlines()
    for section, kind in SECTIONS.items():
        start = lines.index(f"{section}:")
        block = [line for line in lines[start + 1 :] if line.startswith("  ")]
        for f in dataclasses.fields(kind):
            line = next((line for line in block if line.startswith(f"  {f.name}:")), None)
            assert line is not None, f"configs.yaml has no {section}.{f.name}"
            assert re.search(r"\s#\s\S", line), f"configs.yaml: {section}.{f.name} has no comment"


def test_one_learning_rate_override_is_enough_the_floor_follows_the_peak():
    config = load_config(str(REPO / "configs.yaml"), ["training.lr=1e-4"])
    assert config.training.floor_lr == pytest.approx(1e-4 * config.training.min_lr_ratio)
    assert Config().training.floor_lr == 3e-4  # the shipped default, exactly
    stored = config_from_dict({"training": {"lr": 1e-2, "min_lr": 3e-4}})  # an older checkpoint
    assert stored.training.floor_lr == 3e-4


def test_a_string_setting_takes_digits_as_text_and_says_to_quote_them_in_yaml(tmp_path):
    config = config_from_dict({}, overrides=["training.run_name=2024", "training.init_from="])
    assert config.training.run_name == "2024" and config.training.init_from == ""
    numbered = tmp_path / "numbered.yaml"
    numbered.write_text("training:\n  run_name: 2024\n")
    with pytest.raises(UserError, match="run_name must be a string, got 2024 — quote it"):
        load_config(str(numbered))


def test_an_empty_config_file_is_refused(tmp_path):
    (tmp_path / "empty.yaml").write_text("# truncated\n")
    with pytest.raises(UserError, match="is empty — write the model, data and training sections"):
        load_config(str(tmp_path / "empty.yaml"))


def test_overrides_are_typed_like_yaml():
    config = config_from_dict(
        {},
        overrides=[
            "training.max_steps=30",
            "training.lr=1e-3",
            "training.compile=true",
            "data.raw_text_path=my.txt",
            "model.rope_theta=500000",
        ],
    )
    assert config.training.max_steps == 30 and isinstance(config.training.max_steps, int)
    assert config.training.lr == 1e-3  # YAML reads 1e-3 as a string; float fields accept it
    assert config.training.compile is True  # compile is a plain auto | true | false
    assert config.data.raw_text_path == "my.txt"
    assert config.model.rope_theta == 500000.0 and isinstance(config.model.rope_theta, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.max_step=3", "did you mean 'training.max_steps'"),
        ("model.num_layers=two", "model.num_layers must be int"),
        ("model.num_layers=2.5", "model.num_layers must be int"),
        ("training.compile=1", "training.compile must be one of auto, true, false, got 1"),
        ("training.optimizer=adam", "training.optimizer must be one of adamw, muon, got 'adam'"),
        ("training.compile=yes please", "training.compile must be one of auto, true, false"),
        ("max_steps=3", "bad override"),
        ("training.max_steps", "bad override"),
        ("trainng.max_steps=3", "no section 'trainng'"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(UserError, match=message):
        config_from_dict({}, overrides=[override])


def test_compile_stored_as_a_string_by_older_checkpoints_still_loads():
    assert config_from_dict({"training": {"compile": "true"}}).training.compile is True
    assert config_from_dict({"training": {"compile": "false"}}).training.compile is False


def test_later_overrides_are_checked_together_not_one_by_one():
    config = config_from_dict({}, overrides=["training.min_lr=1e-2", "training.lr=1e-1"])
    assert (config.training.min_lr, config.training.lr) == (1e-2, 1e-1)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("training", "lr", 0.0, r"training.lr must be in \(0, 1000\], got 0.0"),
        ("data", "val_split", 1.0, r"val_split must be in \(0, 1\)"),
        ("data", "val_split", 0.0, r"val_split must be in \(0, 1\)"),
        ("model", "embed_dim", 250, "not divisible by model.num_heads"),
        ("model", "num_kv_heads", 3, "not divisible by model.num_kv_heads"),
        ("data", "context_length", 512, "context_length .* > model.max_seq_len"),
        ("data", "batch_size", 0, r"data.batch_size must be in \[1, 65536\]"),
        (
            "training",
            "device",
            "tpu",
            "training.device must be one of auto, cpu, cuda, mps, got 'tpu'",
        ),
        ("training", "min_lr", 1.0, "min_lr .* > training.lr"),
    ],
)
def test_validation_rejects_out_of_range_values(section, key, value, message):
    with pytest.raises(UserError, match=message):
        config_from_dict({section: {key: value}})
    with pytest.raises(UserError, match=message):  # built in code, a section checks itself too
        sections = {"model": ModelConfig, "data": DataConfig, "training": TrainingConfig}
        Config(**{section: sections[section](**{key: value})})


def test_a_new_field_of_any_declared_type_loads_without_touching_the_loader():
    @dataclass
    class Extra(Section):
        section: ClassVar[str] = "extra"
        widths: list[int] = field(default_factory=lambda: [64])
        limit: int | None = None
        mode: Literal["fast", "slow"] = "fast"

    assert Extra(widths=[1, 2], limit=None, mode="slow") == Extra([1, 2], None, "slow")
    assert Extra(limit=3).limit == 3 and Extra().widths == [64]
    for kwargs, message in (
        ({"widths": [1, "x"]}, r"extra.widths\[1\] must be int, got 'x'"),
        ({"widths": 5}, "extra.widths must be a list of int"),
        ({"limit": 2.5}, "extra.limit must be int or null, got 2.5"),
        ({"mode": "medium"}, "extra.mode must be one of fast, slow"),
    ):
        with pytest.raises(UserError, match=message):
            Extra(**kwargs)


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  embed_dim: 64\n  num_heads: [4\n")
    with pytest.raises(UserError, match="malformed YAML .* line 4"):
        load_config(str(broken))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("modle:\n  embed_dim: 64\n")
    with pytest.raises(UserError, match="did you mean 'model'"):
        load_config(str(unknown))


def test_config_dict_round_trip():
    config = Config()
    config.model.num_layers = 3
    assert config_from_dict(config_to_dict(config)) == config
