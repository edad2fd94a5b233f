"""Every model family the installed timm and transformers build, adapted with SNELL's default targets: which layers
the default takes, whether each adapter acts, and whether merging keeps the outputs.

For each family, the smallest model (timm: one per architecture module; transformers: the model type's default
config shrunk to 2 layers of width 64, listed as not built when it does not build that small; either skipped
above ``--max-params``) is adapted with ``target_modules=None``, B scaled by 3 so that ΔW shows, and run forward
and backward on random inputs. A row records the default's rule, the layers adapted, the adapters without a
gradient where the plain model's weight gets one ("idle": an adapter that never acts), whether the adapter saved and
loaded into a fresh copy of the model gives the same outputs bit for bit ("reload"), and the largest change of the
outputs by merging, relative to their largest magnitude. With ``--route peft`` the same happens through
``peft.get_peft_model`` with ``SnellPeftConfig(target_modules=None)``, and a row also says whether peft's wrappers
sit on exactly the layers the core adapts. Each model gets its task type (IMAGE_CLS for timm, which peft does not
have; SEQ_CLS; CAUSAL_LM): a classifier's heads are then trained in full, and moved by 0.01 with B so that the
reload and the merge must carry them. Rerun it after a timm, transformers or peft upgrade: a new family that the
default misses or cannot merge shows up here first.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

import snell
from snell.presets import detect_preset

FIELDS = ("library", "family", "model", "rule", "layers", "idle", "reload", "merge_error", "targets", "status")
_SMALL = dict(  # what the shrunk transformers configs set, where the config has the field
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_hidden_layers=2, n_layer=2, num_layers=2, n_embd=64, n_head=4, d_model=64, ffn_dim=128, n_inner=128,
    encoder_layers=2, decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_attention_heads=4,
    decoder_attention_heads=4, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4,
    num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, vocab_size=128, dim=64, hidden_dim=128,
    n_layers=2, n_heads=4, max_position_embeddings=128, n_positions=128, word_embed_proj_dim=64, embedding_size=64,
    linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, pad_token_id=0,
    bos_token_id=1, eos_token_id=2, num_labels=2,
)  # fmt: skip


def _layers_with_gradient(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _adapt_with_peft(
    model: nn.Module, task_type: str | None
) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``model`` through ``peft.get_peft_model`` with the default targets, and each wrapper's A and B by the name of
    the layer it wraps (the core's naming)."""
    from peft import get_peft_model

    from snell.integrations.peft import SnellPeftConfig, SnellPeftLayer

    wrapped = get_peft_model(model, SnellPeftConfig(r=4, sparsity=0.5, task_type=task_type))
    prefix = "base_model.model."
    factors = {
        layer_name.removeprefix(prefix): (layer.snell_A["default"], layer.snell_B["default"])
        for layer_name, layer in wrapped.named_modules()
        if isinstance(layer, SnellPeftLayer)
    }
    return wrapped, factors


def _reload(adapted: nn.Module, plain: nn.Module, route: str) -> nn.Module:
    """``adapted``'s adapter saved as ``route`` saves it, loaded into ``plain`` (an untouched copy of the base)."""
    with tempfile.TemporaryDirectory() as folder:
        if route == "peft":
            from peft import PeftModel

            adapted.save_pretrained(folder)
            return PeftModel.from_pretrained(plain, folder).eval()
        snell.save_adapter(adapted, folder)
        return snell.load_adapter(plain, folder).eval()


def check(
    name: str,
    model: nn.Module,
    run: Callable[[nn.Module], torch.Tensor],
    route: str = "core",
    task_type: str | None = None,
) -> dict[str, object]:
    """Adapt ``model`` with the default targets and ``task_type`` through ``route`` ("core" or "peft"; peft has no
    "IMAGE_CLS") and check it as the module docstring says; ``run`` gives the output."""
    run(model).float().sum().backward()
    acting = {n.removesuffix(".weight") for n in _layers_with_gradient(model)}
    model.zero_grad(set_to_none=True)
    model.train().eval()  # timm's LeViT-like attention caches its biases in eval, with this backward's graph in them
    core_model = copy.deepcopy(model) if route == "peft" else model
    plain = copy.deepcopy(model)
    try:
        rule = detect_preset(model).name
        snell.get_snell_model(core_model, snell.SnellConfig(r=4, sparsity=0.5, task_type=task_type))
    except (TypeError, ValueError) as err:
        return {"model": name, "status": f"refused: {str(err)[:80]}"}
    core_layers = [layer_name for layer_name, _ in snell.snell_layers(core_model)]
    row: dict[str, object] = {"model": name, "rule": rule, "layers": len(core_layers)}
    try:
        if route == "peft":
            model, factors = _adapt_with_peft(model, None if task_type == "IMAGE_CLS" else task_type)
            same = sorted(factors) == sorted(core_layers)
            row["targets"] = "same" if same else f"differ: peft {len(factors)}, core {len(core_layers)}"
        else:
            factors = {layer_name: (layer.A, layer.B) for layer_name, layer in snell.snell_layers(model)}
        factor_ids = {id(tensor) for pair in factors.values() for tensor in pair}
        with torch.no_grad():
            for _, b in factors.values():
                b.mul_(3)
            for param in model.parameters():
                if param.requires_grad and id(param) not in factor_ids:  # a head trained in full
                    param.add_(0.01)
        out = run(model)
        out.float().sum().backward()
        idle = [n for n, (a, _) in factors.items() if n in acting and (a.grad is None or a.grad.abs().sum() == 0)]
        with torch.no_grad():  # the same arithmetic on the same weights in this process: equal bit for bit
            expected, reloaded = run(model), run(_reload(model, plain, route))
        row["reload"] = "exact" if torch.equal(expected, reloaded) else f"{(expected - reloaded).abs().max():.1e}"
        with torch.no_grad():
            merged = run(model.merge_and_unload() if route == "peft" else snell.merge_and_unload(model))
    except Exception as err:  # a family that fails with SNELL is what this sweep looks for
        return {**row, "status": f"FAILED: {type(err).__name__}: {err}"[:120]}
    error = ((merged - out.detach()).abs().max() / out.detach().abs().max().clamp_min(1e-12)).item()
    fine = not idle and error < 1e-4 and row["reload"] == "exact" and row.get("targets", "same") == "same"
    status = "ok" if fine else "CHECK"
    return {**row, "idle": len(idle), "merge_error": f"{error:.1e}", "status": status}


