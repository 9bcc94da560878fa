"""Mask2Former, Swin and ResNet configuration: read and write Hugging Face ``config.json`` (no torch).

Only the fields that change inference are typed attributes. Everything else in a config.json
(training weights, ``architectures``, ``transformers_version``, ...) is kept verbatim in
``extra`` so that a read/write round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2f_deploy.errors import ConfigError
from m2f_deploy.utils import atomic_write_text, parse_json_object

SUPPORTED_BACKBONES = ("swin", "resnet")
SUPPORTED_ACTIVATIONS = ("relu", "gelu")
SWIN_STAGES = ("stage1", "stage2", "stage3", "stage4")
_SWIN_DERIVED = ("num_layers", "hidden_size", "stage_names", "out_indices")
_RESNET_DERIVED = ("stage_names", "out_indices")


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _whole_numbers(name: str, values: Any) -> list[int]:
    """``backbone_config.<name>`` as a list of ints: 3.0 is taken, 3.5 and True are refused (``int()`` would floor
    3.5 to a different model without a word)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"backbone_config.{name}: a list of whole numbers, got {values!r}")
    values = list(values)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or not float(v).is_integer():
            raise ConfigError(f"backbone_config.{name}: whole numbers only, got {v!r} in {values}")
    return [int(v) for v in values]


