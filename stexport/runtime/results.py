"""A JSON Lines results file (`stexport infer --output FILE`) that a rerun resumes.

One line per source, `infer --json`'s schema ({"path", "top", …} or {"path", "error"}), written in input order
and flushed line by line. Reopening the file reads the sources already done (failures count as done: a damaged
file stays damaged); a last line cut short by a kill is dropped. `remaining(sources)` then leaves out what is
done, counting repeats (a source listed twice needs two lines).

What the results were made with (the run: bundle and its files' hashes, task pack and its sha256, sampling,
top-k, labels) is kept beside the file in `.<name>.run.json`; a rerun that differs in any of them is refused
instead of appending answers of another model or sampling to the same file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from stexport.errors import StexportError


class ResultsFile:
    """Open (creating it, or resuming it) a results file for a run of `task` (a task pack's or a multi-task
    bundle's task name; None: the bundle's own task). Raises StexportError for a file that is not stexport's
    JSON Lines (a line that does not parse, or lacks "path"), a directory, or a file holding results of
    another task (resuming it would mix two tasks' answers in one file). A path that is not a regular file
    (/dev/stdout, a FIFO) is written to but never read back: nothing resumes from it."""

    def __init__(self, path: str | Path, task: str | None = None, run: dict | None = None):
        self.path = Path(path)
        self.task = task
        self.run = run
        self.run_path = self.path.parent / f".{self.path.name}.run.json"
        self.done: Counter[str] = Counter()
        self.lines = 0
        if self.path.is_dir():
            raise StexportError(f"{self.path}: is a directory; --output takes a file (JSON Lines)")
        if self.path.exists() and not self.path.is_file():  # /dev/stdout, a FIFO: written, never resumed
            self.run = None
        elif self.path.exists():
            self._read()
            self._check_run()
        self._fh = None

    def _read(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line cut short by a kill: drop it, the source runs again
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                path = row["path"]
            except (ValueError, KeyError, TypeError):
                raise StexportError(f"{self.path}: line {n} is not a stexport result; --output resumes only "
                                    "files stexport wrote: pass another file or remove this one") from None
            if row.get("task") != self.task:
                def show(t):
                    return f"task {t}" if t else "the bundle's own task"
                raise StexportError(f"{self.path}: line {n} holds a result of {show(row.get('task'))}, this run is "
                                    f"{show(self.task)}; pass another --output file (or remove this one)")
            self.done[str(path)] += 1
            self.lines += 1

    def _check_run(self) -> None:
        if self.run is None or not self.run_path.is_file():
            return
        try:
            before = json.loads(self.run_path.read_text())
        except (OSError, ValueError):
            return
        for key, now in self.run.items():
            if key in before and before[key] != now:
                raise StexportError(f"{self.path}: its results were made with another {key.replace('_', ' ')} "
                                    f"({_short(before[key])}, this run: {_short(now)}); pass another --output file "
                                    f"(or remove it and {self.run_path.name})")

    def remaining(self, sources: Sequence) -> list[tuple[int, str]]:
        """(index in `sources`, source) for each source not yet done, in input order."""
        left = Counter(self.done)
        out = []
        for i, s in enumerate(sources):
            if left[str(s)] > 0:
                left[str(s)] -= 1
            else:
                out.append((i, str(s)))
        return out

    def write(self, row: dict) -> None:
        """Append one result (a to_dict()) and flush it to the OS, so a kill loses at most the line being
        written. Strict JSON (NaN/Infinity raise ValueError)."""
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.run is not None:
                from stexport.fileutil import atomic_write_text

                atomic_write_text(self.run_path, json.dumps(self.run, indent=1) + "\n")
            self._fh = open(self.path, "a", encoding="utf-8")
        line = json.dumps(row, allow_nan=False) + "\n"
        try:
            self._fh.write(line)
            self._fh.flush()
        except OSError as e:  # a full disk: the torn line is repaired when the file is reopened
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self.done[str(row["path"])] += 1
        self.lines += 1

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.flush()
                os.fsync(fh.fileno())
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self.path)) from None
            finally:
                with contextlib.suppress(OSError):
                    fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _short(v) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= 40 else text[:16] + "…"
