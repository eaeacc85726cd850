import math

import pytest

from dpray.config import ConfigError, config_from_tree, load_config, packaged_config_path
from tests.conftest import REPO, base_tree


def test_minimal_config_defaults(tmp_path):
    config = config_from_tree(base_tree(tmp_path, "x.jsonl"))
    assert config.data.on_error == "skip"
    assert config.privacy.unit == "instruction"
    assert config.train.lora_r == 8


def test_unknown_key_named(tmp_path):
    tree = base_tree(tmp_path, "x.jsonl")
    tree["data"]["txt_field"] = "oops"
    with pytest.raises(ConfigError, match=r"data\.txt_field': unknown key"):
        config_from_tree(tree)


def test_unknown_section_named(tmp_path):
    tree = base_tree(tmp_path, "x.jsonl")
    tree["privcy"] = {}
    with pytest.raises(ConfigError, match=r"'privcy': unknown key"):
        config_from_tree(tree)


@pytest.mark.parametrize(
    "override, key",
    [
        ("privacy.epsilon=-1", "privacy.epsilon"),
        ("privacy.delta=2", "privacy.delta"),
        ("privacy.unit=household", "privacy.unit"),
        ("data.on_error=ignore", "data.on_error"),
        ("data.max_chars=0", "data.max_chars"),
        ("train.lora_r=abc", "train.lora_r"),
        ("privacy.max_records_per_user=0", "privacy.max_records_per_user"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_tree(base_tree(tmp_path, "x.jsonl"), [override])


def test_missing_required_key(tmp_path):
    tree = base_tree(tmp_path, "x.jsonl")
    del tree["privacy"]["epsilon"]
    with pytest.raises(ConfigError, match=r"privacy\.epsilon': required key is missing"):
        config_from_tree(tree)


def test_overrides_parse_yaml_values(tmp_path):
    config = config_from_tree(
        base_tree(tmp_path, "x.jsonl"),
        ["privacy.epsilon=6", "privacy.delta=5e-7", "train.lora_targets=[q_proj, v_proj]"],
    )
    assert config.privacy.epsilon == 6.0
    assert config.privacy.delta == 5e-7
    assert config.train.lora_targets == ["q_proj", "v_proj"]


def test_override_syntax_errors(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        config_from_tree(base_tree(tmp_path, "x.jsonl"), ["privacy.epsilon"])
    with pytest.raises(ConfigError, match="not a section"):
        config_from_tree(base_tree(tmp_path, "x.jsonl"), ["run_dir.x=1"])


def test_user_unit_requires_user_field(tmp_path):
    with pytest.raises(ConfigError, match="user_field"):
        config_from_tree(base_tree(tmp_path, "x.jsonl"), ["privacy.unit=user"])


def test_default_delta_is_one_over_n_log_n(tmp_path):
    tree = base_tree(tmp_path, "x.jsonl")
    del tree["privacy"]["delta"]
    config = config_from_tree(tree)
    assert config.privacy.resolve_delta(1000) == pytest.approx(1 / (1000 * math.log(1000)))


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(path)


@pytest.mark.parametrize("name", ["demo", "smoke"])
def test_shipped_configs_load(name):
    packaged = load_config(packaged_config_path(name))
    assert load_config(REPO / "jobs" / f"{name}.yaml") == packaged


def test_section_hash_changes_only_with_section(tmp_path):
    a = config_from_tree(base_tree(tmp_path, "x.jsonl"))
    b = config_from_tree(base_tree(tmp_path, "x.jsonl"), ["train.lora_r=4"])
    assert a.section_hash("data", "privacy") == b.section_hash("data", "privacy")
    assert a.section_hash("train") != b.section_hash("train")
