"""Results written as they are measured: each line printed and appended to a markdown file, flushed and
synced, so that an interrupted benchmark (a time limit, a lost machine) keeps every row it measured."""
from __future__ import annotations

import os
from pathlib import Path


def append(path: Path | str, text: str) -> None:
    """Append `text` to `path` and push it to the disk before returning."""
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class Rows:
    """A markdown table printed (and appended to a file, when given one) line by line."""

    def __init__(self, path: Path | str | None):
        self.path = Path(path) if path else None

    def line(self, text: str) -> None:
        print(text, flush=True)
        if self.path is not None:
            append(self.path, text + "\n")
