"""Resolve and load a Mask2Former checkpoint into the reference model (needs torch).

Accepted: a local Hugging Face folder (``config.json`` plus ``model.safetensors``, sharded
safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin`` read with
``weights_only=True``), a hub id when ``huggingface_hub`` is installed and the hub is
reachable, or an original Mask2Former (detectron2) file, ``.pkl`` or ``.pth``, with a model-zoo
config (:mod:`m2f_deploy.zoo`). A ``.pkl`` is read by :class:`ZooUnpickler`, which builds only
containers and numpy arrays and refuses every other pickled object before it runs; a ``.pth`` by
``torch.load(weights_only=True)``. Loading is strict: every parameter is filled and every checkpoint key is used, except
the few keys listed in :data:`UNUSED_KEYS`, which are skipped by name on purpose.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    # detectron2 files only: the model-zoo config's name and its preprocessing (processor keys)
    zoo_config: str | None = None
    preprocessing: dict[str, Any] | None = None


DETECTRON2_SUFFIXES = (".pkl", ".pth", ".pt")


def resolve(path_or_id: str | os.PathLike, zoo_config: Any = None) -> Checkpoint:
    """Find the config and weight files of a local folder or a hub id (downloaded), or pair a detectron2
    ``.pkl`` / ``.pth`` file with ``zoo_config`` (a :mod:`m2f_deploy.zoo` name or a :class:`~m2f_deploy.zoo.ZooConfig`)."""
    path = Path(path_or_id)
    if path.suffix in DETECTRON2_SUFFIXES and not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO, socket or device
        raise CheckpointError(f"{path}: not a regular file or a folder; give a checkpoint folder or a .pkl / .pth file")
    if path.is_file() and path.suffix in DETECTRON2_SUFFIXES:
        if zoo_config is None:
            raise CheckpointError(
                f"{path}: an original (detectron2) Mask2Former file carries no architecture; give its model-zoo "
                "config (m2f-export --zoo-config NAME, or load_model(path, zoo_config=NAME))"
            )
        from m2f_deploy.zoo import ZooConfig, zoo_config as lookup

        zoo = zoo_config if isinstance(zoo_config, ZooConfig) else lookup(str(zoo_config))
        return Checkpoint(path.parent, zoo.config, [path], zoo.name, zoo.preprocessing)
    if zoo_config is not None:
        raise CheckpointError(
            f"{path}: a model-zoo config is for an original (detectron2) .pkl / .pth file, not for this "
            "checkpoint (a Hugging Face folder carries its own config.json)"
        )
    if path.is_file():
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
                with warnings.catch_warnings():  # torch's notice of a pickle protocol > 2: the error below says it all
                    warnings.simplefilter("ignore", UserWarning)
                    part = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # unpickling errors come in many types
                if "Weights only load failed" in str(e):  # torch's 7-line text: one line, nothing was executed
                    raise CheckpointError(f"{f}: not a readable PyTorch weights file: refused, it pickles Python "
                                          "objects besides tensors, which m2f-deploy never executes") from None
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise CheckpointError(
                    f"{f}: not a readable PyTorch weights file ({type(e).__name__}: {first})"
                ) from None
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise CheckpointError(f"{f}: expected a flat dict of tensors")
        state.update(part)
    return state


# What a model-zoo .pkl may reference: (module, name) -> where to find it. Anything else is refused before it is
# imported or called. numpy 1.x pickles name numpy.core.*, numpy 2.x numpy._core.*; each resolves to whichever this
# numpy has. Protocol-2 pickles (detectron2's Python-2 era files) write bytes as _codecs.encode(str, "latin1").
_NUMPY_PRIVATE = {"multiarray": ("_reconstruct", "scalar"), "numeric": ("_frombuffer",)}
_ALLOWED_GLOBALS: dict[tuple[str, str], tuple[str, ...]] = {
    **{
        (f"{core}.{module}", name): (f"numpy._core.{module}", f"numpy.core.{module}")
        for core in ("numpy.core", "numpy._core")
        for module, names in _NUMPY_PRIVATE.items()
        for name in names
    },
    ("numpy", "ndarray"): ("numpy",),
    ("numpy", "dtype"): ("numpy",),
    ("collections", "OrderedDict"): ("collections",),
}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` restricted to what protocol-2 pickles use it for: a str of bytes back to bytes."""
    if encoding.replace("-", "").lower() != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only latin1 is allowed)")
    return text.encode("latin1")


def _plain_dtype(dtype: Any) -> Any:
    """Refuse a dtype that is not a plain number type. ``numpy.dtype.__setstate__`` takes whatever a pickle says,
    so a pickle can forge a structured dtype whose object field numpy does not know about: its raw bytes would
    then be read as pointers (a crash, or worse). Weights are never structured, subarray or object typed."""
    import numpy as np

    dtype = np.dtype(dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, np.dtype) or dtype.names is not None or dtype.fields is not None \
            or dtype.subdtype is not None or dtype.hasobject or dtype.kind not in "biufc":
        raise pickle.UnpicklingError(f"refused pickled array of dtype {dtype!r} (only plain numeric arrays)")
    return dtype


