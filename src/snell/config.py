"""SnellConfig: every choice that defines a SNELL adapter, validated on creation and on every assignment, JSON
round-trippable."""

from __future__ import annotations

import copy
import difflib
import json
import math
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

KERNELS = ("linear", "piecewise_linear", "rbf", "sigmoid", "mixk")
#: Kernels built from the piecewise-linear distances, whose factors are split into P pieces.
PIECEWISE_KERNELS = ("piecewise_linear", "mixk")
SPARSIFY_MODES = ("reference", "mask", "soft")
#: Task types (peft's names, plus IMAGE_CLS) whose model has a newly initialised head that must be trained.
HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "IMAGE_CLS")
TASK_TYPES = (*HEAD_TASK_TYPES, "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")

#: Version of the adapter file format. Bumped when a saved adapter could be misread by older code.
FORMAT_VERSION = 1

#: Keys adapter_config.json holds beside the config's fields, for the reader's information (snell.io writes
#: them); from_dict ignores them, so the file still reads as a plain SnellConfig.
ADAPTER_FILE_KEYS = ("base_model", "adapted_modules", "training")

#: Saved configs name their method under peft's key, so that peft and snell both tell their folders apart.
METHOD_KEY, METHOD = "peft_type", "SNELL"


def _is_number(value: Any) -> bool:
    """A real number, not a bool (True would read as 1.0) nor a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def default_coefficients(kernel: str, num_pieces: int) -> list[float]:
    """The kernel coefficients used by the reference code (piecewise) or chosen to start near zero (others).

    - piecewise_linear: α_p alternating +0.1, −0.1 (the reference code's fixed (+0.1, −0.1) for P = 2);
    - linear: one scale (1.0, i.e. LoRA with lora_alpha = r);
    - rbf: (α, β, γ) = (1, 1, −1) so that κ = exp(−‖a−b‖²) − 1 starts close to 0;
    - sigmoid: (α, β, γ) = (1, 1, −0.5) so that κ = σ(a·b) − 0.5 starts close to 0;
    - mixk: the piecewise ones, then the initial (α, γ, β) = (1, 1, 0) of ΔW = D + α·softmax(D/γ) + β, as the
      authors' SNELLA module initialises them.
    """
    if kernel == "piecewise_linear":
        return [0.1 if p % 2 == 0 else -0.1 for p in range(num_pieces)]
    if kernel == "mixk":
        return [*default_coefficients("piecewise_linear", num_pieces), 1.0, 1.0, 0.0]
    if kernel == "linear":
        return [1.0]
    if kernel == "rbf":
        return [1.0, 1.0, -1.0]
    return [1.0, 1.0, -0.5]


def expected_num_coefficients(kernel: str, num_pieces: int) -> int:
    return {"piecewise_linear": num_pieces, "linear": 1, "mixk": num_pieces + 3}.get(kernel, 3)


def _checked_layer_sparsity(value: Any) -> dict[str, list[float]]:
    """``layer_sparsity`` as {name: [float, ...]}, or ValueError naming the bad entry and the allowed range."""
    if not isinstance(value, dict):
        raise ValueError(f"layer_sparsity must be a dict of module name to sparsities, got {value!r}")
    checked = {}
    for name, values in value.items():
        values = [values] if isinstance(values, (int, float)) and not isinstance(values, bool) else values
        if (
            not isinstance(name, str)
            or not isinstance(values, (list, tuple))
            or not values
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in values)
        ):
            raise ValueError(
                f"layer_sparsity[{name!r}] must be a list of sparsities in [0, 1] (one per adapter group), "
                f"got {values!r}"
            )
        checked[name] = [float(v) for v in values]
    return checked


def name_matches(name: str, selector: list[str] | str) -> bool:
    """Whether module ``name`` is selected by ``selector``: a regular expression over the full name (str), or a list
    of name suffixes, each matching whole dotted parts (``proj`` selects ``attn.proj``, not ``q_proj``)."""
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == s or name.endswith("." + s) for s in selector)


def unmatched(selectors: Sequence[str], names: Iterable[str]) -> list[str]:
    """The entries of a list of name suffixes that match none of ``names``: a typo in one would silently
    adapt, exclude, spare or save less than asked."""
    names = list(names)
    return [s for s in selectors if not any(name_matches(n, [s]) for n in names)]


def _check_format_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"this adapter config has format_version {version}, but this snell reads versions <= {FORMAT_VERSION}; "
            "upgrade snell to load it"
        )


@dataclass
class SnellConfig:
    """Configuration of SNELL adapters.

    Attributes:
        r: rank of the factors A (in_features × r) and B (out_features × r).
        kernel: how ΔW[j, i] = κ(A[i], B[j]) is built: "linear" (LoRA), "piecewise_linear" (default),
            "rbf", "sigmoid" or "mixk" (SNELLA's D + α·softmax(D/γ) + β over the output dimension, D the
            piecewise-linear merge; α, γ and β are trained, one triple per adapted matrix).
        num_pieces: P, the number of contiguous column blocks of width r/P for piecewise_linear and mixk.
        coefficients: kernel coefficients (see :func:`default_coefficients`); None = the defaults. For mixk the
            last three are the initial (α, γ, β).
        learnable_coefficients: train the kernel coefficients too (the paper says learnable, the
            reference code keeps them fixed); for mixk, the piecewise ones (α, γ, β are always trained).
        sparsity: fraction of the entries of each ΔW that is zeroed (0 <= s < 1; 0.9 keeps the top 10 %).
            At 0, mixk still multiplies every entry by its detached |ΔW| (SNELLA's module always sparsifies).
        layer_sparsity: per-layer sparsities that replace ``sparsity`` for the layers named (module name to
            one value per adapter group, each in [0, 1]): what :class:`snell.allocator.SparsityAllocator` set
            during training, saved in the adapter so that a loaded model rebuilds the trained ΔW.
        sparsify_mode: "reference" (kept entries become ΔW·|ΔW|, |ΔW| detached: the published numbers),
            "mask" (kept entries stay ΔW) or "soft" (ΔW·max(|ΔW| − τ, 0), the paper's Eq. 5).
            At sparsity 0 every mode uses the dense ΔW (the reference code does the same).
        target_modules: module-name suffixes (list), a regular expression matched against the full
            module name (str), or None for the preset of the detected model family.
        exclude_modules: like target_modules, modules never adapted (None = nothing excluded).
        modules_to_save: module-name suffixes trained fully (e.g. the classifier head).
        parameters_to_save: parameter-name suffixes trained fully and saved with the adapter, for tensors
            that are no module of their own (e.g. a ViT's ``cls_token``, which the reference code trains).
        dropout: dropout on the adapter input (the reference code uses 0.1; 0 keeps the single-GEMM path).
        undropped_modules: like target_modules, adapted layers whose adapter input gets no dropout (the reference
            code drops the input of q, k, v, fc1 and fc2, not of attn.proj: the recipes give a regex for it).
        drop_path: per-sample DropPath on the adapter output (reference 0.1; 0 keeps the fused path).
        task_type: what the model is fine-tuned for (peft's names: "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS",
            "CAUSAL_LM", ...; "IMAGE_CLS" for a timm classifier). A classification type trains and saves the
            model's head, both of a distilled one (found by name, see :func:`snell.model.head_names`) without
            naming it in ``modules_to_save``; None or another type changes nothing.
        split_fused_qkv: give fused q/k/v projections (timm's ``qkv``) one adapter per q, k and v, so each
            is sparsified as its own matrix, as the reference code does (and Phi-3's fused gate/up, one per half;
            a grouped-query fused q/k/v, whose parts differ in size, stays one matrix, with a warning).
    """

    r: int = 8
    kernel: str = "piecewise_linear"
    num_pieces: int = 2
    coefficients: list[float] | None = None
    learnable_coefficients: bool = False
    sparsity: float = 0.9
    sparsify_mode: str = "reference"
    layer_sparsity: dict[str, list[float]] | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    parameters_to_save: list[str] | None = None
    dropout: float = 0.0
    undropped_modules: list[str] | str | None = None
    drop_path: float = 0.0
    split_fused_qkv: bool = True
    task_type: str | None = None
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        self.validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        """Validate assignments after creation too, so a config never holds a value its saved adapter
        could not be loaded with; a rejected assignment leaves the config unchanged."""
        if not self.__dict__.get("_validated"):
            object.__setattr__(self, name, value)  # dataclass __init__; __post_init__ validates the whole
            return
        if name not in self.__dataclass_fields__:  # a typo (cfg.sparsty = 0.5) would otherwise change nothing
            close = difflib.get_close_matches(name, self.__dataclass_fields__, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise AttributeError(f"SnellConfig has no field {name!r}{hint}")
        candidate = copy.copy(self)
        object.__setattr__(candidate, name, value)
        candidate.validate()
        self.__dict__.update(candidate.__dict__)

    def validate(self) -> None:
        """Raise ValueError naming the bad value and the allowed range; normalise lists and coefficients."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.sparsify_mode not in SPARSIFY_MODES:
            raise ValueError(f"sparsify_mode must be one of {SPARSIFY_MODES}, got {self.sparsify_mode!r}")
        if isinstance(self.num_pieces, bool) or not isinstance(self.num_pieces, int) or self.num_pieces < 1:
            raise ValueError(f"num_pieces must be an integer >= 1, got {self.num_pieces!r}")
        if self.kernel in PIECEWISE_KERNELS and self.r % self.num_pieces:
            raise ValueError(
                f"r must be divisible by num_pieces for {self.kernel}, got r={self.r}, num_pieces={self.num_pieces}"
            )
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1) (fraction of entries zeroed), got {self.sparsity!r}")
        for name in ("learnable_coefficients", "split_fused_qkv"):  # a string such as "no" would read as True
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.layer_sparsity is not None:
            object.__setattr__(self, "layer_sparsity", _checked_layer_sparsity(self.layer_sparsity))
        for name in ("dropout", "drop_path"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.coefficients is not None:
            expected = expected_num_coefficients(self.kernel, self.num_pieces)
            values = self.coefficients
            if not isinstance(values, (list, tuple)) or not all(_is_number(c) for c in values):
                raise ValueError(f"coefficients must be a list of {expected} numbers (or None), got {values!r}")
            if len(values) != expected:
                raise ValueError(f"kernel {self.kernel!r} takes {expected} coefficients, got {len(values)}")
            object.__setattr__(self, "coefficients", [float(c) for c in values])
            if not all(math.isfinite(c) for c in self.coefficients):
                raise ValueError(f"coefficients must be finite numbers, got {self.coefficients}")
            if self.kernel == "mixk" and self.coefficients[self.num_pieces + 1] == 0.0:  # softmax(D / γ)
                raise ValueError(f"mixk's γ (coefficients[{self.num_pieces + 1}]) divides D; it must not be 0")
        for name in ("target_modules", "exclude_modules", "undropped_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(f"{name} is not a valid regular expression: {value!r} ({err})") from None
            elif value is not None:
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{name} must be a list of names, a regex string or None, got {value!r}")
                object.__setattr__(self, name, list(value))
        for name in ("modules_to_save", "parameters_to_save"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{name} must be a list of names, got {value!r}")
                object.__setattr__(self, name, list(value))
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be None or one of {TASK_TYPES}, got {self.task_type!r}")
        _check_format_version(self.format_version)

    @property
    def kernel_coefficients(self) -> list[float]:
        return (
            self.coefficients if self.coefficients is not None else default_coefficients(self.kernel, self.num_pieces)
        )

    def dropout_for(self, name: str) -> float:
        """The adapter-input dropout of adapted layer ``name``: ``dropout``, or 0 for ``undropped_modules``."""
        undropped = self.undropped_modules is not None and name_matches(name, self.undropped_modules)
        return 0.0 if undropped else float(self.dropout)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SnellConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a SNELL config must be a JSON object, got {type(data).__name__}")
        _check_format_version(data.get("format_version", FORMAT_VERSION))  # before the keys: a newer one may add some
        data = {k: v for k, v in data.items() if k not in ADAPTER_FILE_KEYS}
        if data.get(METHOD_KEY) == METHOD:
            data = {k: v for k, v in data.items() if k != METHOD_KEY}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SNELL config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SnellConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"SNELL config is not valid JSON: {err}") from None
        return cls.from_dict(data)