@dataclass
class SwinConfig:
    """The Swin backbone, as transformers' ``SwinConfig`` describes it.

    ``drop_path_rate`` and the dropout probabilities are read and written back but have no
    effect at inference.
    """

    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    patch_size: int = 4
    num_channels: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    use_absolute_embeddings: bool = False
    image_size: int = 224
    drop_path_rate: float = 0.1
    out_features: list[str] = field(default_factory=lambda: list(SWIN_STAGES))
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "swin"

    def __post_init__(self) -> None:
        self.depths = _whole_numbers("depths", self.depths)
        self.num_heads = _whole_numbers("num_heads", self.num_heads)
        self.out_features = list(self.out_features)
        self.validate()

    def validate(self) -> None:
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ConfigError(
                f"backbone_config: Mask2Former needs a 4-stage Swin, got depths={self.depths} "
                f"num_heads={self.num_heads}"
            )
        if self.out_features != list(SWIN_STAGES):
            raise ConfigError(
                f"backbone_config.out_features must be {list(SWIN_STAGES)} for Mask2Former, "
                f"got {self.out_features}"
            )
        for dim, heads in zip(self.stage_channels, self.num_heads):
            if dim % heads:
                raise ConfigError(f"backbone_config: stage width {dim} is not divisible by {heads} heads")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"backbone_config.hidden_act {self.hidden_act!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        if self.use_absolute_embeddings:
            raise ConfigError("backbone_config.use_absolute_embeddings=true is not supported")
        if isinstance(self.patch_size, (list, tuple)):
            if len(set(self.patch_size)) != 1:
                raise ConfigError(f"backbone_config.patch_size must be square, got {self.patch_size}")
            self.patch_size = int(self.patch_size[0])
        if self.window_size < 1 or self.patch_size < 1:
            raise ConfigError("backbone_config: window_size and patch_size must be positive")

    @property
    def stage_channels(self) -> list[int]:
        """Channels of the four feature maps (stride 4, 8, 16, 32)."""
        return [self.embed_dim * 2**i for i in range(len(self.depths))]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SwinConfig:
        d = dict(d)
        model_type = d.pop("model_type", "swin")
        if model_type != "swin":
            raise ConfigError(f"backbone {model_type!r} is not a Swin config")
        for derived in _SWIN_DERIVED:  # recomputed by to_dict
            d.pop(derived, None)
        known = _fields(cls) - {"extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        return cls(**kwargs, extra=d)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update({k: getattr(self, k) for k in _fields(self) if k != "extra"})
        d["model_type"] = self.model_type
        d["num_layers"] = len(self.depths)
        d["hidden_size"] = self.stage_channels[-1]
        d["stage_names"] = ["stem", *SWIN_STAGES]
        d["out_indices"] = [1, 2, 3, 4]
        return d


@dataclass
class ResNetConfig:
    """The ResNet backbone, as transformers' ``ResNetConfig`` describes it (read through ``AutoBackbone``).

    Mask2Former's ResNets (detectron2's ``build_resnet_backbone`` with ``STRIDE_IN_1X1: False``) are bottleneck
    ResNets whose stride sits in the 3x3 convolution: transformers' ``downsample_in_bottleneck=False``.
    """

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    layer_type: str = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    out_features: list[str] = field(default_factory=lambda: list(SWIN_STAGES))
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "resnet"

    def __post_init__(self) -> None:
        self.depths = _whole_numbers("depths", self.depths)
        self.hidden_sizes = _whole_numbers("hidden_sizes", self.hidden_sizes)
        self.out_features = list(self.out_features)
        self.validate()

    def validate(self) -> None:
        if len(self.depths) != 4 or len(self.hidden_sizes) != 4 or min(self.depths) < 1:
            raise ConfigError(
                f"backbone_config: Mask2Former needs a 4-stage ResNet, got depths={self.depths} "
                f"hidden_sizes={self.hidden_sizes}"
            )
        if self.out_features != list(SWIN_STAGES):
            raise ConfigError(
                f"backbone_config.out_features must be {list(SWIN_STAGES)} for Mask2Former, got {self.out_features}"
            )
        if self.layer_type != "bottleneck":
            raise ConfigError(f"backbone_config.layer_type {self.layer_type!r} is not supported (supported: bottleneck)")
        if any(h % 4 for h in self.hidden_sizes):
            raise ConfigError(f"backbone_config.hidden_sizes must be multiples of 4 (bottleneck), got {self.hidden_sizes}")
        for name in ("downsample_in_first_stage", "downsample_in_bottleneck"):  # a string "no" would be true
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"backbone_config.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("num_channels", "embedding_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"backbone_config.{name} must be an integer of at least 1, got {value!r}")
        if self.downsample_in_first_stage:
            raise ConfigError("backbone_config.downsample_in_first_stage=true gives strides 8-64; Mask2Former needs 4-32")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"backbone_config.hidden_act {self.hidden_act!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )

    @property
    def stage_channels(self) -> list[int]:
        """Channels of the four feature maps (stride 4, 8, 16, 32)."""
        return list(self.hidden_sizes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResNetConfig:
        d = dict(d)
        if d.pop("model_type", "resnet") != "resnet":
            raise ConfigError("not a ResNet config")
        for derived in _RESNET_DERIVED:
            d.pop(derived, None)
        known = _fields(cls) - {"extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        return cls(**kwargs, extra=d)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update({k: getattr(self, k) for k in _fields(self) if k != "extra"})
        d["model_type"] = self.model_type
        d["stage_names"] = ["stem", *SWIN_STAGES]
        d["out_indices"] = [1, 2, 3, 4]
        return d


BackboneConfig = SwinConfig | ResNetConfig
_BACKBONES: dict[str, type] = {"swin": SwinConfig, "resnet": ResNetConfig}


def backbone_config_from_dict(d: dict[str, Any]) -> BackboneConfig:
    """A ``backbone_config`` of a config.json by its ``model_type`` (Swin when absent)."""
    model_type = d.get("model_type", "swin")
    if model_type not in _BACKBONES:
        raise ConfigError(f"backbone {model_type!r} is not supported (supported: {', '.join(SUPPORTED_BACKBONES)})")
    return _BACKBONES[model_type].from_dict(d)


@dataclass
class Mask2FormerConfig:
    """transformers' ``Mask2FormerConfig``: the fields that change inference, plus ``id2label``."""

    backbone_config: BackboneConfig = field(default_factory=SwinConfig)
    feature_size: int = 256
    mask_feature_size: int = 256
    hidden_dim: int = 256
    encoder_feedforward_dim: int = 1024
    activation_function: str = "relu"
    encoder_layers: int = 6
    decoder_layers: int = 10
    num_attention_heads: int = 8
    dim_feedforward: int = 2048
    pre_norm: bool = False
    enforce_input_projection: bool = False
    common_stride: int = 4
    ignore_value: int = 255
    num_queries: int = 100
    feature_strides: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    output_auxiliary_logits: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "mask2former"

    def __post_init__(self) -> None:
        if isinstance(self.backbone_config, dict):
            self.backbone_config = backbone_config_from_dict(self.backbone_config)
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        self.feature_strides = [int(s) for s in self.feature_strides]
        self.validate()

    def validate(self) -> None:
        if sorted(self.id2label) != list(range(len(self.id2label))) or not self.id2label:
            raise ConfigError(f"id2label must map 0..N-1 to names, got keys {sorted(self.id2label)[:10]}")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"activation_function {self.activation_function!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        if len(self.feature_strides) != 4:
            raise ConfigError(f"feature_strides must have 4 entries, got {self.feature_strides}")
        for name in ("feature_size", "hidden_dim"):
            if getattr(self, name) % self.num_attention_heads:
                raise ConfigError(
                    f"{name}={getattr(self, name)} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}"
                )
        if self.feature_size % 32:
            raise ConfigError(f"feature_size={self.feature_size} must be a multiple of 32 (GroupNorm(32))")
        if self.num_fpn_levels < 0:
            raise ConfigError(
                f"common_stride={self.common_stride} is coarser than the finest transformer level "
                f"(feature_strides={self.feature_strides})"
            )
        if self.decoder_layers < 1 or self.num_queries < 1:
            raise ConfigError("decoder_layers and num_queries must be at least 1")

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def num_fpn_levels(self) -> int:
        """FPN levels the pixel decoder adds below the three transformer levels (1 for 4/8/16/32)."""
        return int(math.log2(min(self.feature_strides[-3:])) - math.log2(self.common_stride))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mask2FormerConfig:
        d = dict(d)
        model_type = d.pop("model_type", "mask2former")
        if model_type != "mask2former":
            raise ConfigError(f"model_type {model_type!r} is not a Mask2Former config")
        backbone = d.pop("backbone_config", None)
        if backbone is None:
            if d.get("backbone") not in (None, "swin") or d.get("use_timm_backbone"):
                raise ConfigError(
                    f"backbone {d.get('backbone')!r} without a backbone_config is not supported (supported: swin, "
                    "or a backbone_config of model_type swin or resnet)"
                )
            # transformers' default backbone for Mask2Former: Swin with depths 2-2-18-2.
            backbone = {"depths": [2, 2, 18, 2], "drop_path_rate": 0.3}
        if "id2label" not in d and "num_labels" in d:
            d["id2label"] = {i: f"LABEL_{i}" for i in range(int(d["num_labels"]))}
        d.pop("num_labels", None)
        d.pop("label2id", None)
        known = _fields(cls) - {"extra", "backbone_config"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        return cls(backbone_config=backbone_config_from_dict(backbone), **kwargs, extra=d)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        for k in _fields(self) - {"extra", "backbone_config", "id2label"}:
            d[k] = getattr(self, k)
        d["backbone_config"] = self.backbone_config.to_dict()
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        d["label2id"] = {v: k for k, v in self.id2label.items()}
        d["model_type"] = self.model_type
        return dict(sorted(d.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Mask2FormerConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        d = parse_json_object(text, str(path), ConfigError)
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (TypeError, ValueError) as e:  # a field of the wrong type, e.g. a string for a list
            raise ConfigError(f"{path}: bad field value ({e})") from None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> Mask2FormerConfig:
        return cls.from_json_file(Path(folder) / "config.json")

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/config.json`` atomically; returns its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(folder / "config.json", self.to_json_string())
