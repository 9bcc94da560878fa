"""Train the demo checkpoint: a small Swin Mask2Former (3.45M parameters) on synthetic shapes, on CPU.

The shipped checkpoint is made by (about 35 minutes on 2 otherwise idle CPU cores at 1.1-1.3 s per step of 8
images; much slower when other processes compete for the cores):

    .venv/bin/python tools/train_demo.py --out shapes-demo --steps 1800

(``--minutes 35`` instead of ``--steps`` trains for a time budget, but then the number of steps, and so the
weights, depend on the machine's speed.) The script needs torch, transformers and scipy (the ``export`` and
``test`` extras); it is a tool, not part of the package.

Data come from ``m2f_deploy.data.shapes``, drawn on the fly: training image ``k`` is
``generate_sample((seed, k))``, validation images are ``generate_sample((val_seed, i))`` for ``i < val_images``,
i.e. the images of ``write_dataset(folder, val_images, seed=val_seed)``. Labels (``mask_labels``,
``class_labels``) are made by our ``ImageProcessor.preprocess``; the loss is transformers' Mask2Former loss.
The backbone starts from random weights, so the learning rate is higher than the usual 1e-4 of fine-tuning:
AdamW at 5e-4, linear warm-up, cosine decay to 1 % of it.

Every ``--eval-every`` steps and at the end, the validation loss, panoptic quality (overall, things, stuff) and
mean IoU are printed, computed with our post-processes and ``m2f_deploy.evaluation``. The output folder is a
Hugging Face checkpoint (``config.json`` with ``id2label``, ``model.safetensors``, ``preprocessor_config.json``
with the training size) plus ``training.json`` (arguments, steps, time, final metrics), written atomically;
before it is renamed into place it is loaded back with ``m2f_deploy.load_model`` and checked against the
trained model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

import m2f_deploy
from m2f_deploy.artifact import HW_MULTIPLE, INPUT_NAME
from m2f_deploy.config import Mask2FormerConfig
from m2f_deploy.data.shapes import CLASSES, Sample, generate_sample
from m2f_deploy.evaluation import PanopticEvaluator, SemanticEvaluator
from m2f_deploy.processing import ImageProcessor

ARCHITECTURE: dict[str, Any] = {
    "backbone_config": {
        "embed_dim": 32,
        "depths": [2, 2, 2, 1],
        "num_heads": [1, 2, 4, 8],
        "window_size": 5,
        "drop_path_rate": 0.0,
    },
    "feature_size": 128,
    "mask_feature_size": 128,
    "hidden_dim": 128,
    "encoder_feedforward_dim": 256,
    "encoder_layers": 3,
    "decoder_layers": 6,
    "num_attention_heads": 4,
    "dim_feedforward": 512,
    "num_queries": 20,
    "train_num_points": 3136,  # 56 x 56 points per mask for the loss (HF: 12544); the masks are 40 x 40 at 160 px
}
"""Swin with 32 channels at stride 4, window 5 (divides the 40/20/10/5 feature maps of a 160-px input)."""

STUFF_IDS = [c["id"] for c in CLASSES if not c["isthing"]]
MAX_CHECKPOINT_BYTES = 15 * 2**20
RELOAD_TOLERANCE = 1e-3  # max abs logit difference between the trained model and the saved checkpoint reloaded


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (must not exist, or be empty)")
    limit = ap.add_mutually_exclusive_group(required=True)
    limit.add_argument("--steps", type=int, help="optimizer steps (reproducible)")
    limit.add_argument(
        "--minutes",
        type=float,
        help="training time budget, validations not counted (the steps, and so the weights, depend on the machine)",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=2, default=[160, 160], metavar=("H", "W"), help=f"multiples of {HW_MULTIPLE}")
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    ap.add_argument("--min-lr-ratio", type=float, default=0.01, help="the cosine ends at this share of --lr")
    ap.add_argument("--weight-decay", type=float, default=0.05, help="on weight matrices only")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    ap.add_argument("--seed", type=int, default=0, help="model initialisation and training data")
    ap.add_argument("--val-seed", type=int, default=1, help="validation data (held out: must differ from --seed)")
    ap.add_argument("--val-images", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=500, help="steps between validations (0: at the end only)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.val_seed == args.seed:
        ap.error("--val-seed must differ from --seed: validation images would be training images")
    if any(side % HW_MULTIPLE for side in args.size):
        ap.error(f"--size must be multiples of {HW_MULTIPLE}, got {args.size}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        ap.error(f"{args.out} already exists and is not an empty folder")
    return args


def build_model(seed: int) -> transformers.Mask2FormerForUniversalSegmentation:
    """transformers' Mask2Former with ``ARCHITECTURE``, random weights from ``seed``, ``id2label`` from CLASSES."""
    spec = {key: value for key, value in ARCHITECTURE.items() if key != "train_num_points"}
    ours = Mask2FormerConfig.from_dict({**spec, "id2label": {c["id"]: c["name"] for c in CLASSES}})  # validates
    config = transformers.Mask2FormerConfig(**ours.to_dict(), train_num_points=ARCHITECTURE["train_num_points"])
    torch.manual_seed(seed)
    return transformers.Mask2FormerForUniversalSegmentation(config)


