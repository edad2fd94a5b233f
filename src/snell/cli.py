"""The `snell` command: train, search, eval, merge and demo. Thin: parsing here, the work in snell.train.

User mistakes (a bad file, flag, recipe or checkpoint) end with one line on stderr and exit code 2, no
traceback (under torchrun, from the first process); set SNELL_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

USAGE_ERROR = 2
#: What `snell demo` compares by default: a causal LM has no head for linear probing.
DEMO_METHODS = {"image": "snell,lora,full,linear", "text": "snell,lora,full,linear", "llm": "snell,lora,dora,full"}


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: a mistyped flag value printed the whole usage block (about 50
    lines for `snell train`) before the message. Subcommands' parsers are of this class too."""

    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        _report(f"{self.prog}: error: {message} (see {self.prog} --help)")
        self.exit(USAGE_ERROR)

    def parse_args(  # type: ignore[override] - argparse's overloads
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """An unknown flag after a command is that command's error (`snell train: error: ...`): argparse reports
        it from the top-level parser, which only says `snell: error:`."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            owner = getattr(self, "commands", {}).get(getattr(parsed, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def _path(text: str) -> Path:
    """A path argument; an empty one (an unset shell variable) is refused rather than read as the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?); give a file or folder")
    return Path(text)


def _eval_limit(text: str) -> int | None:
    """`snell eval --max-eval-samples`: a positive count, or "all" (None: no limit)."""
    if text == "all":
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive number of records or 'all', got {text!r}")


def _build_parser() -> argparse.ArgumentParser:
    from snell.train.flags import add_train_arguments
    from snell.train.search import add_search_arguments

    parser = _Parser(prog="snell", description="SNELL sparse fine-tuning: train, evaluate, merge.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a model (snell, snella, lora, dora, full or linear)")
    add_train_arguments(train)

    search = commands.add_parser("search", help="pick sparsity (lr, rank) on val, retrain the winner, report test")
    add_search_arguments(search)

    evaluate = commands.add_parser("eval", help="evaluate a run's saved adapter")
    evaluate.add_argument("run_dir", type=_path, help="the run folder written by `snell train`")
    evaluate.add_argument(
        "--split", default="test", choices=("test", "val"), help="the split to evaluate on [default: test]"
    )
    evaluate.add_argument("--adapter", type=_path, default=None, help="adapter folder (default: RUN_DIR/adapter)")
    evaluate.add_argument(
        "--data",
        default=None,
        help="evaluate on other data: a classifier's with the same classes, a causal LM's folder with the split",
    )
    evaluate.add_argument(
        "--max-eval-samples",
        type=_eval_limit,
        default=argparse.SUPPRESS,  # a string default would go through the type
        help="score the split's first N records, or all of them [default: the run's own --max-eval-samples]",
    )

    merge = commands.add_parser("merge", help="fold a run's adapter into the backbone weights")
    merge.add_argument("run_dir", type=_path, help="the run folder written by `snell train`")
    merge.add_argument("--output", type=_path, default=None, help="output folder (default: RUN_DIR/merged)")
    merge.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty output folder (its files of the same names are replaced)",
    )

    demo = commands.add_parser("demo", help="compare the methods on real data and models, offline")
    demo.add_argument(
        "--task", default="image", choices=("image", "text", "llm"), help="what to fine-tune [default: image]"
    )
    demo.add_argument(
        "--output-dir", type=_path, default=None, help="results folder (default: results/demo/<task>-<time>)"
    )
    demo.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods [default: {DEMO_METHODS['image']}; --task llm: {DEMO_METHODS['llm']}]",
    )
    demo.add_argument("--epochs", type=int, default=None, help="override the demo's epoch budget")
    demo.add_argument(
        "--model", type=_path, default=None, help="--task llm: another causal LM (default: SmolLM2-135M-Instruct)"
    )
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    parser.commands = dict(commands.choices)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from snell.train.flags import config_from_args
        from snell.train.loop import train

        train(config_from_args(args), resume=args.resume)
    elif args.command == "search":
        from snell.train.search import search_from_args

        search_from_args(args)
    elif args.command == "eval":
        from snell.train.config import RUNS_OWN_LIMIT
        from snell.train.evaluate import evaluate_run

        limit = getattr(args, "max_eval_samples", RUNS_OWN_LIMIT)
        result = evaluate_run(args.run_dir, args.split, args.adapter, args.data, limit)
        if result.get("accuracy") is not None:  # a causal LM's data without answers gives loss and perplexity only
            print(f"{result['split']} accuracy: {result['accuracy']:.4f} ({result['examples']} examples)")
        print(json.dumps(result))
    elif args.command == "merge":
        from snell.train.evaluate import merge_run

        print(f"merged model written to {merge_run(args.run_dir, args.output, args.force)}")
    elif args.task == "llm":
        from snell.train.causal_lm.demo import run_llm_demo

        methods = [m.strip() for m in (args.methods or DEMO_METHODS["llm"]).split(",") if m.strip()]
        run_llm_demo(methods, args.output_dir, args.epochs, args.progress, args.model)
    else:
        from snell.train.config import UserError

        if args.model is not None:
            raise UserError("--model is for --task llm; the image and text demos use their packaged models")
        from snell.train.demo import run_demo

        methods = [m.strip() for m in (args.methods or DEMO_METHODS[args.task]).split(",") if m.strip()]
        run_demo(args.task, methods, args.output_dir, args.epochs, args.progress)
    return 0


def _report(line: str) -> None:
    """A user error's one line: on stderr from the first process only (under torchrun every process meets the same
    flags and files), and into the launcher's error file from every process, so that torchrun's failure report (and
    accelerate launch's, which runs it) shows each failed process's line, including one only another process met."""
    from snell.train.config import first_process

    if first_process():
        print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # torchrun's format: a message without "py_callstack" is shown as it is
        record = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
        with contextlib.suppress(OSError):
            Path(error_file).write_text(json.dumps(record))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `snell` console script and of `python -m snell`."""
    # peft reads a model attribute that transformers renamed: a warning about the installed pair that a user of the
    # command cannot act on (the library leaves warnings alone).
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    args = _build_parser().parse_args(argv)
    from snell.train.config import UserError
    from snell.train.data import DataFormatError

    try:
        code = _run(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except BrokenPipeError:  # `snell eval RUN | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 0
    except (UserError, DataFormatError, FileNotFoundError) as err:
        if os.environ.get("SNELL_DEBUG"):
            raise
        _report(f"snell {args.command}: error: {err}")
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"snell {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