@functools.cache
def _checked_array_type():
    import numpy as np

    class _ZooArray(np.ndarray):
        """What ``_reconstruct`` builds: an array whose pickled state must name a plain numeric dtype."""

        def __new__(cls, *args, **kwargs):  # ndarray(shape, dtype, buffer) straight from a pickle: not how numpy pickles
            raise pickle.UnpicklingError("refused pickled call of numpy.ndarray (arrays come through _reconstruct)")

        def __setstate__(self, state):
            if not isinstance(state, tuple) or len(state) not in (4, 5):
                raise pickle.UnpicklingError("refused pickled array state")
            _plain_dtype(state[-3])
            super().__setstate__(state)

        def __reduce__(self):  # pickled again (e.g. by torch.save) as a plain ndarray
            return np.asarray(self).__reduce__()

    return _ZooArray


def _checked(fn: Any, dtype_at: int) -> Any:
    def call(*args):
        if len(args) <= dtype_at:
            raise pickle.UnpicklingError(f"refused pickled call of {fn.__name__}")
        _plain_dtype(args[dtype_at])
        return fn(*args)

    return call


class ZooUnpickler(pickle.Unpickler):
    """Unpickles a detectron2 model-zoo ``.pkl``: dicts, lists, tuples, strings, numbers and numpy arrays.

    ``find_class`` is the only way a pickle reaches code; it returns the few numpy reconstruction functions
    above and refuses every other name, so a pickle that would call ``os.system`` (or anything) fails before
    the call. Persistent ids (torch storages) are refused by :class:`pickle.Unpickler` itself.
    """

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        homes = _ALLOWED_GLOBALS.get((module, name))
        if homes is None:
            raise pickle.UnpicklingError(f"refused pickled global {module}.{name}")
        for home in homes:
            try:
                found = getattr(importlib.import_module(home), name)
            except (ImportError, AttributeError):
                continue
            # numpy's reconstruction functions check lengths but trust the dtype: each dtype is checked here
            if name == "ndarray":
                return _checked_array_type()
            if name == "scalar":
                return _checked(found, 0)
            if name == "_frombuffer":
                return _checked(found, 1)
            return found
        raise pickle.UnpicklingError(f"{module}.{name} is not in this numpy")


def read_detectron2(path: Path) -> dict[str, Any]:
    """The ``model`` state dict of a detectron2 checkpoint: name -> numpy array (``.pkl``) or tensor (``.pth``).

    A ``.pkl`` goes through :class:`ZooUnpickler` (never a general ``pickle.load``); a ``.pth`` (or a ``.pkl`` that is
    really a PyTorch zip file) through ``torch.load(weights_only=True)``. Both accept the ``{"model": ...}`` envelope
    (plus ``__author__``, ``matching_heuristics``, or a training run's ``optimizer`` / ``iteration``) or a bare dict.
    """
    path = Path(path)
    try:
        if path.suffix == ".pkl" and not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                obj = ZooUnpickler(f, encoding="latin1").load()
        else:
            with warnings.catch_warnings():  # torch's notice of a pickle protocol > 2: the error below says it all
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except pickle.UnpicklingError as e:
        # torch.load(weights_only=True) explains at length: keep the global it refused
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        why = f"refused pickled global {found.group(1)}" if found else str(e).splitlines()[0]
        raise CheckpointError(
            f"{path}: refused, not executed: {why} (a model-zoo checkpoint holds only dicts and arrays)"
        ) from None
    except Exception as e:  # a truncated or foreign file: pickle and torch raise many types
        raise CheckpointError(f"{path}: not a readable detectron2 checkpoint ({type(e).__name__}: {e})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path}: expected a dict of named weights (under 'model'), got {type(obj).__name__}")
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
    path_or_id: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    zoo_config: Any = None,
) -> Mask2Former:
    """Load a checkpoint into the reference model, in eval mode, on ``device`` in ``dtype``.

    ``zoo_config`` (a :mod:`m2f_deploy.zoo` name or :class:`~m2f_deploy.zoo.ZooConfig`) is required for, and only
    for, an original detectron2 ``.pkl`` / ``.pth`` file, whose weights are renamed to our (Hugging Face) layout.
    The model carries ``.checkpoint`` (the resolved :class:`Checkpoint`) and
    ``.skipped_checkpoint_keys`` for exporters and reports.
    """
    ckpt = resolve(path_or_id, zoo_config)
    model = Mask2Former(ckpt.config)
    source = str(ckpt.weight_files[0] if len(ckpt.weight_files) == 1 else ckpt.folder)
    if ckpt.zoo_config is not None:
        from m2f_deploy.detectron2 import convert_state_dict

        state, skipped = convert_state_dict(read_detectron2(ckpt.weight_files[0]), ckpt.config, source)
        model.skipped_checkpoint_keys = skipped + load_state_dict_strict(model, state, source)
    else:
        state = read_state_dict(ckpt.weight_files)
        model.skipped_checkpoint_keys = load_state_dict_strict(model, state, source)
    model.checkpoint = ckpt
    return model.to(device=device, dtype=dtype).eval()
