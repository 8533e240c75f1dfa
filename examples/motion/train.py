"""Train the stexport motion demo: a stand-in CLIP image ViT, then ST-Adapter deltas on top of it, frozen.

No CLIP weights can be downloaded here, and a frozen *random* ViT passes almost nothing of its input to the
class token, so the demo does what the paper assumes happened before ST-Adapter: it pretrains the backbone as
an image model, then freezes it.

Stage 1 (image model): `stexport-demo-vit` from a seeded open_clip init learns single frames: class token →
shape (cross-entropy) and the object's position, size, opacity, colour and angle (regression).
Writes backbone.safetensors (FP16-representable, like OpenAI's release; loadable with
`--backbone stexport-demo-vit --pretrained backbone.safetensors`).

Stage 2 (video model): the backbone is loaded back through stexport.build.backbone.load_backbone and frozen; adapters
before attention and before the MLP of every block (width d/2, kernel (3,1,1), conv and biases zero-initialised
as in the official code) and the head are trained with AdamW (weight decay 1e-2, warmup + cosine) on fresh
clips every step. Writes motion_adapter.pt in the official checkpoint layout (optimizer state left out).

Every clip, in training as in evaluation, is rendered by generate.py, encoded to an MPEG-4 file and decoded
by stexport.runtime.video.decode_clips with the demo's sampling (8 frames evenly over the whole video, one 96 px view).

    python examples/motion/train.py --out examples/motion          # both stages (the shipped backbone: stage 1)
    python examples/motion/train.py --skip-stage1 --out examples/motion   # stage 2 only: the shipped adapter
    B="--skip-stage1 --backbone examples/motion/backbone.safetensors"
    python examples/motion/train.py $B --kernel 1 --out runs/k1    # ablation: no temporal kernel
    python examples/motion/train.py $B --probe --out runs/probe    # ablation: head only

Stage 2 with the defaults (1000 steps of 36 clips, lr 3e-3) takes about 30 min on 2 CPU cores (two runs side by
side, one thread each) and reached 98.9% top-1 on the val split; not part of CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import generate as gen

from stexport.build.backbone import ViTConfig, load_backbone, random_backbone
from stexport.build.deltas import AdapterSpec, Deltas, save_official
from stexport.build.reference import STAdapterViT, build_reference, normalize
from stexport.runtime.video import Sampling, decode, decode_clips, frame_indices, read_clip_list

BACKBONE = "stexport-demo-vit"
SAMPLING = Sampling(frames=8, size=gen.SIZE, rate=0, temporal_views=1, spatial_views=1)
STREAMS = {"stage1": 10, "stage2": 11}  # rng streams of training clips, apart from the splits' (0, 1, 2)
HERE = Path(__file__).parent


class Clips:
    """Fresh clips through the real codec: render → MPEG-4 file in a scratch dir → decode with SAMPLING."""

    def __init__(self, seed: int, stream: str):
        self.seed, self.stream = seed, STREAMS[stream]
        self.dir = Path(tempfile.mkdtemp(prefix="motion-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))

    def batch(self, step: int, size: int) -> tuple[np.ndarray, np.ndarray, list]:
        """uint8 (size, T, S, S, 3), labels (size,), and per clip (track, indices of the sampled frames)."""
        rng = np.random.default_rng([self.seed, self.stream, step])
        labels = rng.permutation(np.resize(np.arange(len(gen.CLASSES)), size))
        clips, tracks = [], []
        for i, label in enumerate(labels):
            frames, track = gen.render(rng, int(label))
            path = self.dir / f"{i}.mp4"
            gen.write_video(path, frames)
            d = decode(str(path), SAMPLING)
            clips.append(d.clips[0])
            tracks.append((track, frame_indices(d.frames, SAMPLING)[0]))
        return np.stack(clips), labels, tracks

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def log_line(log, **rec) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if log:
        with open(log, "a") as f:
            f.write(line + "\n")


# ----------------------------------------------------------------------------------------------- stage 1


def image_spec(cfg: ViTConfig) -> AdapterSpec:
    """No adapters; the head predicts shape logits and the object's attributes."""
    return AdapterSpec(dim=cfg.width, width=1, kernel=(1, 1, 1), pre_attn=(), pre_mlp=(),
                       num_classes=len(gen.SHAPES) + gen.NUM_ATTRIBUTES)


