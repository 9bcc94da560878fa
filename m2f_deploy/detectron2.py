"""Original Mask2Former (detectron2) weights -> our names, which are the Hugging Face checkpoint names (needs torch).

The source names are the module names of facebookresearch/Mask2Former (``MaskFormer`` with ``sem_seg_head``:
``MSDeformAttnPixelDecoder`` as ``pixel_decoder``, ``MultiScaleMaskedTransformerDecoder`` as ``predictor``) and of
its backbones (detectron2's ``ResNet``: ``stem.conv1``, ``res2``-``res5`` with ``conv1``-``conv3`` and ``shortcut``,
each with a ``.norm``; Mask2Former's ``D2SwinTransformer``: ``patch_embed``, ``layers.i.blocks.j``, ``norm0``-
``norm3``). The targets follow transformers' Mask2Former and its own conversion script
(``convert_mask2former_original_pytorch_checkpoint_to_pytorch.py``). Fused projections are split: Swin's
``attn.qkv`` into query / key / value, the decoder self-attention's ``in_proj`` into ``q_proj`` / ``k_proj`` /
``v_proj`` (rows in that order in both); the cross-attention keeps PyTorch's fused ``in_proj`` as transformers does.

Every source key is renamed, split or skipped by name with a reason; anything else is an error naming it, so a
checkpoint of another architecture is refused rather than half-loaded.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import torch

from m2f_deploy.config import Mask2FormerConfig
from m2f_deploy.errors import CheckpointError

log = logging.getLogger(__name__)

PLM = "model.pixel_level_module"
ENC = f"{PLM}.encoder"
PIX = f"{PLM}.decoder"
TM = "model.transformer_module"
D2_PIX = "sem_seg_head.pixel_decoder"
D2_PRED = "sem_seg_head.predictor"

# detectron2 keys that inference does not use: pattern -> why
SKIPPED: dict[str, str] = {
    r"criterion\.empty_weight": "loss weight, training only",
    r"pixel_(mean|std)": "preprocessing constants (the zoo config's preprocessing carries them)",
    r"backbone\..*\.num_batches_tracked": "batch-norm step counter (SyncBN), training only",
    r"backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index": "derived from window_size",
}
_SKIPPED = re.compile("|".join(f"(?:{p})" for p in SKIPPED))

_BN = r"(weight|bias|running_mean|running_var)"
_WB = r"(weight|bias)"

# (source pattern, target template): the first full match renames a key.
RENAMES: list[tuple[str, str]] = [
    # detectron2 ResNet -> transformers ResNetBackbone
    (rf"backbone\.stem\.conv1\.weight", f"{ENC}.embedder.embedder.convolution.weight"),
    (rf"backbone\.stem\.conv1\.norm\.{_BN}", rf"{ENC}.embedder.embedder.normalization.\1"),
    (r"backbone\.res([2-5])\.(\d+)\.conv([1-3])\.weight", rf"{ENC}.encoder.stages.<s\1>.layers.\2.layer.<c\3>.convolution.weight"),
    (rf"backbone\.res([2-5])\.(\d+)\.conv([1-3])\.norm\.{_BN}", rf"{ENC}.encoder.stages.<s\1>.layers.\2.layer.<c\3>.normalization.\4"),
    (r"backbone\.res([2-5])\.(\d+)\.shortcut\.weight", rf"{ENC}.encoder.stages.<s\1>.layers.\2.shortcut.convolution.weight"),
    (rf"backbone\.res([2-5])\.(\d+)\.shortcut\.norm\.{_BN}", rf"{ENC}.encoder.stages.<s\1>.layers.\2.shortcut.normalization.\3"),
    # D2SwinTransformer -> transformers SwinBackbone
    (rf"backbone\.patch_embed\.proj\.{_WB}", rf"{ENC}.embeddings.patch_embeddings.projection.\1"),
    (rf"backbone\.patch_embed\.norm\.{_WB}", rf"{ENC}.embeddings.norm.\1"),
    (rf"backbone\.layers\.(\d+)\.blocks\.(\d+)\.norm1\.{_WB}", rf"{ENC}.encoder.layers.\1.blocks.\2.layernorm_before.\3"),
    (r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table",
     rf"{ENC}.encoder.layers.\1.blocks.\2.attention.self.relative_position_bias_table"),
    (rf"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.proj\.{_WB}", rf"{ENC}.encoder.layers.\1.blocks.\2.attention.output.dense.\3"),
    (rf"backbone\.layers\.(\d+)\.blocks\.(\d+)\.norm2\.{_WB}", rf"{ENC}.encoder.layers.\1.blocks.\2.layernorm_after.\3"),
    (rf"backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.{_WB}", rf"{ENC}.encoder.layers.\1.blocks.\2.intermediate.dense.\3"),
    (rf"backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.{_WB}", rf"{ENC}.encoder.layers.\1.blocks.\2.output.dense.\3"),
    (r"backbone\.layers\.(\d+)\.downsample\.reduction\.weight", rf"{ENC}.encoder.layers.\1.downsample.reduction.weight"),
    (rf"backbone\.layers\.(\d+)\.downsample\.norm\.{_WB}", rf"{ENC}.encoder.layers.\1.downsample.norm.\2"),
    (rf"backbone\.norm([0-3])\.{_WB}", rf"{ENC}.hidden_states_norms.stage<n\1>.\2"),
    # MSDeformAttnPixelDecoder
    (rf"{D2_PIX}\.input_proj\.(\d+)\.([01])\.{_WB}", rf"{PIX}.input_projections.\1.\2.\3"),
    (rf"{D2_PIX}\.transformer\.level_embed", f"{PIX}.level_embed"),
    (rf"{D2_PIX}\.transformer\.encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.{_WB}",
     rf"{PIX}.encoder.layers.\1.self_attn.\2.\3"),
    (rf"{D2_PIX}\.transformer\.encoder\.layers\.(\d+)\.norm1\.{_WB}", rf"{PIX}.encoder.layers.\1.self_attn_layer_norm.\2"),
    (rf"{D2_PIX}\.transformer\.encoder\.layers\.(\d+)\.linear1\.{_WB}", rf"{PIX}.encoder.layers.\1.fc1.\2"),
    (rf"{D2_PIX}\.transformer\.encoder\.layers\.(\d+)\.linear2\.{_WB}", rf"{PIX}.encoder.layers.\1.fc2.\2"),
    (rf"{D2_PIX}\.transformer\.encoder\.layers\.(\d+)\.norm2\.{_WB}", rf"{PIX}.encoder.layers.\1.final_layer_norm.\2"),
    (rf"{D2_PIX}\.mask_features\.{_WB}", rf"{PIX}.mask_projection.\1"),
    (rf"{D2_PIX}\.(adapter|layer)_(\d+)\.weight", rf"{PIX}.\1_\2.0.weight"),
    (rf"{D2_PIX}\.(adapter|layer)_(\d+)\.norm\.{_WB}", rf"{PIX}.\1_\2.1.\3"),
    # MultiScaleMaskedTransformerDecoder
    (rf"{D2_PRED}\.query_feat\.weight", f"{TM}.queries_features.weight"),
    (rf"{D2_PRED}\.query_embed\.weight", f"{TM}.queries_embedder.weight"),
    (rf"{D2_PRED}\.level_embed\.weight", f"{TM}.level_embed.weight"),
    (rf"{D2_PRED}\.input_proj\.(\d+)\.{_WB}", rf"{TM}.input_projections.\1.\2"),
    (rf"{D2_PRED}\.transformer_self_attention_layers\.(\d+)\.self_attn\.out_proj\.{_WB}", rf"{TM}.decoder.layers.\1.self_attn.out_proj.\2"),
    (rf"{D2_PRED}\.transformer_self_attention_layers\.(\d+)\.norm\.{_WB}", rf"{TM}.decoder.layers.\1.self_attn_layer_norm.\2"),
    (rf"{D2_PRED}\.transformer_cross_attention_layers\.(\d+)\.multihead_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     rf"{TM}.decoder.layers.\1.cross_attn.\2"),
    (rf"{D2_PRED}\.transformer_cross_attention_layers\.(\d+)\.norm\.{_WB}", rf"{TM}.decoder.layers.\1.cross_attn_layer_norm.\2"),
    (rf"{D2_PRED}\.transformer_ffn_layers\.(\d+)\.linear1\.{_WB}", rf"{TM}.decoder.layers.\1.fc1.\2"),
    (rf"{D2_PRED}\.transformer_ffn_layers\.(\d+)\.linear2\.{_WB}", rf"{TM}.decoder.layers.\1.fc2.\2"),
    (rf"{D2_PRED}\.transformer_ffn_layers\.(\d+)\.norm\.{_WB}", rf"{TM}.decoder.layers.\1.final_layer_norm.\2"),
    (rf"{D2_PRED}\.decoder_norm\.{_WB}", rf"{TM}.decoder.layernorm.\1"),
    (rf"{D2_PRED}\.mask_embed\.layers\.([0-2])\.{_WB}", rf"{TM}.decoder.mask_predictor.mask_embedder.\1.0.\2"),
    (rf"{D2_PRED}\.class_embed\.{_WB}", r"class_predictor.\1"),
]
_RENAMES = [(re.compile(p), t) for p, t in RENAMES]

# fused projections: (source pattern, target template with {part}, the parts in row order)
SPLITS: list[tuple[str, str, tuple[str, ...]]] = [
    (rf"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.{_WB}",
     rf"{ENC}.encoder.layers.\1.blocks.\2.attention.self.{{part}}.\3", ("query", "key", "value")),
    (rf"{D2_PRED}\.transformer_self_attention_layers\.(\d+)\.self_attn\.in_proj_(weight|bias)",
     rf"{TM}.decoder.layers.\1.self_attn.{{part}}.\2", ("q_proj", "k_proj", "v_proj")),
]
_SPLITS = [(re.compile(p), t, parts) for p, t, parts in SPLITS]
# index shifts in target names: res2-5 -> stages 0-3, conv1-3 -> layer 0-2, norm0-3 -> stage1-4
_SHIFTS = {"s": -2, "c": -1, "n": 1}


def _target(template: str, match: re.Match) -> str:
    name = match.expand(template)
    return re.sub(r"<([scn])(\d+)>", lambda m: str(int(m.group(2)) + _SHIFTS[m.group(1)]), name)


def _tensor(value: Any, key: str, source: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiu":  # object / string arrays are not weights
            raise CheckpointError(f"{source}: {key} is a {value.dtype} array, not weights")
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    else:
        raise CheckpointError(f"{source}: {key} is a {type(value).__name__}, not an array")
    if not tensor.is_floating_point():
        raise CheckpointError(f"{source}: {key} holds {tensor.dtype} values where float weights belong")
    return tensor.float()


def convert_state_dict(
    state: dict[str, Any], config: Mask2FormerConfig, source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """detectron2 ``model`` dict (numpy arrays or tensors) -> our state dict (float32 tensors), and the skipped keys.

    Raises :class:`CheckpointError` naming the keys nothing maps. Whether every parameter of ``config``'s model
    is filled, with the right shape, is checked by the loader that follows.
    """
    family = "resnet" if "backbone.stem.conv1.weight" in state else "swin" if "backbone.patch_embed.proj.weight" in state else None
    wanted = config.backbone_config.model_type
    if family and family != wanted:
        raise CheckpointError(f"{source}: holds a {family} backbone, but the model-zoo config describes a {wanted} one")
    out: dict[str, torch.Tensor] = {}
    skipped, unknown = [], []
    for key, value in state.items():
        if _SKIPPED.fullmatch(key):
            skipped.append(key)
            continue
        for pattern, template, parts in _SPLITS:
            m = pattern.fullmatch(key)
            if m:
                tensor = _tensor(value, key, source)
                if tensor.shape[0] % len(parts):
                    raise CheckpointError(f"{source}: {key} of shape {tuple(tensor.shape)} is not a fused projection")
                for part, chunk in zip(parts, tensor.chunk(len(parts), dim=0)):
                    out[_target(template.replace("{part}", part), m)] = chunk.contiguous()
                break
        else:
            for pattern, template in _RENAMES:
                m = pattern.fullmatch(key)
                if m:
                    out[_target(template, m)] = _tensor(value, key, source)
                    break
            else:
                unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:6]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 6 else "")
        raise CheckpointError(f"{source}: keys of no known Mask2Former module (not converted): {shown}")
    if skipped:
        log.info("%s: skipped unused detectron2 keys: %s", source, ", ".join(sorted(skipped)[:6]))
    return out, sorted(skipped)