def encode(processor: ImageProcessor, samples: Sequence[Sample]) -> dict[str, Any]:
    """Model inputs for ``samples``: ``pixel_values`` ``[B, 3, H, W]``, per image ``mask_labels`` ``[N, H, W]`` and
    ``class_labels`` ``[N]``, as tensors."""
    encoded = processor.preprocess(
        [s.image for s in samples],
        segmentation_maps=[s.panoptic for s in samples],
        instance_id_to_semantic_id=[s.category_of for s in samples],
    )
    return {
        "pixel_values": torch.from_numpy(encoded[INPUT_NAME]),  # the key: transformers' forward argument
        "mask_labels": [torch.from_numpy(m) for m in encoded["mask_labels"]],
        "class_labels": [torch.from_numpy(c) for c in encoded["class_labels"]],
    }


def learning_rate(args: argparse.Namespace, step: int, progress: float) -> float:
    """Linear warm-up over ``args.warmup`` steps, times a cosine from 1 to ``min_lr_ratio`` over ``progress`` 0..1."""
    warm = min(1.0, (step + 1) / args.warmup)
    cosine = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warm * cosine


def optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and convolutions, none on norms, biases and 1-D parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr)


@torch.no_grad()
def evaluate(
    model: transformers.Mask2FormerForUniversalSegmentation,
    processor: ImageProcessor,
    samples: Sequence[Sample],
    batch: int,
) -> dict[str, Any]:
    """Validation loss, PQ (all / things / stuff) and mIoU over ``samples``, with our post-processes."""
    model.eval()
    panoptic, semantic = PanopticEvaluator(CLASSES), SemanticEvaluator(len(CLASSES))
    losses = []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        outputs = model(**encode(processor, chunk))
        losses.append(outputs.loss.item())
        logits = {
            "class_queries_logits": outputs.class_queries_logits.numpy(),
            "masks_queries_logits": outputs.masks_queries_logits.numpy(),
        }
        sizes = [s.semantic.shape for s in chunk]
        panoptic_results = processor.post_process_panoptic_segmentation(
            logits, label_ids_to_fuse=STUFF_IDS, target_sizes=sizes
        )
        semantic_results = processor.post_process_semantic_segmentation(logits, target_sizes=sizes)
        for sample, result, labels in zip(chunk, panoptic_results, semantic_results):
            panoptic.update(result, {"segmentation": sample.panoptic, "segments_info": sample.segments})
            semantic.update(labels, sample.semantic)
    model.train()
    pq, iou = panoptic.compute(), semantic.compute()
    return {
        "loss": statistics.fmean(losses),
        "pq": pq.all.pq,
        "pq_things": pq.things.pq,
        "pq_stuff": pq.stuff.pq,
        "miou": iou.mean_iou,
        "iou": {c["name"]: value for c, value in zip(CLASSES, iou.per_class_iou)},
    }


