"""Which parts of the graph stay float32 in a reduced-precision build (no torch, no onnx: TensorRT uses it too).

fp16 overflows or loses the result in normalisations, softmaxes and reductions, in the deformable sampling
arithmetic (locations, bilinear taps, indices; the model's ``sampler`` module) and in the sine position
embeddings. Both exporters name nodes by module scope (``/model/transformer_module/layers.0/cross_attn/Softmax``),
and TensorRT's ONNX parser names layers after the nodes, so one list of scopes serves both builds.
"""

from __future__ import annotations

# onnxruntime fp16 conversion: op types kept in float32 (with the converter's own defaults)
OP_BLOCK_LIST = (
    "LayerNormalization", "Softmax", "InstanceNormalization", "GroupNormalization",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceLogSumExp",
    "Pow", "Sqrt", "Exp", "Erf",
)  # fmt: skip
# module scopes kept in float32 in every reduced-precision build
SCOPE_BLOCK_LIST = ("/sampler/", "/position_embedding/", "/position_embedder/")
# the masked cross-attention of the transformer decoder: its softmax sees -inf-masked logits
CROSS_ATTENTION_SCOPE = "/cross_attn/"


def tensorrt_fp32_layer(name: str, kind: str) -> bool:
    """Whether TensorRT layer ``name`` of kind ``kind`` (``normalization``, ``softmax``, ...) is pinned to float32.

    Pinned: every LayerNorm / GroupNorm (TensorRT's normalization layers), the masked cross-attention softmax, and
    everything in the :data:`SCOPE_BLOCK_LIST` scopes. The rest runs in fp16 (TensorRT picks, per layer).
    """
    if kind == "normalization":
        return True
    if kind == "softmax" and CROSS_ATTENTION_SCOPE in name:
        return True
    return any(scope in name for scope in SCOPE_BLOCK_LIST)
