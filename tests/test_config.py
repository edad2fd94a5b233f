import copy
import dataclasses

import pytest

from snell.config import FORMAT_VERSION, SnellConfig, default_coefficients, name_matches


def test_defaults_match_the_reference_setup():
    cfg = SnellConfig()
    assert (cfg.r, cfg.kernel, cfg.num_pieces, cfg.sparsity, cfg.sparsify_mode) == (
        8,
        "piecewise_linear",
        2,
        0.9,
        "reference",
    )
    assert cfg.kernel_coefficients == [0.1, -0.1]
    assert (cfg.dropout, cfg.drop_path, cfg.split_fused_qkv, cfg.learnable_coefficients) == (0.0, 0.0, True, False)


def test_json_round_trip_keeps_every_field():
    cfg = SnellConfig(
        r=16,
        kernel="rbf",
        coefficients=[0.5, 2.0, -0.5],
        sparsity=0.5,
        sparsify_mode="soft",
        target_modules=r".*fc\d",
        exclude_modules=["fc2"],
        modules_to_save=["head"],
        parameters_to_save=["cls_token"],
        dropout=0.1,
        drop_path=0.1,
        learnable_coefficients=True,
    )
    again = SnellConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.kernel_coefficients == [0.5, 2.0, -0.5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\).*1.0"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\).*-0.1"),
        ({"r": 0}, r"r must be an integer >= 1, got 0"),
        ({"r": 9}, r"divisible by num_pieces.*r=9, num_pieces=2"),
        ({"kernel": "cubic"}, r"kernel must be one of .*'cubic'"),
        ({"sparsify_mode": "hard"}, r"sparsify_mode must be one of .*'hard'"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
        ({"drop_path": -1}, r"drop_path must be in \[0, 1\)"),
        ({"target_modules": "(unclosed"}, r"not a valid regular expression"),
        ({"target_modules": [1, 2]}, r"target_modules must be a list of names"),
        ({"kernel": "rbf", "coefficients": [1.0]}, r"kernel 'rbf' takes 3 coefficients, got 1"),
        ({"sparsity": False}, r"sparsity must be in \[0, 1\).*False"),
        ({"split_fused_qkv": "no"}, r"split_fused_qkv must be True or False, got 'no'"),
        ({"learnable_coefficients": 1}, r"learnable_coefficients must be True or False, got 1"),
        ({"coefficients": [float("nan"), -0.1]}, r"coefficients must be finite numbers, got \[nan, -0.1\]"),
        ({"kernel": "rbf", "coefficients": [1.0, float("inf"), -1.0]}, r"coefficients must be finite"),
        ({"kernel": "mixk", "coefficients": [0.1, -0.1, 1.0, 0.0, 0.0]}, r"mixk's γ \(coefficients\[3\]\) divides D"),
        ({"format_version": FORMAT_VERSION + 1}, r"format_version .* upgrade snell"),
        ({"format_version": "1"}, r"format_version must be an integer, got '1'"),
        ({"format_version": True}, r"format_version must be an integer, got True"),
        ({"coefficients": 0.1}, r"coefficients must be a list of 2 numbers \(or None\), got 0.1"),
        ({"coefficients": [1, None]}, r"coefficients must be a list of 2 numbers .*got \[1, None\]"),
        ({"coefficients": ["a", "b"]}, r"coefficients must be a list of 2 numbers"),
        ({"coefficients": [True, 0.1]}, r"coefficients must be a list of 2 numbers"),
    ],
)
def test_bad_values_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SnellConfig(**kwargs)


def test_from_json_rejects_unknown_keys_and_newer_versions():
    with pytest.raises(ValueError, match="unknown SNELL config keys"):
        SnellConfig.from_dict({"r": 8, "rank_pattern": {}})
    with pytest.raises(ValueError, match="upgrade snell"):
        SnellConfig.from_dict({"format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="not valid JSON"):
        SnellConfig.from_json("{r: 8")


def test_linear_kernel_needs_no_divisibility_and_defaults_to_lora_scale():
    cfg = SnellConfig(r=5, kernel="linear")
    assert cfg.kernel_coefficients == [1.0]
    assert default_coefficients("piecewise_linear", 4) == [0.1, -0.1, 0.1, -0.1]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("sparsity", 1.0, r"sparsity must be in \[0, 1\).*1.0"),
        ("r", 7, r"divisible by num_pieces.*r=7"),
        ("kernel", "rbf", r"kernel 'rbf' takes 3 coefficients, got 2"),
        ("target_modules", "(unclosed", r"not a valid regular expression"),
    ],
)
def test_assignment_is_validated_and_a_rejected_one_changes_nothing(name, value, message):
    cfg = SnellConfig(coefficients=[0.2, -0.2])
    before = cfg.to_dict()
    with pytest.raises(ValueError, match=message):
        setattr(cfg, name, value)
    assert cfg.to_dict() == before


def test_valid_assignments_and_replace_still_work():
    cfg = SnellConfig()
    cfg.sparsity = 0.5
    cfg.target_modules = ("qkv", "fc1")  # normalised as on creation
    assert cfg.sparsity == 0.5 and cfg.target_modules == ["qkv", "fc1"]
    assert SnellConfig.from_json(cfg.to_json()) == cfg
    other = dataclasses.replace(cfg, kernel="rbf", coefficients=None)  # changing fields that depend on each other
    assert other.kernel_coefficients == [1.0, 1.0, -1.0] and cfg.kernel == "piecewise_linear"
    with pytest.raises(ValueError, match=r"r must be an integer >= 1, got 0"):
        dataclasses.replace(cfg, r=0)
    clone = copy.deepcopy(cfg)
    clone.r = 16
    assert clone.r == 16 and cfg.r == 8


def test_assigning_a_field_that_does_not_exist_is_refused():
    """A typo would otherwise set a new attribute and leave the field it meant as it was."""
    cfg = SnellConfig()
    with pytest.raises(AttributeError, match=r"SnellConfig has no field 'sparsty'; did you mean 'sparsity'\?"):
        cfg.sparsty = 0.5
    assert cfg.to_dict() == SnellConfig().to_dict() and not hasattr(cfg, "sparsty")


def test_a_list_entry_matches_whole_dotted_parts():
    """`proj` selects `attn.proj`, never `q_proj`: a suffix counts only at a dot."""
    assert name_matches("blocks.0.attn.proj", ["proj"]) and name_matches("proj", ["proj"])
    assert not name_matches("self_attn.q_proj", ["proj"])
    assert name_matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
