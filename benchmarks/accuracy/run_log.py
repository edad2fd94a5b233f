"""The pretraining scripts' log: every line printed and the whole file rewritten, so a run stopped at any point
leaves a log complete up to its last line."""

from __future__ import annotations

from pathlib import Path


class RunLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)
        self.path.write_text("\n".join(self.lines) + "\n")
