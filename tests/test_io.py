import json
import os
import warnings

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import snell
from snell.config import FORMAT_VERSION
from snell.io import CONFIG_NAME, WEIGHTS_NAME, tensors_digest


def _vit(embed_dim=192, seed=0, depth=2):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, depth=depth, embed_dim=embed_dim
    )


@pytest.fixture
def saved(tmp_path):
    model = snell.get_snell_model(_vit(), snell.SnellConfig(sparsity=0.5, modules_to_save=["head"]))
    snell.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _assert_unchanged(model, snapshot):
    state, types = snapshot
    assert [type(m) for m in model.modules()] == types
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not list(snell.snell_layers(model))


def test_config_file_is_a_plain_snell_config(saved):
    cfg = snell.SnellConfig.from_json((saved / CONFIG_NAME).read_text())
    assert cfg.sparsity == 0.5 and cfg.modules_to_save == ["head"]
    tensors = load_file(saved / WEIGHTS_NAME)
    assert "blocks.0.attn.qkv.snell_A" in tensors and "head.weight" in tensors
    assert not any(k.endswith(".weight") and "head" not in k for k in tensors)  # no base weights


def test_adapter_for_another_architecture_is_refused(saved):
    other = _vit(embed_dim=96)
    snapshot = _snapshot(other)
    with pytest.raises(ValueError, match=r"made for another architecture: layer 'blocks.0.attn.qkv'"):
        snell.load_adapter(other, saved)
    _assert_unchanged(other, snapshot)


def test_adapter_naming_a_missing_module_is_refused(saved):
    other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, depth=1)
    snapshot = _snapshot(other)
    with pytest.raises(ValueError, match=r"has no module 'blocks.1.attn.qkv'"):
        snell.load_adapter(other, saved)
    _assert_unchanged(other, snapshot)


def test_head_of_another_size_is_refused(saved):
    other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=7, depth=2)
    snapshot = _snapshot(other)
    with pytest.raises(ValueError, match=r"head.weight should have shape \(7, 192\)"):
        snell.load_adapter(other, saved)
    _assert_unchanged(other, snapshot)


@pytest.mark.parametrize(
    ("edit", "unused"),
    [({"modules_to_save": None}, "head.bias"), ({"kernel": "piecewise_linear"}, "blocks.0.attn.proj.snell_mix")],
)
def test_a_config_that_leaves_trained_tensors_unread_is_refused(tmp_path, edit, unused):
    """The checksum covers the tensors, not the config: an edited adapter_config.json (no modules_to_save, mixk's
    kernel changed) loaded, dropping the trained head or mixk's (α, γ, β) without a word."""
    config = snell.SnellConfig(kernel="mixk", sparsity=0.5, modules_to_save=["head"])
    snell.save_adapter(snell.get_snell_model(_vit(), config), tmp_path)
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**record, **edit}))
    other = _vit()
    snapshot = _snapshot(other)
    with pytest.raises(
        ValueError, match=rf"holds \d+ tensor\(s\) that .*{CONFIG_NAME} does not use \(e\.g\. '{unused}'\)"
    ):
        snell.load_adapter(other, tmp_path)
    _assert_unchanged(other, snapshot)


def test_layer_sparsity_naming_a_layer_the_adapter_does_not_hold_is_refused(saved):
    """get_snell_model refuses such a config; load_adapter loaded it and left the layer at the config's sparsity."""
    config = json.loads((saved / CONFIG_NAME).read_text())
    config["layer_sparsity"] = {"qkv": [0.9, 0.9, 0.9]}  # a short name, not blocks.0.attn.qkv
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    other = _vit()
    snapshot = _snapshot(other)
    with pytest.raises(ValueError, match=r"adapter_config.json: layer_sparsity names \['qkv'\], which are not among"):
        snell.load_adapter(other, saved)
    _assert_unchanged(other, snapshot)


def test_parameters_to_save_round_trip(tmp_path):
    config = snell.SnellConfig(sparsity=0.5, modules_to_save=["head"], parameters_to_save=["cls_token"])
    model = snell.get_snell_model(_vit(), config)
    with torch.no_grad():
        model.cls_token.normal_()
    snell.save_adapter(model, tmp_path / "adapter")
    assert torch.equal(load_file(tmp_path / "adapter" / WEIGHTS_NAME)["cls_token"], model.cls_token)
    loaded = snell.load_adapter(_vit(), tmp_path / "adapter")  # same base weights, cls_token as initialised
    assert torch.equal(loaded.cls_token, model.cls_token) and loaded.cls_token.requires_grad
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), atol=0, rtol=0)


