"""Where SNELL adapters go by default, per model family (used when ``target_modules`` is None).

Each preset is a regular expression over full module names, matching the layers the reference code
adapts (timm ViT/Swin: q, k, v, attn.proj, mlp.fc1, mlp.fc2, or EVA-02's separate q/k/v and SwiGLU fc1_g/fc1_x;
ConvNeXt: the pointwise MLP), the convs of CNN blocks (EfficientNet/MobileNet: pointwise; ResNet/ResNeXt, RegNet:
every block conv), or the usual attention/MLP projections of a language model. Families are recognised by class
names, so the core never imports timm or transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


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
        r"(.*\.)?blocks\.\d+\.(attn\.(qkv|q_proj|k_proj|v_proj|proj)|mlp\.(fc1|fc1_g|fc1_x|fc2))",
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
    Preset(
        "hf_bert",
        ("Bert", "Roberta", "Electra", "XLMRoberta"),
        r"(.*\.)?encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
        r"|intermediate\.dense|output\.dense)",
    ),
    # transformers before 5.x: encoder.layer.N.attention.attention.query ...; from 5.x (one attention module, an
    # mlp, and for ViT itself layers.N): ...layer(s).N.attention.q_proj ... o_proj, mlp.fc1, mlp.fc2
    Preset(
        "hf_vit",
        ("ViTModel", "ViTFor", "ViTMAE", "Dinov2"),
        r"(.*\.)?encoder\.layer\.\d+\.(attention\.attention\.(query|key|value)|attention\.output\.dense"
        r"|intermediate\.dense|output\.dense)"
        r"|(.*\.)?(encoder\.layer|layers)\.\d+\.(attention\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(fc1|fc2))",
    ),
    Preset(
        "hf_llama",
        ("Llama", "Mistral", "Qwen", "Gemma", "Phi3"),
        r"(.*\.)?layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|qkv_proj|o_proj)"
        r"|mlp\.(gate_proj|up_proj|gate_up_proj|down_proj))",
    ),
    Preset("hf_gpt2", ("GPT2",), r"(.*\.)?h\.\d+\.(attn\.(c_attn|c_proj)|mlp\.(c_fc|c_proj))"),
)


def detect_preset(model: nn.Module) -> Preset:
    """The preset for ``model``'s family: by class name first, else the preset matching most modules."""
    class_names = [cls.__name__ for cls in type(model).__mro__]
    module_names = [name for name, _ in model.named_modules()]
    for preset in PRESETS:
        if any(key in cls for cls in class_names for key in preset.class_keywords) and any(
            preset.matches(n) for n in module_names
        ):
            return preset
    counts = {preset.name: sum(preset.matches(n) for n in module_names) for preset in PRESETS}
    best = max(PRESETS, key=lambda p: counts[p.name])
    if counts[best.name] == 0:
        raise ValueError(
            f"no SNELL preset fits model class {type(model).__name__}; pass target_modules explicitly "
            f"(known presets: {[p.name for p in PRESETS]})"
        )
    return best