def format_metrics(metrics: dict[str, Any]) -> str:
    per_class = " ".join(f"{name} {value:.0f}" for name, value in metrics["iou"].items())
    return (
        f"val loss {metrics['loss']:.2f}  PQ {metrics['pq']:.1f} (things {metrics['pq_things']:.1f}, stuff "
        f"{metrics['pq_stuff']:.1f})  mIoU {metrics['miou']:.1f}  IoU: {per_class}"
    )


def save_checkpoint(
    model: transformers.Mask2FormerForUniversalSegmentation,
    processor: ImageProcessor,
    folder: Path,
    record: dict[str, Any],
    probe: torch.Tensor,
) -> None:
    """Write the checkpoint to a temporary folder beside ``folder``, check it reloads with ``m2f_deploy.load_model``
    to the same logits on ``probe`` ``[B, 3, H, W]``, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        size = (staging / "model.safetensors").stat().st_size
        if size > MAX_CHECKPOINT_BYTES:
            raise SystemExit(f"model.safetensors is {size / 2**20:.1f} MiB, over the {MAX_CHECKPOINT_BYTES >> 20} MiB")
        model.eval()
        with torch.no_grad():
            expected, reloaded = model(pixel_values=probe), m2f_deploy.load_model(staging)(probe)
        error = max(
            (expected.class_queries_logits - reloaded.class_queries_logits).abs().max().item(),
            (expected.masks_queries_logits - reloaded.masks_queries_logits).abs().max().item(),
        )
        if error > RELOAD_TOLERANCE:
            raise SystemExit(f"the saved checkpoint reloads with a max logit difference of {error:.2e}")
        record = {**record, "checkpoint_bytes": size, "reload_max_abs_error": error}
        (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        for file in staging.iterdir():
            file.chmod(0o644)  # temporary files are created private
        staging.chmod(0o755)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"saved {folder} (model.safetensors {size / 2**20:.1f} MiB; reloaded with m2f_deploy: max abs {error:.1e})")


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    height, width = args.size
    processor = ImageProcessor(size={"height": height, "width": width}, ignore_index=255, num_labels=len(CLASSES))
    model = build_model(args.seed).train()
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {args.size} px, batch "
        f"{args.batch}, {args.threads} threads"
    )
    opt = optimizer(model, args)
    val_samples = [generate_sample((args.val_seed, i), (height, width)) for i in range(args.val_images)]
    budget = args.minutes * 60 if args.minutes else None

    step, train_seconds, last_seconds = 0, 0.0, 0.0
    logged: list[tuple[float, float, float]] = []  # (loss, step seconds, data seconds) since the last log line
    while (budget and train_seconds + last_seconds <= budget) or (not budget and step < args.steps):
        start = time.perf_counter()
        lr = learning_rate(args, step, train_seconds / budget if budget else step / args.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        first = step * args.batch
        samples = [generate_sample((args.seed, first + b), (height, width)) for b in range(args.batch)]
        inputs = encode(processor, samples)
        data_seconds = time.perf_counter() - start
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        last_seconds = time.perf_counter() - start
        train_seconds += last_seconds
        logged.append((loss.item(), last_seconds, data_seconds))
        if step % args.log_every == 0 or step == 1:
            losses, times, data = (statistics.fmean(column) for column in zip(*logged))
            print(
                f"step {step}{f'/{args.steps}' if args.steps else ''}  loss {losses:.2f}  lr {lr:.2e}  "
                f"{times:.2f} s/step (data {data:.2f})  elapsed {train_seconds / 60:.1f} min",
                flush=True,
            )
            logged = []
        if args.eval_every and step % args.eval_every == 0:
            print(f"step {step}: {format_metrics(evaluate(model, processor, val_samples, args.batch))}", flush=True)

    metrics = evaluate(model, processor, val_samples, args.batch)
    print(f"final (step {step}, {train_seconds / 60:.1f} min): {format_metrics(metrics)}", flush=True)
    record = {
        "command": [Path(sys.executable).name, *sys.argv],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "architecture": ARCHITECTURE,
        "steps": step,
        "train_minutes": round(train_seconds / 60, 2),
        "validation": metrics,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
    }
    probe = encode(processor, val_samples[:2])["pixel_values"]
    save_checkpoint(model, processor, args.out, record, probe)


def main(argv: Sequence[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
