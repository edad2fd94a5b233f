"""Training options: one dataclass that is at once the CLI, the recipe format and the record of a run.

Values are resolved in a fixed order, later wins: the defaults below < the recipe (``--recipe vtab/cifar``
or a YAML file, :mod:`snell.train.recipes`) < flags given on the command line (generated from the fields,
:mod:`snell.train.flags`). The resolved config is written to the run folder, so a run can be resumed, evaluated or
merged without repeating its flags.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from snell.allocator import AllocatorConfig, scheduled_end
from snell.config import PIECEWISE_KERNELS
from snell.spec import keeps_dense

METHODS = ("snell", "snella", "lora", "dora", "full", "linear")
#: The methods whose result is a SNELL adapter (saved, loaded and merged by snell itself).
SNELL_METHODS = ("snell", "snella")
KERNELS = ("linear", "piecewise_linear", "rbf", "sigmoid", "mixk")
DATA_FORMATS = ("auto", "vtab", "fgvc", "imagefolder", "text", "builtin")
BUILTIN_DATA = ("fashion_mnist", "mnist", "digits", "bbc_news")
MODEL_DTYPES = ("float32", "bfloat16", "float16")


#: The default peak rate of SNELL when its update is sparsified in the reference (or soft) mode. The kept
#: entries become ΔW·|ΔW|, and ΔW starts near 1e-3, so the effective update starts near 1e-6 and grows with
#: the square of the factors' drift: a rate that suits LoRA leaves it near zero for a whole short run. Measured
#: on val (README, "Learning rates"): 2e-2 is inside the working range of SmolLM2-135M, MiniLM, EfficientNet and
#: the small ViT at s = 0.9, where 1e-3 to 5e-3 learned little or nothing.
SPARSE_SNELL_LR = 2e-2
#: Every other method, and SNELL without that quadratic factor (s = 0, or the mask mode): the long-standing
#: default, which LoRA-like updates tolerate.
DEFAULT_LR = 1e-3


def default_lr(method: str, kernel: str, sparsify_mode: str, sparsity: float) -> float:
    """The peak learning rate of an unset ``--lr``: SNELL's sparsified kernel needs about 20x LoRA's.

    The update is squared wherever a matrix is sparsified in the reference or soft mode (:func:`snell.spec.keeps_dense`
    is false): SNELL at s > 0, and the mixk kernel (SNELLA's, and SNELL's with ``--kernel mixk``) at every ratio, 0
    included; mixk's ΔW starts near 1e-3 too (D plus a softmax over m outputs, each about 1/m). ``kernel`` is the
    resolved one (snella's is mixk). The authors' SNELLA scripts use 1e-3 (their recipes set it)."""
    if method not in SNELL_METHODS or sparsify_mode not in ("reference", "soft"):
        return DEFAULT_LR
    return DEFAULT_LR if keeps_dense(kernel, sparsify_mode, sparsity) else SPARSE_SNELL_LR


#: `snell eval`'s --max-eval-samples when not given: the limit the run trained with (None, "all", is no limit).
RUNS_OWN_LIMIT = "run"


class UserError(Exception):
    """A problem with the user's input (file, flag, recipe, checkpoint): reported without a traceback."""


def _meta(help: str, choices: tuple | None = None) -> dict[str, Any]:
    return {"help": help, "choices": choices}


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata=_meta(help, choices))


