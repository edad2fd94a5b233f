"""Where SNELL adapters go by default (``target_modules`` None): the reference code's choice per model family, and
every projection of the repeated blocks for any other model.

Each family preset is a regular expression over full module names, matching the layers the reference code adapts
(timm ViT/Swin: q, k, v, attn.proj, mlp.fc1, mlp.fc2, or EVA-02's separate q/k/v and SwiGLU fc1_g/fc1_x;
ConvNeXt: the pointwise MLP), or the convs of CNN blocks (EfficientNet/MobileNet: pointwise; ResNet/ResNeXt,
RegNet: every block conv). Families are recognised by class names, so the core never imports timm or
transformers. Every other model gets the block rule (:func:`block_preset`), which gives transformers' LLaMA, BERT
and GPT-2 the reference code's layers and other families all of theirs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from snell.layers import adapter_refusal, describe_support, takes_adapter


@dataclass(frozen=True)
class Preset:
    name: str
    class_keywords: tuple[str, ...]
    pattern: str

    def matches(self, module_name: str) -> bool:
        return re.fullmatch(self.pattern, module_name) is not None


PRESETS: tuple[Preset, ...] = (
    Preset(
        "timm_vit",
        ("VisionTransformer", "SwinTransformer", "Deit", "Eva", "Beit"),
        r"(.*\.)?blocks\.\d+\.(attn\.(qkv|q_proj|k_proj|v_proj|q|kv|proj)|mlp\.(fc1|fc1_g|fc1_x|fc2))",
    ),
    Preset("timm_convnext", ("ConvNeXt",), r"(.*\.)?stages\.\d+\.blocks\.\d+\.mlp\.(fc1|fc2)"),
    Preset(
        "timm_efficientnet",
        ("EfficientNet", "MobileNet"),
        # conv_pw/conv_pwl of inverted-residual and depthwise-separable blocks; MobileNetV4's universal
        # inverted residuals (pw_exp/pw_proj) and its hybrids' 1x1 attention projections (query/key/value/output)
        r"(.*\.)?blocks\.\d+\.\d+\.(conv_pw|conv_pwl|pw_exp\.conv|pw_proj\.conv|attn\.(query|key|value|output)\.proj)"
        r"|(.*\.)?conv_head",
    ),
    # Every conv of the residual blocks (BasicBlock: two 3x3; Bottleneck: 1x1, 3x3 (grouped in ResNeXt),
    # 1x1): unlike EfficientNet, ResNet-18/34 blocks have no pointwise conv to restrict to. Stem and
    # downsample (shortcut) convs stay frozen.
    Preset("timm_resnet", ("ResNet",), r"(.*\.)?layer\d+\.\d+\.conv\d"),
    # RegNetX/Y: the 1x1, grouped 3x3 and 1x1 conv of every block (not the SE, stem or shortcut convs).
    Preset("timm_regnet", ("RegNet",), r"(.*\.)?s\d+\.b\d+\.conv\d\.conv"),
)


def detect_preset(model: nn.Module) -> Preset:
    """The preset for ``model``: its family's, when a family names its class and every module the family's pattern
    matches takes an adapter; else the block rule (:func:`block_preset`)."""
    class_names = [cls.__name__ for cls in type(model).__mro__]
    modules = dict(model.named_modules())
    for preset in PRESETS:
        if not any(key in cls for cls in class_names for key in preset.class_keywords):
            continue
        matched = [name for name in modules if name and preset.matches(name)]
        if matched and all(takes_adapter(n, modules[n], modules[n.rpartition(".")[0]]) for n in matched):
            return preset
    return block_preset(model)


def _block_layer(name: str, module: nn.Module, parent: nn.Module) -> bool:
    """A layer the block rule adapts: one SNELL takes, and not a depthwise conv (a k×k matrix per channel, which
    the reference code's CNN presets never adapt)."""
    if not takes_adapter(name, module, parent):
        return False
    return not (isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels)


def declared_classifiers(model: nn.Module) -> list[str]:
    """The classifier modules timm declares for ``model`` (``pretrained_cfg["classifier"]``: a name, or a distilled
    model's two), or none."""
    declared = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    names = [declared] if isinstance(declared, str) else list(declared) if isinstance(declared, (tuple, list)) else []
    return names if all(isinstance(name, str) for name in names) else []


def block_preset(model: nn.Module) -> Preset:
    """The block rule: every linear layer (and conv, but depthwise) inside the entries of the model's outermost
    ``nn.ModuleList``/``nn.Sequential`` containers, the repeated blocks: a transformers model's ``layers``/``layer``/
    ``h``/``block``, a CNN's stages. That is what the reference code adapts in ViT, BERT and LLaMA (every
    projection of attention and MLP), so any other transformer family gets the same: OPT's ``out_proj``/``fc1``/``fc2``,
    DeBERTa's ``query_proj``, GPT-NeoX's ``query_key_value``, a hybrid's linear-attention projections. Embeddings,
    stems and heads outside the blocks stay as they are, and so does a classifier timm declares inside a container
    (MetaFormer's ``head.fc.fc2``, which a new task replaces and ``task_type="IMAGE_CLS"`` trains in full). The
    pattern names exactly those layers (``peft`` stores it in its adapter config). ValueError when there are none."""
    modules = dict(model.named_modules())
    blocks: dict[str, list[str]] = {}  # container name -> names of its entries that are blocks
    inside: list[str] = []  # prefixes of the blocks found so far: their nested containers belong to them
    for name, module in modules.items():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or name.startswith(tuple(inside)):
            continue
        prefix = f"{name}." if name else ""
        entries = [
            key
            for key, entry in module.named_children()
            if any(
                _block_layer(n, sub, entry.get_submodule(n.rpartition(".")[0])) for n, sub in entry.named_modules() if n
            )
        ]
        if entries:
            blocks[name] = entries
            inside.extend(f"{prefix}{key}." for key in entries)
    in_blocks = tuple(inside)
    classifiers = tuple(f"{name}." for name in declared_classifiers(model))
    layers = [
        n
        for n, m in modules.items()
        if n.startswith(in_blocks)
        and not f"{n}.".startswith(classifiers)
        and _block_layer(n, m, modules[n.rpartition(".")[0]])
    ]
    if not layers:
        refusals = (
            adapter_refusal(n, m, modules[n.rpartition(".")[0]]) for n, m in modules.items() if describe_support(m)
        )
        refused = next((err for err in refusals if err is not None), None)
        raise ValueError(
            f"no SNELL preset fits model class {type(model).__name__}: no family preset names it, and it has no "
            "nn.ModuleList/nn.Sequential blocks with linear or conv layers that take an adapter"
            + (f" ({refused})" if refused is not None else "")
            + "; pass target_modules explicitly"
        )
    return Preset("blocks", (), _pattern_for(blocks, layers, list(modules)))


def _pattern_for(blocks: dict[str, list[str]], layers: list[str], names: list[str]) -> str:
    """A regex that fully matches exactly ``layers`` among ``names``: per container, its block keys (``\\d+`` when
    they are all digits) and the layers' names within a block; the names themselves where that would match more."""
    parts = []
    for container, keys in blocks.items():
        prefix = f"{container}." if container else ""
        within = sorted(
            {
                n[len(prefix) :].partition(".")[2]
                for n in layers
                if n.startswith(prefix) and n[len(prefix) :].partition(".")[0] in keys
            }
        )
        if not within:
            continue
        key = r"\d+" if all(k.isdigit() for k in keys) else "|".join(re.escape(k) for k in keys)
        parts.append(f"{re.escape(prefix)}({key})\\.({'|'.join(re.escape(w) for w in within)})")
    pattern = "|".join(parts)
    if [n for n in names if n and re.fullmatch(pattern, n)] == layers:
        return pattern
    return "|".join(re.escape(n) for n in layers)
