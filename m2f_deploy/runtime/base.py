"""The base every runner shares: inputs are checked once, here, against the artifact's metadata.

As Polygraphy's ``BaseRunner`` does it: :meth:`BaseRunner.infer` checks ``pixel_values`` (name, dtype, rank,
channels, batch and size within what the artifact runs) and hands a contiguous float32 array to the backend's
``infer_impl``. A backend never sees an input the artifact cannot take, and every backend words the error the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from m2f_deploy.artifact import HW_MULTIPLE, INPUT_NAME
from m2f_deploy.errors import InputError

UNBOUNDED = 1 << 30


@dataclass(frozen=True)
class InputSpec:
    """What ``pixel_values`` may be: ``[B, 3, H, W]`` float, B/H/W within [low, high], H/W multiples of ``multiple``."""

    batch: tuple[int, int]
    height: tuple[int, int]
    width: tuple[int, int]
    multiple: int = HW_MULTIPLE
    dtype: str = "float32"  # "uint8": ``images`` [B, H, W, 3] uint8 (m2f-export --input uint8)

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> InputSpec:
        """The input an ONNX artifact takes: its static axes as exported, dynamic ones unbounded."""
        inp = meta["input"]
        multiple = inp.get("hw_multiple", HW_MULTIPLE)
        batch = (1, UNBOUNDED) if inp["dynamic_batch"] else (inp["batch"], inp["batch"])
        if inp.get("dtype") == "uint8":
            return cls(batch, (inp["height"],) * 2, (inp["width"],) * 2, multiple, "uint8")
        if inp["dynamic_hw"]:
            return cls(batch, (multiple, UNBOUNDED), (multiple, UNBOUNDED), multiple)
        return cls(batch, (inp["height"],) * 2, (inp["width"],) * 2, multiple)

    @classmethod
    def from_profile(cls, low: tuple[int, ...], high: tuple[int, ...], multiple: int = HW_MULTIPLE) -> InputSpec:
        """The input a TensorRT engine takes: its optimization profile's ``[B, 3, H, W]`` min and max."""
        return cls((low[0], high[0]), (low[2], high[2]), (low[3], high[3]), multiple)

    @property
    def static_hw(self) -> tuple[int, int] | None:
        if self.height[0] == self.height[1] and self.width[0] == self.width[1]:
            return self.height[0], self.width[0]
        return None

    def check(self, pixel_values: Any, where: str) -> np.ndarray:
        """``pixel_values`` as a contiguous float32 array, or one :class:`InputError` saying what is wrong."""
        x = np.asarray(pixel_values)
        if self.dtype == "uint8":
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
                raise InputError(f"images must be a uint8 [B, H, W, 3] array (this graph takes 8-bit images), "
                                 f"got {x.dtype} {x.shape}")  # fmt: skip
            b, h, w, _ = x.shape
        elif x.dtype.kind != "f" or x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"{INPUT_NAME} must be a float [B, 3, H, W] array, got {x.dtype} {x.shape}")
        else:
            b, _, h, w = x.shape
        static = self.static_hw
        if static is not None:
            if (h, w) != static:
                raise InputError(f"{INPUT_NAME} of size {h}x{w}: {where} takes {static[0]}x{static[1]} only")
        else:
            if h % self.multiple or w % self.multiple:
                raise InputError(f"{INPUT_NAME} of size {h}x{w}: height and width must be multiples of {self.multiple}")
            if not (self.height[0] <= h <= self.height[1] and self.width[0] <= w <= self.width[1]):
                raise InputError(
                    f"{INPUT_NAME} of size {h}x{w} is outside what {where} takes "
                    f"({_span(self.height)} x {_span(self.width)}); rebuild it with wider --shapes"
                )
        if not self.batch[0] <= b <= self.batch[1]:
            raise InputError(f"{INPUT_NAME} has batch {b}: {where} takes {_span(self.batch)}")
        return np.ascontiguousarray(x, dtype=np.uint8 if self.dtype == "uint8" else np.float32)


def _span(bounds: tuple[int, int]) -> str:
    low, high = bounds
    return str(low) if low == high else f"{low}..{high}" if high < UNBOUNDED else f"{low} or more"


class BaseRunner:
    """A backend over one artifact. Subclasses set ``path``, ``input_spec``, ``backend``, ``description`` and
    implement :meth:`infer_impl` and :meth:`close`."""

    path: Any
    input_spec: InputSpec
    backend: str
    description: str

    def infer(self, pixel_values: Any, extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Outputs by name for ``pixel_values`` ``[B, 3, H, W]``, checked against the artifact first (float outputs
        as float32; a fused head's integer and bool outputs as they are). ``extra``: a fused head's other inputs
        (thresholds, see :mod:`m2f_deploy.runtime.heads`)."""
        name = getattr(self.path, "name", str(self.path))
        checked = self.input_spec.check(pixel_values, name)
        return self.infer_impl(checked, extra) if extra else self.infer_impl(checked)

    def infer_impl(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> BaseRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