def test_saved_parameter_of_another_shape_is_refused(tmp_path):
    config = snell.SnellConfig(sparsity=0.5, parameters_to_save=["cls_token"])
    snell.save_adapter(snell.get_snell_model(_vit(), config), tmp_path / "adapter")
    path = tmp_path / "adapter" / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["cls_token"] = torch.zeros(1, 1, 7)
    save_file(tensors, str(path), metadata={**metadata, "tensors_sha256": tensors_digest(tensors)})
    other = _vit()
    snapshot = _snapshot(other)
    with pytest.raises(
        ValueError, match=r"cls_token should have shape \(1, 1, 192\) for this model, found \(1, 1, 7\)"
    ):
        snell.load_adapter(other, tmp_path / "adapter")
    _assert_unchanged(other, snapshot)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_file_is_refused(saved, damage):
    path = saved / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x13" * 200, "empty": b""}[damage])
    model = _vit()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        snell.load_adapter(model, saved)
    _assert_unchanged(model, snapshot)


def test_newer_format_versions_are_refused(saved):
    model = _vit()
    snapshot = _snapshot(model)
    config = json.loads((saved / CONFIG_NAME).read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="upgrade snell"):
        snell.load_adapter(model, saved)
    config["format_version"] = FORMAT_VERSION
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    tensors = load_file(saved / WEIGHTS_NAME)
    with safe_open(str(saved / WEIGHTS_NAME), "pt") as f:
        metadata = dict(f.metadata())
    metadata["format_version"] = str(FORMAT_VERSION + 1)
    save_file(tensors, saved / WEIGHTS_NAME, metadata=metadata)
    with pytest.raises(ValueError, match=r"format_version 2.*upgrade snell"):
        snell.load_adapter(model, saved)
    _assert_unchanged(model, snapshot)


def test_a_file_that_is_not_a_snell_adapter(tmp_path, saved):
    save_file({"w": torch.zeros(2)}, saved / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="not a SNELL adapter file"):
        snell.load_adapter(_vit(), saved)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json is missing"):
        snell.load_adapter(_vit(), tmp_path / "nowhere")


def test_failed_saves_leave_existing_files_alone(saved):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(ValueError, match="has no SNELL adapters"):
        snell.save_adapter(_vit(), saved)
    merged = snell.merge_adapters(snell.get_snell_model(_vit(), snell.SnellConfig()))
    with pytest.raises(ValueError, match="unmerge"):
        snell.save_adapter(merged, saved)
    # a training record JSON cannot write used to fail after the new weights had replaced the old ones
    other = snell.get_snell_model(_vit(seed=1), snell.SnellConfig(r=16, modules_to_save=["head"]))
    with pytest.raises(ValueError, match="cannot be written as JSON"):
        snell.save_adapter(other, saved, training={"lr": object()})
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_a_compiled_models_adapter_records_the_models_own_names(tmp_path):
    """torch.compile wraps the model (its modules become ``_orig_mod.*``); the adapter must load into the plain
    model, and into a compiled one."""
    model = snell.get_snell_model(_vit(), snell.SnellConfig(sparsity=0.5, modules_to_save=["head"]))
    snell.save_adapter(torch.compile(model), tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert record["adapted_modules"] == [name for name, _ in snell.snell_layers(model)]
    assert record["base_model"]["class"] == "timm.models.vision_transformer.VisionTransformer"
    for fresh in (_vit(), torch.compile(_vit())):  # the base weights the adapter was trained on
        loaded = snell.load_adapter(fresh, tmp_path / "adapter")
        assert loaded is fresh
        state = getattr(loaded, "_orig_mod", loaded).state_dict()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_a_flipped_byte_in_the_tensor_data_is_refused(saved):
    path = saved / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header size, JSON header, tensor data
    data[(data_start + len(data)) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    model = _vit()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} is corrupt: its tensors do not match the sha256"):
        snell.load_adapter(model, saved)
    _assert_unchanged(model, snapshot)


def test_adapters_saved_before_checksums_and_base_model_records_still_load(saved):
    metadata, tensors = _read(saved / WEIGHTS_NAME)
    del metadata["tensors_sha256"]
    save_file(tensors, saved / WEIGHTS_NAME, metadata=metadata)
    config = json.loads((saved / CONFIG_NAME).read_text())
    (saved / CONFIG_NAME).write_text(snell.SnellConfig.from_dict(config).to_json())  # the old file: config only
    model = _vit()
    with pytest.warns(UserWarning, match="records no checksum"):
        snell.load_adapter(model, saved)
    assert torch.equal(model.blocks[0].attn.qkv.A, tensors["blocks.0.attn.qkv.snell_A"])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_adapter_files_respect_the_umask(tmp_path, umask):
    model = snell.get_snell_model(_vit(), snell.SnellConfig(sparsity=0.5))
    previous = os.umask(umask)
    try:
        snell.save_adapter(model, tmp_path)
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        WEIGHTS_NAME: 0o666 & ~umask,
        CONFIG_NAME: 0o666 & ~umask,
    }


