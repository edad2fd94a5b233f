"""The default targets (``target_modules=None``): a family's preset where its class names it and every layer it
names takes an adapter, else every linear layer and conv (but depthwise) inside the model's repeated blocks."""

import json
import re

import pytest
import timm
import torch
from torch import nn

import snell
from snell.presets import block_preset, detect_preset


class _Block(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        return x + self.mlp(self.attn(x))


class _Net(nn.Module):
    """An embedding, repeated blocks and a head: a model no family preset names."""

    def __init__(self, depth=2, width=8):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _adapted(model: nn.Module) -> list[str]:
    return [name for name, _ in snell.snell_layers(model)]


def test_every_linear_layer_inside_the_blocks_and_nothing_outside_them():
    model = _Net(depth=3)
    snell.get_snell_model(model, snell.SnellConfig(r=2))
    expected = [f"blocks.{i}.{n}" for i in range(3) for n in ("attn", "mlp.0", "mlp.2")]
    assert sorted(_adapted(model)) == sorted(expected)


def test_one_block_is_enough_and_a_sequential_model_is_its_own_container():
    assert sorted(_adapted(snell.get_snell_model(_Net(depth=1), snell.SnellConfig(r=2)))) == [
        "blocks.0.attn", "blocks.0.mlp.0", "blocks.0.mlp.2",
    ]  # fmt: skip
    model = nn.Sequential(_Block(), _Block(), nn.Linear(8, 3))  # the head, a layer itself, is no block
    snell.get_snell_model(model, snell.SnellConfig(r=2))
    assert sorted(_adapted(model)) == ["0.attn", "0.mlp.0", "0.mlp.2", "1.attn", "1.mlp.0", "1.mlp.2"]


def test_the_pattern_matches_the_layers_whole_and_nothing_else():
    """peft stores the pattern and matches it against every module name, its own (lora_A, base_layer) included."""
    model = _Net()
    pattern = detect_preset(model).pattern
    names = [n for n, _ in model.named_modules() if n and re.fullmatch(pattern, n)]
    assert names == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn", "mlp.0", "mlp.2")]
    for other in (
        "blocks.0.attn.base_layer",
        "blocks.0.attn_drop",
        "xblocks.0.attn",
        "blocks.0.mlp.1",
        "blocks.0.x.attn",
    ):
        assert re.fullmatch(pattern, other) is None


class _Wrapped(nn.Module):
    """A conv-norm-style wrapper: a module of its own, not a layer, with the layer inside."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(8, 8)


class _OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _Wrapped()


def test_a_name_that_is_a_layer_in_one_block_and_a_wrapper_in_another_gets_the_exact_names():
    model = _Net()
    model.blocks.append(_OddBlock())  # blocks.2.attn is a wrapper; its layer is blocks.2.attn.attn
    pattern = block_preset(model).pattern
    snell.get_snell_model(model, snell.SnellConfig(r=2))
    assert "blocks.2.attn.attn" in _adapted(model) and "blocks.2.attn" not in _adapted(model)
    assert [n for n, _ in _Net().named_modules() if re.fullmatch(pattern, n)] == [
        f"blocks.{i}.{n}" for i in range(2) for n in ("attn", "mlp.0", "mlp.2")
    ]


class _OwnForward(nn.Linear):
    def forward(self, x):  # a router-like Linear that does more than x·Wᵀ + b
        return torch.softmax(super().forward(x), -1)


def test_layers_snell_refuses_are_left_out_instead_of_failing_the_default():
    """A Linear subclass with its own forward, nn.MultiheadAttention's out_proj (read without calling it), a
    depthwise conv and convs whose padding SNELL refuses: an explicit target would be refused; the default leaves
    them frozen."""
    model = _Net()
    model.blocks[0].router = _OwnForward(8, 4)
    model.blocks[1].mha = nn.MultiheadAttention(8, 2)
    model.blocks[1].depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    model.blocks[1].grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # a grouped (not depthwise) conv is adapted
    model.blocks[1].reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")  # refused by build_spec
    model.blocks[1].same = nn.Conv2d(8, 8, 3, padding="same")  # refused too ("give explicit integer padding")
    adapted = set(_adapted(snell.get_snell_model(model, snell.SnellConfig(r=2))))
    assert "blocks.1.grouped" in adapted
    assert not adapted & {"blocks.0.router", "blocks.1.mha.out_proj", "blocks.1.depthwise", "blocks.1.reflect"}
    assert "blocks.1.same" not in adapted
    explicit = _Net()
    explicit.blocks[0].router = _OwnForward(8, 4)
    with pytest.raises(TypeError, match="does more than"):
        snell.get_snell_model(explicit, snell.SnellConfig(target_modules=["router"]))


def test_a_module_shared_between_blocks_is_adapted_once():
    """named_modules lists a shared module once, under its first name (timm's CoaT shares its conv position
    encodings between blocks); the rule must not look it up under the second."""
    model = _Net()
    model.blocks = nn.ModuleList([_OddBlock(), _OddBlock()])
    model.blocks[1].attn = model.blocks[0].attn  # a module with a layer inside: that layer's parent has one name
    snell.get_snell_model(model, snell.SnellConfig(r=2))
    assert _adapted(model) == ["blocks.0.attn.attn"]


def test_a_model_without_blocks_is_refused_naming_its_class_and_left_as_it_was():
    flat = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    state = {k: v.clone() for k, v in flat.state_dict().items()}
    with pytest.raises(ValueError, match=r"no SNELL preset fits model class Sequential.*pass target_modules"):
        snell.get_snell_model(flat, snell.SnellConfig())
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), num_layers=2, enable_nested_tensor=False)
    # every Linear there is read without its forward: the message says so, naming the first
    message = r"no SNELL preset fits model class TransformerEncoder.* \(module 'layers.0.self_attn.out_proj' belongs"
    with pytest.raises(ValueError, match=message):
        snell.get_snell_model(encoder, snell.SnellConfig())
    assert not any(True for _ in snell.snell_layers(flat))
    assert all(torch.equal(v, state[k]) for k, v in flat.state_dict().items())


def test_a_class_named_like_a_family_whose_pattern_matches_nothing_gets_the_block_rule():
    """transformers' CLIPVisionTransformer is named like timm's ViT, with a causal LM's layer names."""

    class MyVisionTransformer(_Net):
        pass

    assert detect_preset(MyVisionTransformer()).name == "blocks"


def _timm(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()


def test_a_family_whose_pattern_names_a_wrapper_gets_the_block_rule():
    """timm builds ResNeSt with its ResNet class, whose conv2 is a split-attention module (a grouped conv and two
    1x1 attention convs): the ResNet preset named it and the default raised TypeError. Same for SK-ResNet's
    selective-kernel conv1. Now their block convs are adapted, the stem and head are not, and the model trains and
    merges."""
    model = _timm("resnest14d", zero_init_last=False)  # a zero last BN would cut the residual branch's gradient
    x = torch.randn(2, 3, 32, 32)
    snell.get_snell_model(model, snell.SnellConfig(r=4, sparsity=0.5))
    adapted = _adapted(model)
    assert {"layer1.0.conv2.conv", "layer1.0.conv2.fc1", "layer1.0.conv2.fc2", "layer1.0.conv3"} <= set(adapted)
    assert all(n.startswith(("layer1.", "layer2.", "layer3.", "layer4.")) for n in adapted)
    with torch.no_grad():
        for _, layer in snell.snell_layers(model):
            layer.B.mul_(30)
    out = model(x)
    out.sum().backward()
    assert all(layer.A.grad.abs().sum() > 0 for _, layer in snell.snell_layers(model))
    torch.testing.assert_close(snell.merge_and_unload(model)(x), out.detach(), rtol=1e-4, atol=1e-4)
    sk = _timm("skresnet18")
    snell.get_snell_model(sk, snell.SnellConfig(r=4))
    assert {"layer1.0.conv1.paths.0.conv", "layer1.0.conv1.paths.1.conv", "layer1.0.conv2.conv"} <= set(_adapted(sk))


def test_a_cnn_no_preset_names_gets_its_block_convs_not_its_head_alone():
    """GhostNet matched the EfficientNet preset on its conv_head alone (the preset matching most names), and trained
    one layer; now every block conv but the depthwise ones."""
    model = _timm("ghostnet_050")
    snell.get_snell_model(model, snell.SnellConfig(r=4))
    adapted = _adapted(model)
    assert "conv_head" not in adapted and len(adapted) > 40
    layers = dict(model.named_modules())
    assert not any(layers[n].groups > 1 and layers[n].groups == layers[n].in_channels for n in adapted)
    assert any(n.endswith("primary_conv.0") for n in adapted)


def test_a_classifier_timm_declares_inside_a_container_is_left_to_the_head_and_trains_in_full():
    """MetaFormer's head is an nn.Sequential whose MLP ends in the classifier (pretrained_cfg: head.fc.fc2): the
    block rule adapted it, a layer a new task replaces, and task_type="IMAGE_CLS" was refused for the clash. Its
    pre-logits layer (head.fc.fc1) keeps its adapter."""
    with torch.device("meta"):
        caformer = timm.create_model("caformer_s18", num_classes=3)
    pattern = block_preset(caformer).pattern
    head = [name for name, _ in caformer.named_modules() if name.startswith("head") and re.fullmatch(pattern, name)]
    assert head == ["head.fc.fc1"] and caformer.pretrained_cfg["classifier"] == "head.fc.fc2"

    model = _Net()
    model.head = nn.Sequential(nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3)))
    model.pretrained_cfg = {"classifier": "head.1.2"}
    snell.get_snell_model(model, snell.SnellConfig(r=2, task_type="IMAGE_CLS"))
    assert "head.1.0" in _adapted(model) and "head.1.2" not in _adapted(model)
    trained = {name for name, param in model.named_parameters() if param.requires_grad and "snell_" not in name}
    assert trained == {"head.1.2.weight", "head.1.2.bias"}


