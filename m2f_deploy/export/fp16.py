"""fp32 ONNX -> fp16 ONNX with fp32 islands, through onnxruntime's maintained float16 converter.

Kept in float32 (the block list), because fp16 overflows there or loses the result:
- LayerNorm, Softmax, GroupNorm (InstanceNormalization) and reductions, by op type;
- the deformable sampling arithmetic (locations, bilinear taps, indices, plugin), by the scope
  of the model's ``sampler`` module, and the sine position embeddings, by their scope.
Inputs and outputs stay float32 unless asked otherwise.
"""

from __future__ import annotations

import onnx

from m2f_deploy.export.precision import OP_BLOCK_LIST, SCOPE_BLOCK_LIST


def _blocked_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes named inside a blocked module scope (both exporters name nodes ``/module/path/...``)."""
    return [n.name for n in model.graph.node if any(s in n.name for s in SCOPE_BLOCK_LIST)]


def to_fp16(model: onnx.ModelProto, keep_io_types: bool = True) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    for i, node in enumerate(model.graph.node):  # the converter blocks nodes by name
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return convert_float_to_float16(
        model,
        keep_io_types=keep_io_types,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(OP_BLOCK_LIST),
        node_block_list=_blocked_nodes(model),
    )