def tokens(model: STAdapterViT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Single frames (N, 3, S, S) → (ln_post(class token), patch tokens (N, grid², d)): the reference forward
    with T = 1, stopped before the head so that patch tokens can be supervised too."""
    x = model.conv1(x).flatten(-2).permute(0, 2, 1)
    cls = model.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = model.ln_pre(torch.cat([cls, x], dim=1) + model.positional_embedding)
    x = model.transformer(x, 1)
    return model.ln_post(x[:, 0]), x[:, 1:]


def patch_targets(track: gen.Track, i: int, grid: int) -> np.ndarray:
    """Per patch of frame i: the object's visible coverage, and its colour weighted by it: (grid², 4)."""
    p = gen.SIZE // grid
    cover = gen.mask(track, i, gen.SIZE).reshape(grid, p, grid, p).mean((1, 3)) * track.alpha[i]
    color = track.color[i] / 255.0
    return np.concatenate([cover[..., None], cover[..., None] * color], -1).reshape(grid * grid, 4)


def train_backbone(out: Path, steps: int, clips_per_step: int, lr: float, seed: int, log) -> Path:
    """Stage 1: pretrain the ViT on single decoded frames; save its vision tower (FP16) as safetensors.

    Targets: the shape (class token, cross-entropy), the object's position, size, opacity and colour (class
    token, regression) and, per patch, the object's coverage and colour (patch tokens, regression): the
    dense targets teach the patch tokens what the adapters later compare across frames.
    """
    from safetensors.torch import save_file

    init = random_backbone(BACKBONE, seed=seed, fp16_round=False)
    cfg = init.config
    model = STAdapterViT(cfg, image_spec(cfg))
    model.load_state_dict(init.state_dict, strict=False)
    model.eval()  # dropout off; the ViT has no other train-mode behaviour
    dense = torch.nn.Linear(cfg.width, 4)
    params = [*model.parameters(), *dense.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    data = Clips(seed, "stage1")
    ns = len(gen.SHAPES)
    t0 = time.time()
    try:
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * cosine(step, steps, warmup=min(50, steps // 10 + 1))
            clips, _, tracks = data.batch(step, clips_per_step)
            x = normalize(torch.from_numpy(clips)).transpose(1, 2).flatten(0, 1)  # (B*T, 3, S, S)
            shape = torch.tensor([t.shape for t, _ in tracks]).repeat_interleave(SAMPLING.frames)
            attrs = torch.from_numpy(np.stack([t.attributes(i, gen.SIZE) for t, idx in tracks for i in idx]))
            patches = torch.from_numpy(np.stack([patch_targets(t, i, cfg.grid) for t, idx in tracks
                                                 for i in idx]).astype(np.float32))
            cls, tok = tokens(model, x)
            y = model.fc(cls)
            loss_shape = F.cross_entropy(y[:, :ns], shape)
            loss_attr = F.mse_loss(y[:, ns:], attrs)
            loss_dense = F.mse_loss(dense(tok), patches)
            loss = loss_shape + 10 * (loss_attr + loss_dense)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % 25 == 0 or step == steps - 1:
                acc = (y[:, :ns].argmax(1) == shape).float().mean().item()
                log_line(log, stage=1, step=step, loss_shape=round(loss_shape.item(), 4),
                         loss_attr=round(loss_attr.item(), 5), loss_dense=round(loss_dense.item(), 5),
                         shape_acc=round(acc, 3), seconds=round(time.time() - t0, 1))
    finally:
        data.close()
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    path = out / "backbone.safetensors"
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(sd, str(tmp), metadata={"backbone": BACKBONE, "trained_by": "examples/motion/train.py stage 1"})
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------- stage 2


def initial_deltas(cfg: ViTConfig, kernel: tuple[int, int, int], width: int, seed: int) -> Deltas:
    """Adapters on every block, before attention and before the MLP, initialised as the official code does:
    fc1/fc2 weights nn.Linear's default, their biases and the whole conv zero (each adapter starts as the
    identity), head weight N(0, 0.02²), bias 0."""
    torch.manual_seed(seed)
    blocks = tuple(range(cfg.layers))
    spec = AdapterSpec(dim=cfg.width, width=width, kernel=kernel, pre_attn=blocks, pre_mlp=blocks,
                       num_classes=len(gen.CLASSES))
    sd = {}
    for i in blocks:
        for pos in ("pre_attn", "pre_mlp"):
            p = f"transformer.resblocks.{i}.adapter_{pos}."
            fc1, fc2 = torch.nn.Linear(cfg.width, width), torch.nn.Linear(width, cfg.width)
            sd[p + "fc1.weight"], sd[p + "fc1.bias"] = fc1.weight.detach(), torch.zeros(width)
            sd[p + "conv.weight"], sd[p + "conv.bias"] = torch.zeros(width, 1, *kernel), torch.zeros(width)
            sd[p + "fc2.weight"], sd[p + "fc2.bias"] = fc2.weight.detach(), torch.zeros(cfg.width)
    sd["fc.weight"] = torch.randn(len(gen.CLASSES), cfg.width) * 0.02
    sd["fc.bias"] = torch.zeros(len(gen.CLASSES))
    return Deltas(spec=spec, state_dict=sd)


def delta_state(model: STAdapterViT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapter_" in k or k.startswith("fc.")}


def load_eval_set(list_path: Path) -> tuple[torch.Tensor, np.ndarray]:
    """Decode every video of a '<video> <label>' list with the demo sampling: uint8 clips and labels."""
    entries = read_clip_list(list_path)
    clips = np.stack([decode_clips(str(p), SAMPLING)[0] for p, _ in entries])
    return torch.from_numpy(clips), np.array([lb for _, lb in entries])


@torch.no_grad()
def predict(model: STAdapterViT, clips: torch.Tensor, batch: int = 27) -> np.ndarray:
    """Top-1 class of each uint8 clip, in eval mode (the model's mode is restored)."""
    was = model.training
    model.eval()
    pred = torch.cat([model(normalize(clips[i:i + batch])).argmax(1) for i in range(0, len(clips), batch)])
    model.train(was)
    return pred.numpy()


def evaluate(model: STAdapterViT, clips: torch.Tensor, labels: np.ndarray) -> float:
    return float((predict(model, clips) == labels).mean())


def train_adapters(out: Path, backbone: Path, name: str, steps: int, batch: int, lr: float, kernel: int,
                   probe: bool, seed: int, val: tuple, eval_every: int, log, bf16: bool) -> Path:
    """Stage 2: adapters + head on the frozen backbone (probe: the head alone, adapters stay the identity)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = load_backbone(BACKBONE, str(backbone))
    deltas = initial_deltas(bb.config, (kernel, 1, 1), bb.config.width // 2, seed)
    model = build_reference(bb, deltas)  # stexport's own reference: what `stexport build` will load
    trained = [p for n, p in model.named_parameters() if n.startswith("fc.") or (".adapter_" in n and not probe)]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=1e-2)
    warmup = min(100, steps // 10 + 1)
    data = Clips(seed, "stage2")
    path = out / name
    t0 = time.time()

    def save(step: int) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        save_official(tmp, delta_state(model), next_epoch=step,
                      lr_sched={"schedule": "warmup+cosine", "lr": lr, "warmup": warmup, "steps": steps})
        os.replace(tmp, path)

    try:
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * cosine(step, steps, warmup)
            clips, labels, _ = data.batch(step, batch)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(normalize(torch.from_numpy(clips)))
            loss = F.cross_entropy(logits.float(), torch.from_numpy(labels))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            if step % 25 == 0:
                acc = (logits.argmax(1).numpy() == labels).mean()
                log_line(log, stage=2, step=step, loss=round(loss.item(), 4), train_acc=round(float(acc), 3),
                         lr=round(opt.param_groups[0]["lr"], 6), seconds=round(time.time() - t0, 1))
            if (step + 1) % eval_every == 0 and step + 1 < steps:
                log_line(log, stage=2, step=step + 1, val_acc=round(evaluate(model, *val), 4),
                         seconds=round(time.time() - t0, 1))
                save(step + 1)
    finally:
        data.close()
    save(steps)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE, help="where backbone.safetensors and the adapter go")
    p.add_argument("--name", default="motion_adapter.pt", help="adapter checkpoint file name")
    p.add_argument("--backbone", type=Path, default=None,
                   help="stage-1 weights to use (default: <out>/backbone.safetensors)")
    p.add_argument("--skip-stage1", action="store_true", help="reuse the backbone instead of training it")
    p.add_argument("--stage1-steps", type=int, default=1000)
    p.add_argument("--stage1-clips", type=int, default=12, help="clips per step (× 8 frames)")
    p.add_argument("--stage1-lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=36)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kernel", type=int, default=3, help="temporal kernel size (1: no temporal modelling)")
    p.add_argument("--probe", action="store_true", help="train the head only (adapters stay the identity)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast in stage 2 (faster on AVX512-BF16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None,
                   help="directory for the generated val set (default: a temporary one)")
    p.add_argument("--val-count", type=int, default=gen.COUNTS["val"])
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a busy machine)")
    p.add_argument("--log", type=Path, default=None, help="also append JSON lines here")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    backbone = a.backbone or a.out / "backbone.safetensors"
    if not a.skip_stage1:
        backbone = train_backbone(a.out, a.stage1_steps, a.stage1_clips, a.stage1_lr, a.seed, a.log)
    elif not backbone.is_file():
        p.error(f"{backbone}: no stage-1 backbone; run without --skip-stage1 or pass --backbone")

    data = a.data or Path(tempfile.mkdtemp(prefix="motion-val-"))
    try:
        val_list = gen.generate(data, ["val"], a.val_count)["val"]
        val = load_eval_set(val_list)
        path = train_adapters(a.out, backbone, a.name, a.steps, a.batch, a.lr, a.kernel, a.probe, a.seed,
                              val, a.eval_every, a.log, a.bf16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from stexport.build.deltas import load_deltas

            model = build_reference(load_backbone(BACKBONE, str(backbone)), load_deltas(path))
        log_line(a.log, stage=2, done=str(path), val_acc=round(evaluate(model, *val), 4), val_clips=len(val[1]))
    finally:
        if a.data is None:
            shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
