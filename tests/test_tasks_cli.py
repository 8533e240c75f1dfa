"""Task packs from the command line, as a new user meets them: resuming a results file under another task,
a changed pack, inspect --adapter --base, bench --task on a named backend, pack --views, the messages for a
pack on a plain bundle or a directory."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_tasks import KW, tasks  # noqa: F401 - the module fixture: a swappable tiny base, full exports, B's pack

from stexport.errors import StexportError


def cli(*args):
    return subprocess.run([sys.executable, "-m", "stexport.cli.app", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


def test_resuming_a_results_file_of_another_task_is_refused(tasks, make_video, tmp_path):  # noqa: F811
    videos = [make_video(f"v{i}.mp4", frames=24, width=64, height=48) for i in range(2)]
    out = tmp_path / "out.jsonl"
    base = ["infer", *videos, "-m", tasks["base"].path, "-b", "onnxruntime", "--output", out]
    r = cli(*base, "--task", tasks["pack_b"].path)
    assert r.returncode == 0, r.stderr
    rows = [strict(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and all(row["task"] == "task_b" for row in rows)
    before = out.read_bytes()
    r = cli(*base)  # the bundle's own task on a file of task_b's results
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "line 1 holds a result of task task_b, this run is the bundle's own task" in r.stderr
    assert "pass another --output file" in r.stderr and out.read_bytes() == before
    r = cli(*base, "--task", tasks["pack_b"].path)  # the same task resumes: nothing left to do
    assert r.returncode == 0 and "2 of 2 inputs already done; resuming" in r.stderr
    own = tmp_path / "own.jsonl"
    assert cli("infer", *videos, "-m", tasks["base"].path, "-b", "onnxruntime", "--output", own).returncode == 0
    r = cli("infer", *videos, "-m", tasks["base"].path, "-b", "onnxruntime", "--output", own,
            "--task", tasks["pack_b"].path)
    assert r.returncode == 2, r.stderr
    assert "holds a result of the bundle's own task, this run is task task_b" in r.stderr


def test_a_changed_pack_is_refused(tasks, tmp_path):  # noqa: F811
    """One float of a graph tensor, or bytes of the checkpoint's state dict, changed after `stexport pack`:
    refused when loaded (the pack records the sha256 of its tensors), never run."""
    from safetensors import safe_open

    from stexport.bundle.taskpack import TaskPack

    src = tasks["pack_b"].path
    data = src.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    with safe_open(str(src), framework="numpy") as f:
        names = list(f.keys())
    head = next(n for n in names if n.startswith("head"))
    delta = next(n for n in names if n.startswith("deltas/"))
    meta = json.loads(data[8:header])
    for name in (head, delta):
        start = header + meta[name]["data_offsets"][0]
        bad = bytearray(data)
        value = np.frombuffer(bytes(bad[start:start + 4]), np.float32)[0]
        bad[start:start + 4] = np.float32(value + 1.0).tobytes()
        p = tmp_path / f"{name.replace('/', '_')}.stpack"
        p.write_bytes(bytes(bad))
        with pytest.raises(StexportError, match="its tensors or record changed since `stexport pack` wrote it"):
            TaskPack.load(p)
        r = cli("infer", tmp_path / "none.mp4", "-m", tasks["base"].path, "--task", p)
        assert r.returncode == 2 and "its tensors or record changed" in r.stderr and "Traceback" not in r.stderr
    # the record in the header (name, sampling, labels, base): same length, other text
    old = b'\\"name\\": \\"task_b\\"'  # the record is a JSON string inside the header's JSON
    i = data.index(old)
    bad = data[:i] + old.replace(b"task_b", b"task_x") + data[i + len(old):]
    (tmp_path / "renamed.stpack").write_bytes(bad)
    with pytest.raises(StexportError, match="its tensors or record changed"):
        TaskPack.load(tmp_path / "renamed.stpack")
    (tmp_path / "dir.stpack").mkdir()
    with pytest.raises(StexportError, match=r"dir.stpack: is a directory; --task takes a task pack file"):
        TaskPack.load(tmp_path / "dir.stpack")


def test_a_pack_on_a_plain_bundle_names_the_base_it_was_made_for(tasks):  # noqa: F811
    with pytest.raises(StexportError) as e:
        tasks["pack_b"].check_fits(tasks["full_a"])
    msg = str(e.value)
    assert "bundle full_a is not swappable" in msg and "run the pack on the base it was made for (base)" in msg
    assert "stexport pack --adapter CKPT --base" not in msg  # pack refuses a plain bundle: never suggest it


def test_inspect_adapter_against_a_base(tasks, tmp_path):  # noqa: F811
    from stexport.build.backbone import random_backbone
    from stexport.build.deltas import save_official
    from stexport.build.synthetic import random_deltas

    r = cli("inspect", "--adapter", tasks["b"], "--base", tasks["base"].path, "--json")
    assert r.returncode == 0, r.stderr
    rep = strict(r.stdout)
    assert rep["backbone"] == "stexport-tiny-vit" and rep["fits_base"] is True and rep["base_error"] is None
    big = tmp_path / "classes13.pt"
    save_official(big, random_deltas(random_backbone("stexport-tiny-vit").config, num_classes=13, **KW))
    r = cli("inspect", "--adapter", big, "--base", tasks["base"].path)
    assert r.returncode == 1 and "NO: 13 classes, the base's head has 12 rows" in r.stdout, r.stdout
    r = cli("inspect", "--adapter", tasks["b"], "--base", tasks["full_a"].path, "--json")
    assert r.returncode == 1 and strict(r.stdout)["base_error"].startswith("not a swappable bundle")
    r = cli("inspect", "--adapter", tasks["b"], "--base", tmp_path / "nowhere")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nowhere" in r.stderr


@pytest.mark.parametrize("mode", ["--in-process", None])
def test_bench_task_on_a_named_backend(tasks, mode):  # noqa: F811
    args = ["bench", tasks["base"].path, "--task", tasks["pack_b"].path, "-b", "onnxruntime", "--iters", "1",
            "--warmup", "0", "--batch", "1", "--no-peaks", "--json"] + ([mode] if mode else [])
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    res = strict(r.stdout)
    assert res["task"]["name"] == "task_b" and res["backend"] == "onnxruntime"
    r = cli(*[a for a in args if a != "--json"])
    assert r.returncode == 0 and "task          task_b" in r.stdout


def test_pack_views_and_inspect_shows_sampling(tasks, tmp_path):  # noqa: F811
    out = tmp_path / "b31.stpack"
    r = cli("pack", "--adapter", tasks["b"], "--base", tasks["base"].path, "-o", out, "--views", "3x1",
            "--rate", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert strict(r.stdout)["sampling"] == {"rate": 4, "temporal_views": 3, "spatial_views": 1}
    r = cli("inspect", "--task", out)
    assert r.returncode == 0 and "sampling       rate 4, 3x1 views" in r.stdout
    r = cli("inspect", "--task", out, "--json")
    assert strict(r.stdout)["sampling"] == {"rate": 4, "temporal_views": 3, "spatial_views": 1}


def test_resume_refuses_another_model_or_sampling(tasks, make_video, tmp_path):  # noqa: F811
    """Resuming checks what the results were made with, not only the task's name: a pack of the same name
    made from other weights, or other views, is refused; the same run resumes."""
    from stexport.build.packing import build_pack

    videos = [make_video(f"v{i}.mp4", frames=24, width=64, height=48) for i in range(2)]
    impostor = build_pack(tasks["a"], tasks["base"], out=tmp_path / "imp.stpack", name="task_b")
    out = tmp_path / "out.jsonl"
    run = ["infer", *videos, "-m", tasks["base"].path, "-b", "onnxruntime", "--output", out]
    assert cli(*run, "--task", tasks["pack_b"].path).returncode == 0
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n")  # one input left to do
    r = cli(*run, "--task", impostor.path)
    assert r.returncode == 2 and "its results were made with another task sha256" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and out.read_text() == lines[0] + "\n"
    r = cli(*run, "--task", tasks["pack_b"].path, "--views", "1x1")
    assert r.returncode == 2 and "its results were made with another sampling" in r.stderr, r.stderr
    r = cli(*run, "--task", tasks["pack_b"].path)

    def untimed(rows):
        return [{k: v for k, v in strict(x).items() if k != "timing"} for x in rows]

    assert r.returncode == 0 and untimed(out.read_text().splitlines()) == untimed(lines)
