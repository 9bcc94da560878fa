"""Resolve and load a Mask2Former checkpoint into the reference model (needs torch).

Accepted: a local Hugging Face folder (``config.json`` plus ``model.safetensors``, sharded
safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin`` read with
``weights_only=True``), or a hub id when ``huggingface_hub`` is installed and the hub is
reachable. Loading is strict: every parameter is filled and every checkpoint key is used, except
the few keys listed in :data:`UNUSED_KEYS`, which are skipped by name on purpose.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from m2f_deploy.config import Mask2FormerConfig
from m2f_deploy.errors import CheckpointError, ConfigError
from m2f_deploy.modeling import Mask2Former

log = logging.getLogger(__name__)

# Keys that checkpoints carry but inference does not use: pattern -> why it is skipped.
UNUSED_KEYS: dict[str, str] = {
    r"criterion\.empty_weight": "loss weight, training only",
    r"model\.pixel_level_module\.encoder\.swin\.layernorm\.(weight|bias)": "final Swin LayerNorm, unused by the backbone",
    r".*\.attention\.self\.relative_position_index": "derived from window_size",
    r".*\.normalization\.num_batches_tracked": "batch-norm step counter, training only",
}
_UNUSED = re.compile("|".join(f"(?:{p})" for p in UNUSED_KEYS))

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Checkpoint:
    """A resolved local checkpoint: its folder, config and weight files (shards in order)."""

    folder: Path
    config: Mask2FormerConfig
    weight_files: list[Path] = field(default_factory=list)


def resolve(path_or_id: str | os.PathLike) -> Checkpoint:
    """Find the config and weight files of a local folder or a hub id (downloaded)."""
    path = Path(path_or_id)
    if path.is_file():
        if path.suffix in (".pkl", ".pth", ".pt"):
            raise CheckpointError(
                f"{path}: original (detectron2) Mask2Former checkpoints are not supported yet; "
                "give a Hugging Face checkpoint folder"
            )
        raise CheckpointError(f"{path}: is a file; give the checkpoint folder (with config.json and weights)")
    if not path.exists():
        if _HUB_ID.match(str(path_or_id)) and not str(path_or_id).startswith("."):
            path = _download(str(path_or_id))
        else:
            raise CheckpointError(f"{path}: no such checkpoint folder")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json in this folder (not a Hugging Face checkpoint)")
    try:
        config = Mask2FormerConfig.from_pretrained(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return Checkpoint(path, config, _weight_files(path))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: not a local folder, and loading it from the Hugging Face Hub needs "
            "huggingface_hub (pip install 'm2f-deploy[hub]')"
        ) from None
    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin"],
            )
        )
    except Exception as e:  # network errors, unknown repo, gated repo, offline mode ...
        raise CheckpointError(
            f"{repo_id}: not a local folder, and it could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
        ) from None


def _weight_files(folder: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        f = folder / name
        if not f.is_file():
            continue
        if not name.endswith(".index.json"):
            return [f]
        try:
            weight_map = json.loads(f.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{f}: not a valid shard index ({type(e).__name__}: {e})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{f}: lists shard(s) that are not in the folder: {', '.join(missing)}")
        return [folder / s for s in shards]
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Read tensors from safetensors or (``weights_only``) PyTorch files, never executing pickles."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                part = load_file(str(f))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        else:
            try:
                part = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # unpickling errors come in many types
                raise CheckpointError(f"{f}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise CheckpointError(f"{f}: expected a flat dict of tensors")
        state.update(part)
    return state


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_state_dict_strict(model: Mask2Former, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy ``state`` into ``model``; raise one error listing missing / unexpected / mis-shaped keys.

    Returns the checkpoint keys skipped on purpose (see :data:`UNUSED_KEYS`).
    """
    expected = model.state_dict()
    skipped = sorted(k for k in state if k not in expected and _UNUSED.fullmatch(k))
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and k not in skipped)
    wrong = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong:
        problems.append(f"wrongly shaped keys: {_listing(wrong)}")
    if problems:
        raise CheckpointError(f"{source}: does not match the config's architecture; " + "; ".join(problems))
    non_float = [k for k in expected if not state[k].is_floating_point()]
    if non_float:
        raise CheckpointError(f"{source}: non-float tensors where weights belong: {_listing(non_float)}")
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    if skipped:
        log.info("%s: skipped unused checkpoint keys: %s", source, ", ".join(skipped))
    return skipped


def save_checkpoint(model: Mask2Former, folder: str | os.PathLike) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder (``config.json`` + ``model.safetensors``).

    Our parameter names are the on-disk Hugging Face names, so transformers loads the folder too.
    Each file is written atomically.
    """
    from safetensors.torch import save_file

    from m2f_deploy.utils import atomic_output

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    return folder


def load_model(
    path_or_id: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Mask2Former:
    """Load a checkpoint into the reference model, in eval mode, on ``device`` in ``dtype``.

    The model carries ``.checkpoint`` (the resolved :class:`Checkpoint`) and
    ``.skipped_checkpoint_keys`` for exporters and reports.
    """
    ckpt = resolve(path_or_id)
    state = read_state_dict(ckpt.weight_files)
    model = Mask2Former(ckpt.config)
    source = str(ckpt.weight_files[0] if len(ckpt.weight_files) == 1 else ckpt.folder)
    model.skipped_checkpoint_keys = load_state_dict_strict(model, state, source)
    model.checkpoint = ckpt
    return model.to(device=device, dtype=dtype).eval()
