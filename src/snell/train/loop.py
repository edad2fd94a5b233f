"""The training loop: one harness for every method, resumable at any point, identical on 1 or N processes.

Reproducibility is built in rather than hoped for: the data order of epoch e is a function of (seed, e)
only, the global batch is split across processes (so 1 and N processes take the same optimizer steps),
and a checkpoint after every epoch holds everything that changes (trainable tensors, optimizer,
schedule, RNG states, metrics, the best state so far). Checkpoints are written to a temporary folder and
renamed, so a run killed at any moment resumes from the last complete epoch and ends where an
uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import snell
from snell.allocator import SparsityAllocator
from snell.train.allocation import make_allocator, sparsity_record
from snell.train.checkpoint import Progress, checkpoint_dirs, cpu_copies, restore_checkpoint, save_checkpoint
from snell.train.config import (
    TrainConfig,
    UserError,
    check_output_folder,
    default_output_dir,
    is_run_config,
    option_changes,
)
from snell.train.ema import WeightEma
from snell.train.fsdp import check_fsdp_processes, reshard, shard, unsharded
from snell.train.methods import load_mutable_state, merge_trained, mutable_state, save_trained, set_train_mode
from snell.train.optim import EpochSampler, WarmupCosine, param_groups
from snell.train.plots import CURVES_FILE, SPARSITY_FILE, plot_curves, plot_sparsity
from snell.train.precision import make_accelerator

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# ------------------------------------------------------------------------------------------------------
# Memory and files


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory of this process: CUDA allocations on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS (ru_maxrss)"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite the metrics file from the records (after a resume it must not repeat a lost epoch)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------
# The run


class Report(NamedTuple):
    """What a kind of task reports at the end of a run."""

    fields: dict[str, Any]  # summary.json's task-specific fields (test_accuracy, accuracy_kind, ...)
    line: str  # the closing line, after "<method>: "
    files: dict[str, Any]  # more JSON files for the run folder, by name


def _shown(value: float) -> float:
    """A metric as the progress line prints it: 4 decimals, or 3 significant digits below 0.001 (an lr of 1e-5 read
    0.0)."""
    return round(value, 4) if abs(value) >= 1e-3 or value == 0 else float(f"{value:.3g}")


class Run:
    """One training run in ``out``: set-up, epochs, checkpoints and the final report."""

    #: what :meth:`_batch_loss` counts as scored predictions, which the epoch's throughput is per
    scored_unit = "examples"
    #: what the training split holds, for the opening line (a packed causal-LM split: sequences of examples)
    train_unit = "examples"

    def __init__(self, config: TrainConfig, resume: bool = False):
        self.started = time.time()
        self.config = config
        self.out = Path(config.output_dir) if config.output_dir else default_output_dir(config).resolve()
        self.config.output_dir = str(self.out)
        self.accelerator = make_accelerator(
            config,
            gradient_accumulation_steps=config.grad_accum,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
        )
        world = self.accelerator.num_processes
        if config.fsdp:
            check_fsdp_processes(world)  # before the run folder is written
        for name in ("batch_size", "eval_batch_size"):
            if getattr(config, name) % world:
                raise UserError(f"{name} {getattr(config, name)} must be divisible by the {world} processes")
        if config.method == "snella":
            config.allocation_end()  # a schedule that never re-allocates is refused before anything is written
        self.resume = resume
        self.allocator: SparsityAllocator | None = None  # snella's, made in fit() once the model is on its device
        self.ema: WeightEma | None = None  # --ema-decay's, made in fit() likewise
        self._check_output_dir()
        self.accelerator.wait_for_everyone()
        self.finished = self.resume and (self.out / SUMMARY_FILE).is_file()
        if self.finished:  # nothing to build: fit() reports the summary
            return
        set_seed(config.seed)
        self._build()
        self.rss_after_model = current_rss_mb()
        self.trainable, self.total = snell.trainable_parameters(self.model)

    # -- what a kind of task defines (classification: snell.train.classification; causal LM: causal_lm.run) ----

    def _build(self) -> None:
        """Set ``task``, ``backbone`` and ``model``."""
        raise NotImplementedError

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        """A loader over one split: training loaders shuffle with :class:`EpochSampler`."""
        raise NotImplementedError

    def _batch_loss(self, inputs: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean loss of a batch, its correct predictions and how many predictions were scored."""
        raise NotImplementedError

    def eval_metrics(self, loader: DataLoader, split: str) -> dict[str, float]:
        """The metrics one evaluation adds to the epoch's record; "score" (higher is better) selects the epoch."""
        raise NotImplementedError

    def _report(self, progress: Progress, eval_split: str | None) -> Report:
        """The test result of the restored model, for summary.json and the closing line."""
        raise NotImplementedError

    def _save_merged(self, merged: nn.Module, directory: Path) -> None:
        """Write the merged model (``--merge``) the way this kind's tools load it."""
        raise NotImplementedError

    def _adapter_record(self) -> dict[str, Any] | None:
        """What the saved adapter's config records about training, beyond the method's own settings."""
        return None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def _check_output_dir(self) -> None:
        """Refuse to overwrite a run; with --resume, refuse a config that differs from the saved one.

        A folder holds a run once it has an epoch checkpoint or a summary. What a run that failed before
        finishing its first epoch leaves (config.json, an empty metrics file) holds nothing worth keeping, and
        the next run in the folder replaces it: a failed start never blocks the corrected command.
        """
        check_output_folder(self.out, "--output-dir")
        saved = self.out / CONFIG_FILE
        if saved.is_file() and not is_run_config(saved):  # a model's folder, say: the run would overwrite it
            raise UserError(f"{saved} exists and is not a snell run's config; choose another --output-dir")
        holds_run = (self.out / SUMMARY_FILE).is_file() or bool(checkpoint_dirs(self.out))
        if not self.resume:
            if holds_run:
                raise UserError(
                    f"{self.out} already holds a run; pass --resume to continue it, or choose another --output-dir"
                )
            return
        if not holds_run:
            self.resume = False  # nothing to continue: start afresh, with this command's options
            if self.main:  # a mistyped folder would otherwise train from scratch without a word
                print(f"{self.out} holds no run to resume (no epoch checkpoint yet): starting a new run", flush=True)
            return
        if not saved.is_file():
            raise UserError(f"{saved}: not found, but {self.out} holds a run; cannot tell its options")
        try:
            # Through TrainConfig, so that paths saved relative to another folder compare resolved.
            stored = TrainConfig.from_dict(json.loads(saved.read_text())["config"], str(saved)).to_dict()
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{saved}: unreadable run config ({err})") from None
        ignored = ("progress", "num_workers", "output_dir")  # output_dir: a run folder moved elsewhere resumes there
        mine = {k: v for k, v in self.config.to_dict().items() if k not in ignored}
        details = option_changes({k: v for k, v in stored.items() if k not in ignored}, mine)
        if details:
            raise UserError(f"--resume with different options than {saved}: {details}")

    def _train_epoch(self, loader: DataLoader, optimizer: Any, schedule: WarmupCosine, epoch: int) -> dict:
        set_train_mode(self.model)
        cfg = self.config
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.float64)
        seen = torch.zeros((), dtype=torch.float64)
        start = time.time()
        bar = tqdm(
            total=len(loader),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not (cfg.progress and self.main),
            dynamic_ncols=True,
        )
        for inputs, labels in loader:
            with self.accelerator.accumulate(self.model):
                if cfg.fsdp:  # accelerate's no_sync knows DDP only: reduce-scatter once per optimizer step
                    self.model.set_requires_gradient_sync(self.accelerator.sync_gradients)
                loss, batch_correct, batch_seen = self._batch_loss(inputs, labels)
                self.accelerator.backward(loss)
                optimizer.step()
                if self.accelerator.sync_gradients:
                    # Only once per optimizer step, and before zero_grad: the gradients are then the whole step's
                    # (accelerate divides each micro-batch's loss by --grad-accum and steps on the sum; under DDP
                    # they are already averaged over the processes, so every process makes the same allocation).
                    # Under --fp16 the step has unscaled them in place; on a step it skipped they hold the inf or
                    # NaN that made it skip, which the allocator counts as zero sensitivity.
                    if self.allocator is not None:
                        self.allocator.accumulate()
                    if self.ema is not None:
                        self.ema.update(self.accelerator.unwrap_model(self.model))
                    schedule.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double() * batch_seen
            correct += batch_correct
            seen += batch_seen
            bar.update(1)
            elapsed = time.time() - start
            bar.set_postfix(
                loss=f"{loss_sum.item() / max(seen.item(), 1):.4f}",
                acc=f"{correct.item() / max(seen.item(), 1):.3f}",
                per_s=f"{seen.item() * self.accelerator.num_processes / max(elapsed, 1e-9):.1f}",
            )
        bar.close()
        totals = self.accelerator.reduce(torch.stack([loss_sum, correct, seen]).to(self.accelerator.device), "sum")
        loss_total, correct_total, seen_total = (float(t) for t in totals.cpu())
        elapsed = time.time() - start
        return {
            "epoch": epoch + 1,
            "step": schedule.step_count,
            "lr": schedule.last(),  # the rate of the epoch's last step
            "train_loss": loss_total / seen_total,
            "train_acc": correct_total / seen_total,
            f"{self.scored_unit}_per_s": seen_total / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
        }

    # -- checkpoints -----------------------------------------------------------------------------------

    def _save_checkpoint(self, progress: Progress, optimizer: Any, schedule: WarmupCosine) -> None:
        save_checkpoint(self.out, self.accelerator, self.model, optimizer, schedule, progress, self._parts())

    def _restore(self, optimizer: Any, schedule: WarmupCosine) -> Progress:
        return restore_checkpoint(self.out, self.accelerator, self.model, optimizer, schedule, self._parts())

    def _parts(self) -> dict[str, Any]:
        """The run's optional parts a checkpoint holds (None: this run has none)."""
        return {"allocator": self.allocator, "ema": self.ema, "scaler": self.accelerator.scaler}

    # -- the whole run ---------------------------------------------------------------------------------

    def _write_config(self) -> None:
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resume and (self.out / CONFIG_FILE).is_file():
            return
        write_json_atomic(
            self.out / CONFIG_FILE,
            {
                "config": self.config.to_dict(),
                "snell_version": snell.__version__,
                "num_classes": self.task.num_classes,
                "class_names": self.task.class_names,
                "split_sizes": self.task.sizes,
                "num_processes": self.accelerator.num_processes,
                "backbone": self.backbone.info,
            },
        )

    def _record(self, metrics: list[dict[str, Any]]) -> None:
        """metrics.jsonl and curves.png as of the last completed epoch: after a resume, the checkpoint's, so
        neither shows an epoch that the resumed run trains again."""
        if not self.main:
            return
        write_metrics(self.out / METRICS_FILE, metrics)
        curves, sparsity = self.out / CURVES_FILE, self.out / SPARSITY_FILE
        title = f"{self.config.method} on {self.task.name}: {self.config.model}"
        if metrics:
            plot_curves(metrics, curves, title)
        else:
            curves.unlink(missing_ok=True)
        if metrics and self.allocator is not None:
            plot_sparsity(metrics, sparsity, title)
        else:
            sparsity.unlink(missing_ok=True)

    def fit(self) -> dict[str, Any]:
        """Train, select or report per the protocol, save the result, and return the summary."""
        cfg, acc = self.config, self.accelerator
        if self.finished:
            if self.main:
                print(f"{self.out} already finished; its summary is {self.out / SUMMARY_FILE}", flush=True)
            return json.loads((self.out / SUMMARY_FILE).read_text())
        self._write_config()
        train_loader = self._loader(self.task.train, train=True)
        sampler: EpochSampler = train_loader.sampler
        eval_split = "val" if cfg.select_on == "val" else ("test" if cfg.protocol == "reference" else None)
        eval_set = getattr(self.task, eval_split) if eval_split else None
        if cfg.fsdp:  # sharded before the optimizer sees the parameters; accelerate must not wrap it in DDP
            self.model = shard(self.model, acc.device)
        optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8
        )
        if cfg.fsdp:
            optimizer, train_loader = acc.prepare(optimizer, train_loader)
        else:
            self.model, optimizer, train_loader = acc.prepare(self.model, optimizer, train_loader)
        eval_loader = acc.prepare(self._loader(eval_set, train=False)) if eval_set is not None else None
        steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
        schedule = WarmupCosine(optimizer, cfg, steps_per_epoch)
        self.allocator = make_allocator(cfg, acc.unwrap_model(self.model))
        if cfg.ema_decay is not None:
            self.ema = WeightEma(acc.unwrap_model(self.model), cfg.ema_decay)
        if acc.num_processes > 1:
            # Built alike from --seed above; from here each process draws its own dropout masks, DropPath and
            # augmentation for its own samples (one seed on every rank would repeat each rank's draws).
            set_seed(cfg.seed + acc.process_index)
        progress = self._restore(optimizer, schedule) if self.resume else Progress()
        self._record(progress.metrics)
        if self.main:
            print(
                f"{cfg.method} on {self.task.name}: {self.trainable:,} of {self.total:,} parameters trainable; "
                f"train {len(self.task.train)} {self.train_unit}, {cfg.epochs} epoch(s) x {steps_per_epoch} steps "
                f"on {acc.num_processes} process(es)",
                flush=True,
            )
        for epoch in range(progress.epoch, cfg.epochs):
            # accelerate's loader re-sets its sampler's epoch from its own iteration counter, which restarts at
            # 0 in a resumed process: set both, or a resumed epoch would replay epoch 0's order.
            train_loader.set_epoch(epoch)
            sampler.set_epoch(epoch)
            started = time.time()
            if self.allocator is not None and epoch < cfg.allocation_epochs():
                self.allocator.update(epoch)  # before the epoch, with the epoch, as the authors' train_alloc*.py
            record = self._train_epoch(train_loader, optimizer, schedule, epoch)
            if self.allocator is not None:
                record["sparsity"] = sparsity_record(self.allocator)
            if eval_loader is not None and cfg.evaluates_after(epoch):
                metrics = self.eval_metrics(eval_loader, eval_split)
                reshard(self.model)
                score = metrics.pop("score")
                record.update(metrics)
                self._keep_if_best(progress, score, epoch, "model")
                if self.ema is not None:  # scored as the authors' train_alloc_ema.py does, and kept if better
                    with self.ema.applied(acc.unwrap_model(self.model)):
                        metrics = self.eval_metrics(eval_loader, eval_split)
                        record.update({f"ema_{key}": value for key, value in metrics.items() if key != "score"})
                        self._keep_if_best(progress, metrics["score"], epoch, "ema")
            progress.train_time += time.time() - started
            progress.epoch = epoch + 1
            progress.metrics.append(record)
            self._record(progress.metrics)
            if self.main:
                shown = {k: _shown(v) if isinstance(v, float) else v for k, v in record.items() if k != "sparsity"}
                if "sparsity" in record:  # the overall ratio only: the per-layer dict is for the file and the plot
                    shown["sparsity"] = round(record["sparsity"]["overall"], 4)
                if cfg.progress:
                    tqdm.write(json.dumps(shown))
            self._save_checkpoint(progress, optimizer, schedule)
        return self._finish(progress, eval_split)

    def _keep_if_best(self, progress: Progress, score: float, epoch: int, weights: str) -> None:
        """Keep the model's current state as the selection if ``score`` beats the best so far (a tie keeps it)."""
        if score > progress.best_score:
            progress.best_score, progress.best_epoch, progress.best_weights = score, epoch + 1, weights
            progress.best_state = cpu_copies(mutable_state(self.accelerator.unwrap_model(self.model)))
            progress.best_sparsity = self.allocator.sparsity() if self.allocator is not None else None

    def _finish(self, progress: Progress, eval_split: str | None) -> dict[str, Any]:
        """Restore the selected epoch (without evaluations and with --ema-decay: the weight average), score it
        (:meth:`_report`), save the adapter and write summary.json."""
        cfg, acc = self.config, self.accelerator
        model = acc.unwrap_model(self.model)
        if progress.best_state is not None:
            load_mutable_state(model, progress.best_state)
            if self.allocator is not None and progress.best_sparsity is not None:
                self.allocator.set_sparsity(progress.best_sparsity)  # the selected epoch's ΔW, not the last one's
        elif self.ema is not None:
            self.ema.copy_to(model)
            progress.best_weights = "ema"
        report = self._report(progress, eval_split)
        peak, peak_kind = peak_memory_mb(acc.device)
        peaks = acc.gather(torch.tensor([peak], device=acc.device)).cpu().tolist()
        trained = cpu_copies(mutable_state(model)).values()
        fingerprint = float(sum(t.double().sum() + t.double().abs().sum() for t in trained))
        fingerprints = acc.gather(torch.tensor([fingerprint], dtype=torch.float64, device=acc.device)).cpu().tolist()
        summary = {
            "method": cfg.method,
            "data": self.task.name,
            "model": cfg.model,
            **report.fields,
            "protocol": "reference" if cfg.protocol == "reference" else f"select_on={cfg.select_on}",
            "selected_epoch": progress.best_epoch if eval_split else cfg.epochs,
            "selected_weights": progress.best_weights,
            "trainable_params": self.trainable,
            "total_params": self.total,
            "peak_memory_mb": max(peaks),
            "peak_memory_kind": peak_kind,
            "memory_after_model_load_mb": self.rss_after_model,
            "wall_time_s": time.time() - self.started,
            "train_time_s": progress.train_time,
            "num_processes": acc.num_processes,
            "rank_fingerprints": fingerprints,
            "split_sizes": self.task.sizes,
            "backbone_weights": self.backbone.weights,
            "config": cfg.to_dict(),
        }
        with unsharded(model):  # --fsdp: whole tensors for the files; a no-op otherwise
            if self.main:
                save_trained(model, cfg, self.out / "adapter", self._adapter_record())
                if cfg.merge:
                    self._save_merged(merge_trained(model, cfg), self.out / "merged")
        if self.main:
            summary["wall_time_s"] = time.time() - self.started
            write_json_atomic(self.out / SUMMARY_FILE, summary)
            for name, data in report.files.items():
                write_json_atomic(self.out / name, data)
            weights = ", weight average" if progress.best_weights == "ema" else ""
            print(f"{cfg.method}: {report.line}  (run folder {self.out}{weights})", flush=True)
        acc.wait_for_everyone()
        # Tear the process group down before the interpreter exits: left to exit, gloo's threads can die
        # with "terminate called without an active exception" (SIGABRT), seen once in the sharded test.
        acc.end_training()
        return summary


def train(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run ``snell train`` with a resolved config and return its summary."""
    from snell.train.causal_lm import is_causal_lm

    if is_causal_lm(config.model):
        from snell.train.causal_lm.run import CausalLMRun

        return CausalLMRun(config, resume).fit()
    from snell.train.causal_lm.instructions import holds_instructions
    from snell.train.causal_lm.source import describe_model

    if holds_instructions(config.data):
        raise UserError(
            f"{config.data} holds instruction data, which trains a causal LM, but --model {config.model} is "
            f"{describe_model(config.model)}; give a causal LM folder (...ForCausalLM, GPT2LMHeadModel) or a .gguf file"
        )
    from snell.train.classification import ClassificationRun

    return ClassificationRun(config, resume).fit()