def test_the_timm_presets_are_kept_where_they_apply():
    """The reference code's choices stand for the families it covers: ViT's q/k/v/proj/fc1/fc2 only, not Swin's
    patch merging; EfficientNet's pointwise convs and conv_head, not its depthwise or SE convs."""
    assert detect_preset(_timm("vit_tiny_patch16_224", depth=1, img_size=32)).name == "timm_vit"
    assert detect_preset(_timm("efficientnet_lite0")).name == "timm_efficientnet"
    assert detect_preset(_timm("resnet18")).name == "timm_resnet"
    pvt = _timm("pvt_v2_b0")  # its attention is q and kv, not qkv
    snell.get_snell_model(pvt, snell.SnellConfig(r=4))
    assert {"stages.0.blocks.0.attn.q", "stages.0.blocks.0.attn.kv"} <= set(_adapted(pvt))


def test_a_layer_registered_under_two_names_merges_and_a_tied_weight_is_still_refused():
    """CoaT uses one MLP in two branches: its layers are adapted once and act at both uses, so merging gives the same
    outputs; merging used to be refused as if two modules tied one weight. Two modules sharing a weight still are."""
    torch.manual_seed(0)
    model = _Net().eval()
    model.blocks[1].mlp = model.blocks[0].mlp
    x = torch.randn(3, 4)
    snell.get_snell_model(model, snell.SnellConfig(r=2, sparsity=0.5))
    assert sorted(_adapted(model)) == ["blocks.0.attn", "blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.attn"]
    with torch.no_grad():
        for _, layer in snell.snell_layers(model):
            layer.B.mul_(30)
        adapted = model(x)
        torch.testing.assert_close(snell.merge_and_unload(model)(x), adapted, rtol=1e-5, atol=1e-6)
    tied = _Net()
    tied.blocks[1].attn.weight = tied.blocks[0].attn.weight
    snell.get_snell_model(tied, snell.SnellConfig(r=2, target_modules=["blocks.0.attn"]))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.weight is shared with blocks\.1\.attn\.weight"):
        snell.merge_and_unload(tied)


def test_loading_a_file_that_adapts_fewer_layers_than_the_block_rule_says_the_default_may_have_changed(tmp_path):
    """An adapter saved with target_modules=None before the block rule covers fewer layers than the rule selects now:
    it loads what it holds, and the warning names that cause beside a mix-up of base models."""
    old = _Net()
    snell.get_snell_model(old, snell.SnellConfig(r=2, exclude_modules=["mlp.2"]))  # stands in for a narrower default
    snell.save_adapter(old, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["exclude_modules"] = None  # as the older default wrote it: target_modules None, nothing excluded
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="before the default became every projection of the blocks"):
        model = snell.load_adapter(_Net(), tmp_path)
    assert sorted(_adapted(model)) == ["blocks.0.attn", "blocks.0.mlp.0", "blocks.1.attn", "blocks.1.mlp.0"]
