"""SnellPeftConfig: a SNELL adapter's settings in peft's config format, and the ``peft_type`` it registers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig

from snell.config import FORMAT_VERSION, METHOD, SnellConfig


class MethodType(str):
    """A ``peft_type`` outside peft's closed ``PeftType`` enum that behaves like one of its members: it is the
    string itself (dict keys, ``==``, JSON) and has the members' ``.value`` and ``.name``, and ``str()`` of it reads
    ``PeftType.SNELL`` as ``str(PeftType.LORA)`` reads ``PeftType.LORA`` (peft's ``get_model_status`` takes the part
    after the dot)."""

    __slots__ = ()

    def __str__(self) -> str:
        return f"PeftType.{self.value}"

    @property
    def value(self) -> str:
        return str.__str__(self)  # the plain string

    @property
    def name(self) -> str:
        return self.value


#: The ``peft_type`` of SNELL adapters, in peft's configs and (as the plain string) in adapter_config.json.
SNELL = MethodType(METHOD)

_METHOD_FIELDS = (
    "r",
    "kernel",
    "num_pieces",
    "coefficients",
    "learnable_coefficients",
    "sparsity",
    "layer_sparsity",
    "sparsify_mode",
    "dropout",
    "undropped_modules",
    "drop_path",
    "split_fused_qkv",
    "format_version",
)


def _names(value: Any) -> list[str] | str | None:
    """peft may turn name lists into sets; SnellConfig takes lists (or a regex string)."""
    return sorted(value) if isinstance(value, (set, frozenset)) else value


@dataclass
class SnellPeftConfig(PeftConfig):
    """A SNELL adapter for peft. The method fields mean what they mean in :class:`snell.SnellConfig` and are
    validated by it; ``target_modules`` / ``exclude_modules`` take a list of name suffixes or a regex, and
    ``target_modules=None`` picks snell's default (the family's preset, else every projection of the blocks). As in
    peft, a list entry that matches no module is skipped (``snell.get_snell_model`` refuses it).

    ``task_type="SEQ_CLS"`` makes peft add the classifier head (``classifier`` / ``score``) to
    ``modules_to_save``, so the new head is trained and saved by default, as with LoRA; SNELL adds every head the
    core's task types train (:func:`snell.model.head_names`: DeBERTa's ``pooler``, XLM's ``sequence_summary``).
    The core's ``parameters_to_save`` (bare tensors such as a ViT's ``cls_token``) has no peft counterpart here.
    """

    r: int = field(default=8, metadata={"help": "rank of the factors A and B"})
    kernel: str = field(
        default="piecewise_linear", metadata={"help": "linear, piecewise_linear, rbf, sigmoid or mixk (SNELLA)"}
    )
    num_pieces: int = field(default=2, metadata={"help": "pieces of the piecewise_linear kernel"})
    coefficients: list[float] | None = field(default=None, metadata={"help": "kernel coefficients (None: defaults)"})
    learnable_coefficients: bool = field(default=False, metadata={"help": "train the kernel coefficients too"})
    sparsity: float = field(default=0.9, metadata={"help": "fraction of each ΔW that is zeroed"})
    layer_sparsity: dict[str, list[float]] | None = field(
        default=None,
        metadata={"help": "per-layer sparsities (one per adapter group) replacing sparsity; set by snella_allocator"},
    )
    sparsify_mode: str = field(default="reference", metadata={"help": "reference, mask or soft"})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "name suffixes or a regex; None: snell's default (the family's preset, else every projection of "
            "the blocks)"
        },
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules never adapted"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "modules trained fully and saved"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    undropped_modules: list[str] | str | None = field(
        default=None, metadata={"help": "adapted modules whose adapter input gets no dropout (the reference: proj)"}
    )
    drop_path: float = field(default=0.0, metadata={"help": "per-sample DropPath on the adapter output"})
    split_fused_qkv: bool = field(default=True, metadata={"help": "one adapter per q, k, v of a fused projection"})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "SNELL adapter format version"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SNELL
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        self.snell_config()  # validates every method field, with snell's messages

    def snell_config(self) -> SnellConfig:
        """The same adapter as a core :class:`snell.SnellConfig` (what builds and checks each layer)."""
        return SnellConfig(
            **{name: getattr(self, name) for name in _METHOD_FIELDS},
            target_modules=_names(self.target_modules),
            exclude_modules=_names(self.exclude_modules),
            modules_to_save=_names(self.modules_to_save),
        )

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Reject snell's own adapter folders with a clear message: their tensors are named for
        ``snell.load_adapter``, not for peft (peft's configs always carry ``peft_version``)."""
        if "peft_version" not in kwargs:
            raise ValueError(
                "this folder holds a SNELL adapter saved by snell.save_adapter (snell's own format), not by peft; "
                "load it with snell.load_adapter(model, path), or train with get_peft_model(model, "
                "SnellPeftConfig(...)) to get a peft adapter"
            )
        return super().check_kwargs(**kwargs)