def test_config_file_records_the_base_model_and_the_adapted_layers(saved):
    config = json.loads((saved / CONFIG_NAME).read_text())
    assert config["target_modules"] is None  # the preset chose them: the file says which
    assert config["adapted_modules"] == [
        f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    assert config["base_model"]["class"] == "timm.models.vision_transformer.VisionTransformer"
    assert config["base_model"]["name_or_path"].startswith("vit_tiny_patch16_224.")  # timm architecture.tag


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class OtherMlp(Mlp):
    """Another model whose layers have the same names and shapes."""


def test_loading_into_another_model_class_with_the_same_shapes_warns(tmp_path):
    snell.save_adapter(snell.get_snell_model(Mlp(), snell.SnellConfig(target_modules=["fc1", "fc2"])), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        snell.load_adapter(Mlp(), tmp_path)
    with pytest.warns(
        UserWarning, match=r"saved from a [\w.]*\.Mlp and is loaded into a [\w.]*\.OtherMlp: the layer shapes match"
    ):
        model = snell.load_adapter(OtherMlp(), tmp_path)
    assert [n for n, _ in snell.snell_layers(model)] == ["fc1", "fc2"]


def test_loading_into_a_deeper_model_of_the_same_widths_warns_about_the_layers_left_out(saved):
    """Every layer of the file exists in a 3-block ViT, so it loads; but the preset selects block 2 too, which the
    adapter does not cover: a likely mix-up of base models, said once."""
    message = r"adapts 8 layers, but its target_modules select 12 in this VisionTransformer \(e.g. 'blocks\.2\."
    with pytest.warns(UserWarning, match=message) as caught:
        snell.load_adapter(_vit(depth=3), saved)
    assert not any("before the default became" in str(w.message) for w in caught)  # the ViT preset never changed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model it was saved from: no warning
        snell.load_adapter(_vit(), saved)


def test_a_header_that_retypes_a_factor_is_refused_as_corrupt(tmp_path):
    """The digest covers each tensor's name, dtype and shape, not only its bytes: a header edited so that a float32
    factor reads as int32 (the same byte length) is refused, and the model is not changed."""

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))

    snell.save_adapter(snell.get_snell_model(model(), snell.SnellConfig(r=4, target_modules=["0", "2"])), tmp_path)
    path = tmp_path / WEIGHTS_NAME
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    assert header["0.snell_A"]["dtype"] == "F32"
    header["0.snell_A"]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(raw[:8] + text.ljust(size) + raw[8 + size :])
    fresh = model()
    with pytest.raises(ValueError, match="is corrupt"):
        snell.load_adapter(fresh, tmp_path)
    assert list(snell.snell_layers(fresh)) == []


class _Distilled(nn.Module):
    """A distilled classifier as timm declares one (DeiT, LeViT): two heads, averaged in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.pretrained_cfg = {"classifier": ("head", "head_dist")}
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.head, self.head_dist = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(x)
        return (self.head(features) + self.head_dist(features)) / 2


def test_both_heads_of_a_distilled_model_are_saved_and_an_adapter_holding_one_loads_with_a_warning(tmp_path):
    torch.manual_seed(0)
    model = snell.get_snell_model(
        _Distilled(), snell.SnellConfig(r=2, target_modules=["blocks.0"], task_type="IMAGE_CLS")
    )
    with torch.no_grad():
        for head in (model.head, model.head_dist):
            head.weight.add_(1.0)
    x = torch.randn(4, 8)
    snell.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    loaded = snell.load_adapter(_Distilled(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    # a file saved when only the first head was trained and saved: it loads, and head_dist stays the model's own
    metadata, tensors = _read(tmp_path / WEIGHTS_NAME)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("head_dist.")}
    save_file(tensors, tmp_path / WEIGHTS_NAME, metadata={**metadata, "tensors_sha256": tensors_digest(tensors)})
    torch.manual_seed(0)
    fresh = _Distilled()
    own = fresh.head_dist.weight.detach().clone()
    with pytest.warns(UserWarning, match="holds no 'head_dist', a head of this _Distilled"):
        snell.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.head.weight, model.head.weight) and torch.equal(fresh.head_dist.weight, own)

    # only a distilled model's second head may be missing: a model's one head never is
    tensors = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    save_file(tensors, tmp_path / WEIGHTS_NAME, metadata={**metadata, "tensors_sha256": tensors_digest(tensors)})
    single = _Distilled()
    single.pretrained_cfg = {"classifier": "head"}
    with pytest.raises(ValueError, match=r"head\.weight should have shape \(3, 8\) for this model, found None"):
        snell.load_adapter(single, tmp_path)
