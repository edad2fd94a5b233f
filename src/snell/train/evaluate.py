"""`snell eval` and `snell merge`: rebuild a finished run's model from its folder alone.

The run folder's config.json says how the backbone was built and which data and transforms were used,
so evaluating the saved adapter reproduces the accuracy reported in summary.json, and merging gives a
plain model with the same outputs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from torch import nn

from snell.train.backbones import Backbone, build_backbone
from snell.train.causal_lm import is_causal_lm
from snell.train.classification import accuracy, make_loader
from snell.train.config import RUNS_OWN_LIMIT, TrainConfig, UserError, check_output_folder, is_run_config
from snell.train.loop import CONFIG_FILE, SUMMARY_FILE
from snell.train.methods import MERGED_FILES, load_trained, merge_trained, save_merged
from snell.train.precision import make_accelerator
from snell.train.tasks import Task, attach_transforms, load_task


def load_run_config(run_dir: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The resolved config a run was trained with, and the rest of its config.json."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; is {run_dir} a `snell train` run folder?")
    try:
        record = json.loads(path.read_text())
        return TrainConfig.from_dict(record["config"], str(path)), record
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable run config ({err})") from None


def restore(
    run_dir: Path,
    adapter: Path | None = None,
    split: str = "test",
    data: str | None = None,
    max_eval_samples: int | str | None = RUNS_OWN_LIMIT,
) -> tuple[TrainConfig, Task, Backbone, nn.Module]:
    """Config, data, backbone and the trained model of a run (the adapter of ``run_dir`` unless given), scoring
    ``max_eval_samples`` records of val and test (None: all; the default: as many as the run did)."""
    config, record = load_run_config(run_dir)
    changes: dict[str, Any] = {"progress": False}
    if data is not None:
        changes["data"] = data
    if max_eval_samples != RUNS_OWN_LIMIT:
        changes["max_eval_samples"] = max_eval_samples
    config = dataclasses.replace(config, **changes).evaluating(split)
    set_seed(config.seed)  # a backbone without --checkpoint is random: rebuild the same one
    task = load_task(config)
    if task.num_classes != record.get("num_classes", task.num_classes):
        raise UserError(
            f"{config.data} has {task.num_classes} classes but the run was trained on {record['num_classes']}"
        )
    trained = record.get("class_names")
    if trained is not None and list(task.class_names) != list(trained):  # the head's outputs are these, in order
        first = next(i for i, (a, b) in enumerate(zip(task.class_names, trained, strict=True)) if a != b)
        raise UserError(
            f"{config.data}'s class {first} is {task.class_names[first]!r}, but the run's was {trained[first]!r}: "
            "its labels would be scored against other classes"
        )
    backbone = build_backbone(config, task.num_classes)
    attach_transforms(task, config, backbone.img_size, backbone.mean, backbone.std)
    model = load_trained(backbone, config, adapter or run_dir / "adapter")
    return config, task, backbone, model


def check_finished(run_dir: Path, adapter: Path | None = None) -> None:
    """A run that has not finished has no adapter yet (it is written at the end): say so, and how to finish it,
    rather than "adapter folder not found"."""
    if adapter is None and not (run_dir / SUMMARY_FILE).is_file() and not (run_dir / "adapter").exists():
        raise UserError(
            f"{run_dir} holds a run that has not finished (no {SUMMARY_FILE}, no adapter yet): finish it with its "
            "`snell train` command plus --resume, or give --adapter"
        )


def evaluate_run(
    run_dir: Path,
    split: str = "test",
    adapter: Path | None = None,
    data: str | None = None,
    max_eval_samples: int | str | None = RUNS_OWN_LIMIT,
) -> dict:
    """Accuracy of a run's saved result on one split: its first ``max_eval_samples`` records (None: all of them; the
    default: as many as the run scored)."""
    if split not in ("test", "val"):
        raise UserError(f"split must be test or val, got {split!r}")
    config, record = load_run_config(run_dir)
    check_finished(run_dir, adapter)
    if is_causal_lm(config.model):
        from snell.train.causal_lm import run as causal

        if max_eval_samples != RUNS_OWN_LIMIT:
            config = dataclasses.replace(config, max_eval_samples=max_eval_samples)
        result = causal.evaluate_run(run_dir, causal.recorded_config(config, record), split, adapter, data)
    else:
        # restore's config evaluates the split (it selects on val for val); the warning below reads the run's own
        evaluating, task, backbone, model = restore(run_dir, adapter, split, data, max_eval_samples)
        dataset = task.test if split == "test" else task.val
        accelerator = make_accelerator(evaluating)
        loader = accelerator.prepare(make_loader(dataset, task, evaluating, backbone.tokenizer, train=False))
        model = accelerator.prepare(model)
        examples, score = len(dataset), accuracy(model, loader, accelerator)
        result = {"run": str(run_dir), "split": split, "examples": examples, "accuracy": score}
    # after the evaluation: a run whose data has no val split gets its one-line error, not this warning before it
    if split == "val" and config.select_on != "val" and data is None:
        print(
            f"warning: {run_dir} trained on its val split too (--select-on {config.select_on}); its val score is not "
            "a held-out one",
            file=sys.stderr,
            flush=True,
        )
    return result


def merge_run(run_dir: Path, output: Path | None = None, force: bool = False) -> Path:
    """Write the run's model with the update folded into the weights; returns the output folder.

    An output folder that is not empty (a merged model, or files of the user's, whose ``config.json`` or tokenizer
    files the merge would replace) is refused unless ``force``, before any work; a run folder always.
    """
    output = output or run_dir / "merged"
    check_output_folder(output, "--output")
    if is_run_config(output / CONFIG_FILE) or (output / SUMMARY_FILE).is_file():
        raise UserError(f"--output {output} holds a `snell train` run, whose files a merged model would overwrite")
    existing = [output / name for name in MERGED_FILES if (output / name).exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists; pass --force to overwrite it, or choose another --output")
    held = sorted(output.iterdir()) if output.is_dir() else []
    if held and not force:
        raise UserError(
            f"--output {output} is not empty ({held[0].name}, ...): the merge would replace files of the same names; "
            "pass --force to write into it, or choose another --output"
        )
    config, record = load_run_config(run_dir)
    check_finished(run_dir)
    if is_causal_lm(config.model):
        from snell.train.causal_lm import run as causal

        return causal.merge_run(run_dir, causal.recorded_config(config, record), output)
    config, _, backbone, model = restore(run_dir)
    return save_merged(merge_trained(model, config), backbone, output)
