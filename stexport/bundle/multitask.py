"""The tasks of a multi-task bundle (runtime wing: no torch): one graph, a task index per clip.

A multi-task bundle (stexport.build.multitask; manifest record `multitask`) holds every task's adapters and
head in one graph with a second input, the task index of each clip (int64 [B]). A `BundleTask` names one of
its tasks and quacks like a loaded TaskPack where the runtime needs one (name, classes, labels, default
sampling, a cache key), so `Classifier(task=...)`, `classify(..., task=)`, `classify_batch` with
(source, task) pairs and `infer --task NAME` take task names on such a bundle:

    t = task_of(bundle, "ssv2")                  # by name or index; StexportError naming the tasks otherwise
    backend.run(clips, task=t)                   # one task for the whole call
    backend.run_tasks(clips, [t0, t1, t0])       # one task per clip, one backend call: (B, head_rows) logits
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stexport.errors import StexportError


@dataclass(frozen=True)
class BundleTask:
    """Task `index` (`name`, `classes`, `labels`) of the multi-task bundle at `path`; `record` is its manifest
    entry (TaskEntry: also its default sampling and checkpoint), `key` what results and caches know it by."""

    path: Path
    record: object
    key: str
    name: str
    index: int
    classes: int
    labels: tuple[str, ...]
    deltas_file: Path | None = None  # the bundle's task_deltas artifact

    @property
    def deltas(self) -> dict[str, np.ndarray]:
        """The task's checkpoint state dict (official layout; numpy), as a TaskPack's `deltas`: what its
        PyTorch reference is built from (verify --task). StexportError when the bundle holds none."""
        if self.deltas_file is None:
            raise StexportError(f"{self.path}: holds no task state dicts (task_deltas); rebuild it with "
                                "`stexport multitask --force`")
        from safetensors.numpy import load_file

        prefix = f"{self.index}/"
        return {k[len(prefix):]: v for k, v in load_file(str(self.deltas_file)).items() if k.startswith(prefix)}

    def check_fits(self, bundle) -> None:
        """StexportError unless this is a task of `bundle` (a multi-task bundle)."""
        if bundle.manifest.multitask is None or task_of(bundle, self.name).key != self.key:
            raise StexportError(f"task {self.name} is a task of {self.path}, not of {bundle.path}")


def names(bundle) -> list[str]:
    mt = bundle.manifest.multitask
    return [t.name for t in mt.tasks] if mt is not None else []


def task_of(bundle, task) -> BundleTask:
    """`task` (a BundleTask, a task name, or an index: int or its digits) of multi-task `bundle`. Raises
    StexportError (one line) for a bundle that is not multi-task or a name it does not hold, listing its tasks."""
    mt = bundle.manifest.multitask
    if mt is None:
        raise StexportError(f"{bundle.path}: not a multi-task bundle; --task NAME needs one built with "
                            "`stexport multitask` (a swappable bundle takes a task pack file)")
    if isinstance(task, BundleTask):
        task = task.name
    by_name = {t.name: t for t in mt.tasks}
    rec = by_name.get(str(task))
    if rec is None and (isinstance(task, (int, np.integer)) or str(task).isdigit()):
        i = int(task)
        rec = mt.tasks[i] if 0 <= i < len(mt.tasks) else None
    if rec is None:
        raise StexportError(f"task {str(task)!r}: {bundle.path.name} holds tasks {', '.join(by_name)}; pass one "
                            f"of them or its index, 0 to {len(mt.tasks) - 1} (--task NAME)")
    # a digest, like a pack's key: caches (verify's reference logits) take its first characters
    m = bundle.manifest
    key = hashlib.sha256(f"{m.name}\n{m.created}\n{rec.index}\n{rec.name}\n{rec.adapter.sha256}".encode()).hexdigest()
    return BundleTask(path=bundle.path, record=rec, key=key,
                      name=rec.name, index=rec.index, classes=rec.classes, labels=tuple(rec.labels),
                      deltas_file=bundle.file("task_deltas", verify=False) if bundle.has("task_deltas") else None)


def indices(tasks, count: int, default: int = 0) -> np.ndarray:
    """The graph's task input for `count` clips: int64 (count,). tasks: None (`default` for every clip), one
    BundleTask (every clip), or a sequence of BundleTask/None, one per clip."""
    if tasks is None or isinstance(tasks, BundleTask):
        return np.full(count, default if tasks is None else tasks.index, np.int64)
    out = np.array([default if t is None else t.index for t in tasks], np.int64)
    if out.shape != (count,):
        raise StexportError(f"{len(out)} tasks for {count} clips: give one task per clip")
    return out


def round_robin_feed(names: list[str], frames: np.ndarray, clip: int, tasks: int = 0) -> dict[str, np.ndarray]:
    """The feed of a graph run on calibration or check clip number `clip` (frames: its batch of views under the
    graph's first input, names[0]). A multi-task graph (`tasks` > 0 tasks, its task input names[1]) runs every
    view of clip `clip` as task clip % tasks: clips of all tasks, each with its own task index, so ranges and
    checks see every task's adapters (INT8 calibration, the FP16 check of `stexport multitask`)."""
    feed = {names[0]: frames}
    if tasks:
        feed[names[1]] = np.full(len(frames), clip % tasks, np.int64)
    return feed


def default_task(bundle, task):
    """`task`, or 0 where `task` is None and `bundle` is multi-task: its first task is the bundle's own (what
    its graph runs when given no task index), named so that every result says which task answered (infer,
    Classifier, classify_batch, serve). Other bundles: `task` unchanged (None: the bundle's own task)."""
    return 0 if task is None and bundle.manifest.multitask is not None else task


def loaded_task(bundle, task):
    """`task` for `bundle`: on a multi-task bundle a BundleTask (by name, index or BundleTask), else a loaded
    TaskPack (a TaskPack or a pack's path) checked to fit it. StexportError (one line) otherwise."""
    if bundle.manifest.multitask is not None:
        return task_of(bundle, task)
    from stexport.bundle.taskpack import as_pack

    if bundle.manifest.tasks is None and isinstance(task, (str, Path)) and not Path(task).is_file():
        raise StexportError(f"--task {task}: {bundle.path.name} runs its own task only (neither swappable nor "
                            "multi-task); --task takes a task pack of a swappable bundle (`stexport build "
                            "--swappable`, then `stexport pack`) or a task of a multi-task bundle (`stexport "
                            "multitask`)")
    pack = as_pack(task)
    pack.check_fits(bundle)
    return pack


def task_label(task) -> str:
    """How messages name where `task`'s labels come from: 'task NAME of the multi-task bundle' or 'task pack
    NAME'."""
    return f"task {task.name} of the multi-task bundle" if isinstance(task, BundleTask) else f"task pack {task.name}"


def run_title(bundle, task=None) -> str:
    """How run headers name what runs: 'task NAME (i of N) of BUNDLE' for a multi-task bundle's task (a
    BundleTask), 'task NAME (FILE) on BUNDLE' for a loaded TaskPack, the bundle's path for its own
    task."""
    if task is None:
        return str(bundle.path)
    if isinstance(task, BundleTask):
        return f"task {task.name} ({task.index} of {len(bundle.manifest.multitask.tasks)}) of {bundle.path}"
    return f"task {task.name} ({task.path}) on {bundle.path}"


def task_ref(task) -> str:
    """What names `task` (a BundleTask or a loaded TaskPack) for a worker that loads it again
    (ClassifierSpec.task): a multi-task bundle's task name, a pack's absolute path."""
    return task.name if isinstance(task, BundleTask) else str(Path(task.path).resolve())


__all__ = ["BundleTask", "task_of", "default_task", "loaded_task", "task_label", "run_title", "task_ref",
           "indices", "names", "round_robin_feed"]