def timm_rows(max_params: float, only: set[str], route: str) -> Iterator[dict[str, object]]:
    import timm
    from timm.models import _registry

    modules: dict[str, list[str]] = {}
    for name in timm.list_models():
        modules.setdefault(_registry._model_to_module.get(name, "?"), []).append(name)
    for family, names in sorted(modules.items()):
        if only and family not in only:
            continue
        name = min(names, key=lambda n: (_size_rank(n), len(n)))
        with torch.device("meta"):
            params = sum(p.numel() for p in timm.create_model(name).parameters())
        if params > max_params:
            yield {"library": "timm", "family": family, "model": name, "status": f"skipped: {params / 1e6:.0f} M"}
            continue
        torch.manual_seed(0)
        try:
            model = timm.create_model(name, num_classes=3, zero_init_last=False).eval()
        except TypeError:  # no zero_init_last: nothing of the residual branch starts at zero
            model = timm.create_model(name, num_classes=3).eval()
        x = torch.randn(1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
        yield {"library": "timm", "family": family, **check(name, model, lambda m, x=x: m(x), route, "IMAGE_CLS")}


def _size_rank(name: str) -> int:
    """Which of a module's models to take: the first size word it has, in this order."""
    words = ("tiny", "small", "nano", "pico", "18", "b0", "lite0", "xxs", "xs", "s")
    return next((i for i, word in enumerate(words) if word in name), len(words))


def transformers_rows(kind: str, max_params: float, only: set[str], route: str) -> Iterator[dict[str, object]]:
    import transformers
    from transformers.models.auto import modeling_auto

    transformers.logging.set_verbosity_error()
    mapping, auto = {
        "causal_lm": (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, transformers.AutoModelForCausalLM),
        "classifier": (
            modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
            transformers.AutoModelForSequenceClassification,
        ),
    }[kind]
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    for family in sorted(mapping):
        if only and family not in only:
            continue
        row = {"library": f"transformers {kind}", "family": family}
        try:
            config = transformers.AutoConfig.for_model(family)
            for key, value in _SMALL.items():
                if getattr(config, key, "absent") is None or isinstance(getattr(config, key, None), int):
                    with contextlib.suppress(AttributeError, TypeError, ValueError):
                        setattr(config, key, value)
            with torch.device("meta"):  # sub-configs (vision towers, patchers) keep their default sizes
                params = sum(p.numel() for p in auto.from_config(config).parameters())
            if params > max_params:
                yield {**row, "status": f"skipped: {params / 1e6:.0f} M"}
                continue
            torch.manual_seed(0)
            model = auto.from_config(config).eval()
            model(input_ids=ids)
        except Exception as err:  # a config that does not shrink is this sweep's limit, not a finding
            yield {**row, "status": f"not built small: {type(err).__name__}"}
            continue
        task_type = {"causal_lm": "CAUSAL_LM", "classifier": "SEQ_CLS"}[kind]
        yield {**row, **check(type(model).__name__, model, lambda m: m(input_ids=ids).logits, route, task_type)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libraries", nargs="+", default=["timm", "causal_lm", "classifier"],
                        choices=["timm", "causal_lm", "classifier"])  # fmt: skip
    parser.add_argument("--only", nargs="+", default=[], help="family names (timm modules, transformers types)")
    parser.add_argument("--max-params", type=float, default=40e6, help="models above this are skipped")
    parser.add_argument("--route", choices=["core", "peft"], default="core",
                        help="adapt through snell.get_snell_model or through peft.get_peft_model")  # fmt: skip
    parser.add_argument("--out", type=Path, help="CSV file for the rows")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    only = set(args.only)
    rows = []
    started = time.time()
    for library in args.libraries:
        if library == "timm":
            source = timm_rows(args.max_params, only, args.route)
        else:
            source = transformers_rows(library, args.max_params, only, args.route)
        for row in source:
            rows.append(row)
            print(" ".join(f"{key}={row[key]}" for key in FIELDS if key in row), flush=True)
    unknown = sorted(only - {str(r["family"]) for r in rows})
    if unknown:  # a mistyped name printed "0 adapted" and passed
        print(f"families: error: --only {' '.join(unknown)}: no such family in {', '.join(args.libraries)}",
              file=sys.stderr)  # fmt: skip
        return 2
    checked = [r for r in rows if "rule" in r]
    flagged = [r for r in checked if r["status"] != "ok"]
    print(f"{len(checked)} adapted, {len(flagged)} to check, {len(rows) - len(checked)} not adapted "
          f"({time.time() - started:.0f} s)")  # fmt: skip
    if args.out:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        args.out.write_text(buffer.getvalue())
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