@dataclass
class TrainConfig:
    """Everything that defines a training run; field names are the YAML keys and (with dashes) the flags."""

    # data
    data: str | None = _opt(None, "dataset folder/file, or a built-in task: " + ", ".join(BUILTIN_DATA))
    data_format: str = _opt("auto", "how --data is laid out (auto: detected from the files)", DATA_FORMATS)
    shots: int = _opt(
        16,
        "training examples per class for the few-shot text task bbc_news (without --select-on val it also trains on "
        "the 20 validation examples per class, as VTAB's train800val200 does)",
    )
    data_seed: int = _opt(0, "seed of the few-shot draw (kept apart from --seed so methods see the same data)")
    max_length: int = _opt(128, "text: tokens per example")
    img_size: int | None = _opt(
        None, "image side in pixels; a model that takes an img_size (ViT) is built for it (default: the model's own)"
    )
    augment: str | None = _opt(None, "image protocol: vtab (resize, no augmentation) or fgvc (default: by format)")
    color_jitter: float = _opt(0.0, "colour jitter strength for fgvc training transforms")
    normalize: str = _opt(
        "model",
        "image mean/std: the model's own (timm's pretrained config), or imagenet's, which the reference code uses "
        "for VTAB-1k and FGVC whatever the backbone (the recipes' choice)",
        ("model", "imagenet"),
    )
    max_eval_samples: int | None = _opt(None, "evaluate on the first N examples of each split (a fixed subset)")
    num_classes: int | None = _opt(
        None,
        "VTAB/FGVC folders: class ids are 0..N-1 (default: 1 + the largest label of the training split files; "
        "give it when a training split lacks the highest classes, e.g. VTAB sun397: 397)",
    )
    # model
    model: str = _opt(
        "vit_base_patch16_224.orig_in21k",
        "timm model name, a transformers model directory, or (causal LM) a .gguf file or a folder holding one",
    )
    checkpoint: str | None = _opt(None, "local backbone weights for a timm model (.safetensors, .pth, .npz)")
    pretrained: bool = _opt(False, "let timm download its pretrained weights (needs hub access)")
    model_kwargs: dict = field(
        default_factory=dict, metadata=_meta("extra timm.create_model arguments as JSON, e.g. '{\"img_size\": 32}'")
    )
    drop_path_rate: float = _opt(0.0, "stochastic depth in the backbone (timm models)")
    # method
    method: str = _opt(
        "snell",
        "what is trained (snella: SNELL's mixk kernel, per-layer sparsity set by the allocator)",
        METHODS,
    )
    r: int = _opt(8, "rank of SNELL / LoRA / DoRA factors (--rank under torchrun)")
    kernel: str = _opt("piecewise_linear", "SNELL kernel (snella: always mixk)", KERNELS)
    num_pieces: int = _opt(2, "SNELL piecewise-linear kernel: number of pieces")
    coefficients: list | None = field(
        default=None, metadata=_meta("SNELL kernel coefficients, comma-separated (default: the kernel's)")
    )
    learnable_coefficients: bool = _opt(False, "train the SNELL kernel coefficients")
    sparsity: float = _opt(
        0.9, "SNELL: fraction of each update matrix zeroed (0.9 keeps the top 10 %%); snella: see --init-sparsity"
    )
    sparsify_mode: str = _opt("reference", "SNELL sparsifier", ("reference", "mask", "soft"))
    target_modules: list | str | None = field(
        default=None,
        metadata=_meta(
            "adapted layers: comma-separated name suffixes, or re:<regex> (default: the family's preset, else every "
            "projection of the blocks)"
        ),
    )
    exclude_modules: list | str | None = field(
        default=None, metadata=_meta("layers never adapted, same syntax as --target-modules")
    )
    split_fused_qkv: bool = _opt(True, "SNELL: one adapter per q, k and v of a fused qkv projection")
    adapter_dropout: float = _opt(0.0, "dropout on the adapter input (SNELL dropout, LoRA lora_dropout)")
    undropped_modules: list | str | None = field(
        default=None,
        metadata=_meta(
            "SNELL: adapted layers whose adapter input gets no --adapter-dropout, same syntax as --target-modules "
            "(the reference code's: proj)"
        ),
    )
    adapter_drop_path: float = _opt(0.0, "SNELL: DropPath on the adapter output")
    lora_alpha: float | None = _opt(None, "LoRA/DoRA alpha (default: r, i.e. scale 1)")
    # SNELLA's sparsity allocation (the authors' train_alloc*.py flags in brackets; defaults: their snella32 scripts)
    target_sparsity: float = _opt(
        0.8, "snella: fraction of all adapted entries zeroed at the end, over all layers [--target_ratio]"
    )
    init_sparsity: float = _opt(0.01, "snella: every layer's sparsity at the start [--init_thres]")
    alloc_epochs: int | None = _opt(
        None,
        "snella: the sparsity schedule's length in epochs, stepped once per epoch (default: --epochs) [--alloc_epoch]",
    )
    alloc_init_warmup: int = _opt(0, "snella: epochs at the initial budget before it shrinks [--init_warmup]")
    alloc_final_warmup: int = _opt(0, "snella: epochs at the target budget at the end of the schedule [--final_warmup]")
    alloc_mask_interval: int = _opt(1, "snella: re-allocate every N epochs while the budget shrinks [--mask_interval]")
    alloc_beta1: float = _opt(0.85, "snella: EMA factor of each factor entry's sensitivity |θ·∇θ| [--beta1]")
    alloc_beta2: float = _opt(0.85, "snella: EMA factor of the sensitivity's uncertainty [--beta2]")
    train_cls_token: bool = _opt(True, "train the cls_token fully for snell/lora/dora, as the reference code does")
    # optimisation
    epochs: int = _opt(10, "training epochs")
    batch_size: int = _opt(32, "global batch size (split across processes)")
    grad_accum: int = _opt(1, "gradient accumulation steps (the effective batch is batch_size * grad_accum)")
    lr: float | None = _opt(
        None, "peak learning rate (default: the method's: 2e-2 for SNELL's sparsified kernel, 1e-3 otherwise)"
    )
    weight_decay: float = _opt(1e-2, "AdamW weight decay (never on 1-D params, biases, pos_embed, cls_token)")
    warmup_epochs: float | None = _opt(
        None, "linear warmup length in epochs, from --warmup-lr to --lr (default: 10%% of the run, at most 1 epoch)"
    )
    warmup_lr: float = _opt(1e-6, "learning rate at the first step")
    min_lr: float = _opt(1e-5, "learning rate at the end of the cosine decay")
    lr_schedule: str = _opt(
        "per-step",
        "per-step: a new rate every optimizer step, the cosine over the steps after the warmup; reference: the "
        "authors' (timm's cosine over all epochs, warmup included, set after each epoch: epoch e runs at t = e - 1)",
        ("per-step", "reference"),
    )
    ema_decay: float | None = _opt(
        None,
        "keep a moving average of the trained weights with this decay (e.g. 0.9999), score it at every evaluation "
        "beside the model and keep the better; without evaluations, the run ends with the average",
    )
    seed: int = _opt(0, "seed of initialisation, data order and dropout")
    bf16: bool = _opt(False, "bfloat16 autocast")
    fp16: bool = _opt(
        False, "float16 autocast with a dynamic loss scale (GradScaler), as the authors' --amp; on CPU and GPU alike"
    )
    eval_every: int = _opt(1, "evaluate every N epochs (and always after the last)")
    eval_batch_size: int = _opt(128, "batch size of evaluation")
    num_workers: int = _opt(0, "data loader worker processes")
    # protocol and output
    select_on: str = _opt(
        "none",
        "val: train on train800, pick the epoch on val200, report test there; none: train on train800val200",
        ("none", "val"),
    )
    protocol: str = _opt(
        "standard",
        "reference: report the MAXIMUM test accuracy over evaluations, as the paper's code does (evaluating after "
        "epochs 1, 1 + N, 1 + 2N, ... for --eval-every N, and each of the last ten)",
        ("standard", "reference"),
    )
    output_dir: str | None = _opt(None, "run folder (default: runs/<data>-<method>-seed<seed>)")
    merge: bool = _opt(False, "also write the model with the adapter merged into its weights")
    fsdp: bool = _opt(False, "shard parameters, gradients and optimizer state over the processes (FSDP2)")
    progress: bool = _opt(True, "show progress bars")
    # causal language models (a transformers causal-LM folder or a .gguf file: causal_lm.source.find_source)
    model_dtype: str = _opt(
        "float32", "causal LM: dtype of the base weights (SNELL/LoRA factors stay float32)", MODEL_DTYPES
    )
    gradient_checkpointing: bool = _opt(False, "causal LM: recompute activations in backward to save memory")
    prompt_format: str | None = _opt(
        None,
        "causal LM prompt: alpaca (LLM-Adapters' template) or chat (the tokenizer's; the default where it has one)",
        ("alpaca", "chat"),
    )
    packing: bool = _opt(False, "causal LM: lay whole training examples end to end up to --max-length tokens")
    train_on_prompt: bool = _opt(False, "causal LM: compute the loss on the prompt too, not only the response")
    max_new_tokens: int = _opt(32, "causal LM: tokens generated per example when scoring")
    score_by: str = _opt(
        "generate",
        "causal LM accuracy: generate (greedy text, first answer found in it, as LLM-Adapters) or likelihood "
        "(the answer of the task's set whose response is most probable, as lm-eval's multiple choice)",
        ("generate", "likelihood"),
    )
    num_beams: int = _opt(1, "causal LM: beams when scoring (1: greedy; LLM-Adapters' commonsense evaluation uses 4)")

    def __post_init__(self) -> None:
        if self.method == "snella" and self.kernel == "piecewise_linear":
            self.kernel = "mixk"  # mixk builds on the piecewise-linear D: the default means "snella's own kernel"
        if self.lr is None:
            self.lr = default_lr(self.method, self.kernel, self.sparsify_mode, self.sparsity)
        if self.warmup_epochs is None:  # one epoch was the whole of a 1-epoch fine-tune, half of a 2-epoch one
            # a bad --epochs is refused by validate() before warmup_epochs is read
            self.warmup_epochs = min(1.0, self.epochs / 10) if isinstance(self.epochs, int) else 1.0
        self.validate()
        self._resolve_paths()

    def _resolve_paths(self) -> None:
        """Make file and folder paths absolute, so that the same folder spelt differently (relative, absolute,
        through a symlink) is the same value when a run is resumed, evaluated or merged from elsewhere."""
        if self.data and Path(self.data).exists():  # a built-in task name stays a name
            self.data = str(Path(self.data).resolve())
        if Path(self.model).exists():  # a transformers model folder or a .gguf file; a timm name stays a name
            self.model = str(Path(self.model).resolve())
        for name in ("checkpoint", "output_dir"):
            if getattr(self, name):
                setattr(self, name, str(Path(getattr(self, name)).resolve()))

    def validate(self) -> None:
        """Raise UserError on values that cannot work, before anything is loaded or written."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise UserError(f"{called(f.name)} must be one of {list(choices)}, got {value!r}")
            # nan passes every range check below (each comparison is false), inf the open-ended ones
            if f.type.startswith("float") and isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{called(f.name)} must be a finite number, got {value!r}")
            # a recipe's quoted "no" is a non-empty string, so true; YAML's true is an int to isinstance
            if f.type == "bool" and not isinstance(value, bool):
                raise UserError(f"{called(f.name)} must be true or false, got {value!r}")
            if f.type.startswith(("int", "float")) and isinstance(value, bool):
                raise UserError(f"{called(f.name)} must be a number, got {value!r}")
        for name in ("data", "model", "checkpoint", "output_dir"):  # "" is an unset shell variable, not "." or None
            if getattr(self, name) == "":
                raise UserError(f"{called(name)} is empty; give a path or name, or leave it out")
        positive = ("epochs", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "r", "num_pieces")
        positive += ("max_length", "shots")
        positive += ("max_new_tokens", "num_beams")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{called(name)} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("img_size", "max_eval_samples", "num_classes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"{called(name)} must be a positive integer (or unset), got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise UserError(f"{called('num_workers')} must be an integer >= 0, got {self.num_workers!r}")
        for name in ("sparsity", "drop_path_rate", "adapter_dropout", "adapter_drop_path"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise UserError(f"{called(name)} must lie in [0, 1), got {value!r}")
        if self.augment not in (None, "vtab", "fgvc"):
            raise UserError(f"{called('augment')} must be vtab or fgvc, got {self.augment!r}")
        if self.select_on == "val" and self.protocol == "reference":
            raise UserError(
                "--protocol reference selects on test by definition; it cannot be combined with --select-on val"
            )
        decay = self.ema_decay
        if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1):
            raise UserError(f"{called('ema_decay')} must lie in (0, 1), got {decay!r}")
        if decay is not None and self.fsdp:  # the average would be of this process's shards, and so would the swap
            raise UserError("--ema-decay cannot be combined with --fsdp")
        if self.bf16 and self.fp16:
            raise UserError("--bf16 and --fp16 are two autocast precisions; give one")
        if self.fp16 and self.fsdp:  # each process would unscale only its shards and could skip a step the others take
            raise UserError("--fp16 cannot be combined with --fsdp; use --bf16, which needs no loss scale")
        if self.fsdp and self.merge:  # merging rewrites weights that only the main process would hold whole
            raise UserError("--merge cannot be combined with --fsdp; run `snell merge RUN_DIR` after training")
        if not isinstance(self.model_kwargs, dict):
            raise UserError(f"{called('model_kwargs')} must be a mapping, got {self.model_kwargs!r}")
        kwargs_size = self.model_kwargs.get("img_size")
        if self.img_size is not None and kwargs_size is not None and kwargs_size != self.img_size:
            raise UserError(f"img_size {self.img_size} differs from model_kwargs img_size {kwargs_size!r}; give one")
        if self.lora_alpha is not None and (not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0):
            raise UserError(f"{called('lora_alpha')} must be a positive number (or unset: r), got {self.lora_alpha!r}")
        for name in ("lr", "warmup_lr", "min_lr", "weight_decay", "warmup_epochs", "color_jitter"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise UserError(f"{called(name)} must be a non-negative number, got {getattr(self, name)!r}")
        for name, wrong_way in (
            ("warmup_lr", "the warm-up would lower the rate from it to lr"),
            ("min_lr", "the cosine would raise the rate from lr to it"),
        ):
            if getattr(self, name) > self.lr:  # e.g. a small --lr under the default --min-lr 1e-5
                raise UserError(
                    f"{called(name)} {getattr(self, name)!r} is above {called('lr')} {self.lr!r}: "
                    f"{wrong_way}; give {flag_name(name)} at most --lr (0 is allowed)"
                )
        kernel = "mixk" if self.method == "snella" else self.kernel
        if self.method in SNELL_METHODS and kernel in PIECEWISE_KERNELS and self.r % self.num_pieces:
            raise UserError(
                f"{called('r')} must be divisible by num_pieces for {kernel}, "
                f"got r={self.r}, num_pieces={self.num_pieces}"
            )
        self._validate_allocation()

    def evaluating(self, split: str) -> TrainConfig:
        """This run's config for evaluating ``split``: val is its own set only when selecting on it, and the protocol,
        which evaluating a split does not read, must allow that (--protocol reference refuses --select-on val)."""
        return replace(self, select_on="val", protocol="standard") if split == "val" else self

    def evaluates_after(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ends with an evaluation: every ``eval_every``-th and the last; with
        ``--protocol reference`` the reference code's schedule, the first of every ``eval_every`` and each of the
        last ten (its train.py: ``epoch % val_interval == 0 or epoch >= epochs - 10``)."""
        if self.protocol == "reference":
            return epoch % self.eval_every == 0 or epoch >= self.epochs - 10
        return (epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs

    def allocation_epochs(self) -> int:
        """T, the length of SNELLA's sparsity schedule in epochs (``--alloc-epochs``, else ``--epochs``)."""
        return self.alloc_epochs if self.alloc_epochs is not None else self.epochs

    def allocation_end(self) -> float:
        """The sparsity SNELLA's schedule ends at (:func:`snell.allocator.scheduled_end`); UserError when it never
        re-allocates. Checked when a run starts, not in :meth:`validate`: eval and merge read finished runs' configs."""
        end = scheduled_end(self.allocation_schedule(), self.init_sparsity)
        if end is None:
            raise UserError(
                f"SNELLA's schedule of {self.allocation_epochs()} epochs (init warm-up {self.alloc_init_warmup}, mask "
                f"interval {self.alloc_mask_interval}) never re-allocates, so every layer would stay at "
                f"--init-sparsity {self.init_sparsity}: give it more epochs (--epochs, --alloc-epochs) or a shorter "
                "mask interval"
            )
        return end

    def allocation_schedule(self) -> AllocatorConfig:
        """SNELLA's allocator schedule, stepped once per epoch (check the options with :meth:`validate` first)."""
        return AllocatorConfig(
            target_sparsity=self.target_sparsity,
            total_steps=self.allocation_epochs(),
            init_warmup=self.alloc_init_warmup,
            final_warmup=self.alloc_final_warmup,
            mask_interval=self.alloc_mask_interval,
            beta1=self.alloc_beta1,
            beta2=self.alloc_beta2,
        )

    def _validate_allocation(self) -> None:
        """SNELLA's options: ranges always (a recipe may carry them for any method), their combination for snella."""
        for name in ("target_sparsity", "init_sparsity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise UserError(f"{called(name)} must lie in [0, 1), got {value!r}")
        for name in ("alloc_beta1", "alloc_beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise UserError(f"{called(name)} must lie in (0, 1), got {value!r}")
        for name, least in (("alloc_init_warmup", 0), ("alloc_final_warmup", 0), ("alloc_mask_interval", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"{called(name)} must be an integer >= {least}, got {value!r}")
        if self.alloc_epochs is not None and (
            isinstance(self.alloc_epochs, bool) or not isinstance(self.alloc_epochs, int) or self.alloc_epochs < 1
        ):
            raise UserError(
                f"{called('alloc_epochs')} must be a positive integer (or unset), got {self.alloc_epochs!r}"
            )
        if self.method != "snella":
            return
        if self.kernel != "mixk":
            raise UserError(
                f"--method snella trains the mixk kernel; {called('kernel')} must be mixk or unset, got {self.kernel!r}"
            )
        length = self.allocation_epochs()
        if length > self.epochs:
            raise UserError(
                f"{called('alloc_epochs')} must be in [1, epochs={self.epochs}] (a longer schedule never reaches "
                f"--target-sparsity), got {length}"
            )
        if self.alloc_init_warmup + self.alloc_final_warmup >= length:
            raise UserError(
                f"alloc_init_warmup + alloc_final_warmup must be below the schedule's {length} epochs, got "
                f"{self.alloc_init_warmup} + {self.alloc_final_warmup}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"{source}: unknown keys {unknown}")
        return cls(**values)


def first_process() -> bool:
    """Whether this is the first (or only) process of a launch, before any process group exists: torchrun and
    accelerate set RANK for every process they start."""
    return os.environ.get("RANK", "0") == "0"


def check_output_folder(path: Path, flag: str) -> None:
    """Raise UserError if ``path`` cannot be (or become) a writable folder: before any work, not after it."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        detail = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise UserError(f"{flag} {path} {detail}; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable")


def option_changes(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """``"epochs: saved 2 vs now 3, ..."`` for the options whose values differ between two config dicts (an option
    absent from one: its default), or "" when none does."""
    defaults = TrainConfig().to_dict()
    before, after = {**defaults, **saved}, {**defaults, **now}
    names = sorted(k for k in saved.keys() | now.keys() if before.get(k) != after.get(k))
    return ", ".join(f"{k}: saved {before.get(k)!r} vs now {after.get(k)!r}" for k in names)


def flag_name(name: str) -> str:
    """The `snell train` flag of TrainConfig field ``name`` (``r`` is ``--rank``: under torchrun ``--r`` is taken
    for an abbreviation of torchrun's own options)."""
    return "--rank" if name == "r" else "--" + name.replace("_", "-")


def called(name: str) -> str:
    """A field as an error names it, for recipe files and the command line alike: ``max_length (--max-length)``."""
    return f"{name} ({flag_name(name)})"


def default_output_dir(config: TrainConfig) -> Path:
    data_name = Path(config.data).stem if config.data else "data"
    return Path("runs") / f"{data_name}-{config.method}-seed{config.seed}"


def is_run_config(path: Path) -> bool:
    """Whether ``path`` is a ``snell train`` run's config.json (a JSON object with the run's "config"), not another
    tool's file of that name, such as a transformers model's."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and isinstance(record.get("config"), dict)
