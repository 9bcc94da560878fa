"""detectron2-layout checkpoint files (test helper): the model zoo's key names, dtypes and envelope.

Written from the original code's module names (facebookresearch/Mask2Former ``MaskFormer``: ``backbone``,
``sem_seg_head.pixel_decoder``, ``sem_seg_head.predictor``; detectron2's ResNet; ``D2SwinTransformer``), key by key,
independently of ``m2f_deploy.detectron2``'s rename table: a Hugging Face state dict is re-spelled the way the
original modules name (and fuse) the same tensors.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from m2f_deploy.config import Mask2FormerConfig, ResNetConfig


def _resnet(hf: dict, cfg: ResNetConfig) -> dict:
    enc = "model.pixel_level_module.encoder"
    out = {}

    def conv_bn(d2: str, ours: str) -> None:
        out[f"{d2}.weight"] = hf[f"{ours}.convolution.weight"]
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{d2}.norm.{p}"] = hf[f"{ours}.normalization.{p}"]

    conv_bn("backbone.stem.conv1", f"{enc}.embedder.embedder")
    for s, depth in enumerate(cfg.depths):
        for b in range(depth):
            block = f"{enc}.encoder.stages.{s}.layers.{b}"
            for k in range(3):
                conv_bn(f"backbone.res{s + 2}.{b}.conv{k + 1}", f"{block}.layer.{k}")
            if b == 0:
                conv_bn(f"backbone.res{s + 2}.{b}.shortcut", f"{block}.shortcut")
    return out


def _swin(hf: dict, cfg) -> dict:
    enc = "model.pixel_level_module.encoder"
    out = {
        "backbone.patch_embed.proj.weight": hf[f"{enc}.embeddings.patch_embeddings.projection.weight"],
        "backbone.patch_embed.proj.bias": hf[f"{enc}.embeddings.patch_embeddings.projection.bias"],
        "backbone.patch_embed.norm.weight": hf[f"{enc}.embeddings.norm.weight"],
        "backbone.patch_embed.norm.bias": hf[f"{enc}.embeddings.norm.bias"],
    }
    ws = cfg.window_size
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
    index = torch.from_numpy(rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]).long()  # a persistent int64 buffer
    for i, depth in enumerate(cfg.depths):
        for j in range(depth):
            src, dst = f"{enc}.encoder.layers.{i}.blocks.{j}", f"backbone.layers.{i}.blocks.{j}"
            a = f"{src}.attention.self"
            for p in ("weight", "bias"):
                out[f"{dst}.norm1.{p}"] = hf[f"{src}.layernorm_before.{p}"]
                out[f"{dst}.attn.qkv.{p}"] = torch.cat([hf[f"{a}.query.{p}"], hf[f"{a}.key.{p}"], hf[f"{a}.value.{p}"]])
                out[f"{dst}.attn.proj.{p}"] = hf[f"{src}.attention.output.dense.{p}"]
                out[f"{dst}.norm2.{p}"] = hf[f"{src}.layernorm_after.{p}"]
                out[f"{dst}.mlp.fc1.{p}"] = hf[f"{src}.intermediate.dense.{p}"]
                out[f"{dst}.mlp.fc2.{p}"] = hf[f"{src}.output.dense.{p}"]
            out[f"{dst}.attn.relative_position_bias_table"] = hf[f"{a}.relative_position_bias_table"]
            out[f"{dst}.attn.relative_position_index"] = index
        if i < 3:
            out[f"backbone.layers.{i}.downsample.reduction.weight"] = hf[f"{enc}.encoder.layers.{i}.downsample.reduction.weight"]
            for p in ("weight", "bias"):
                out[f"backbone.layers.{i}.downsample.norm.{p}"] = hf[f"{enc}.encoder.layers.{i}.downsample.norm.{p}"]
        for p in ("weight", "bias"):
            out[f"backbone.norm{i}.{p}"] = hf[f"{enc}.hidden_states_norms.stage{i + 1}.{p}"]
    return out


def _heads(hf: dict, config: Mask2FormerConfig) -> dict:
    pix, pd = "model.pixel_level_module.decoder", "sem_seg_head.pixel_decoder"
    tm, pr = "model.transformer_module", "sem_seg_head.predictor"
    out = {f"{pd}.transformer.level_embed": hf[f"{pix}.level_embed"]}
    for i in range(3):
        for j in range(2):
            for p in ("weight", "bias"):
                out[f"{pd}.input_proj.{i}.{j}.{p}"] = hf[f"{pix}.input_projections.{i}.{j}.{p}"]
    for i in range(config.encoder_layers):
        src, dst = f"{pix}.encoder.layers.{i}", f"{pd}.transformer.encoder.layers.{i}"
        for p in ("weight", "bias"):
            for m in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
                out[f"{dst}.self_attn.{m}.{p}"] = hf[f"{src}.self_attn.{m}.{p}"]
            out[f"{dst}.norm1.{p}"] = hf[f"{src}.self_attn_layer_norm.{p}"]
            out[f"{dst}.linear1.{p}"] = hf[f"{src}.fc1.{p}"]
            out[f"{dst}.linear2.{p}"] = hf[f"{src}.fc2.{p}"]
            out[f"{dst}.norm2.{p}"] = hf[f"{src}.final_layer_norm.{p}"]
    out[f"{pd}.mask_features.weight"] = hf[f"{pix}.mask_projection.weight"]
    out[f"{pd}.mask_features.bias"] = hf[f"{pix}.mask_projection.bias"]
    for name in ("adapter_1", "layer_1"):  # detectron2 Conv2d(bias=False, norm=GroupNorm)
        out[f"{pd}.{name}.weight"] = hf[f"{pix}.{name}.0.weight"]
        out[f"{pd}.{name}.norm.weight"] = hf[f"{pix}.{name}.1.weight"]
        out[f"{pd}.{name}.norm.bias"] = hf[f"{pix}.{name}.1.bias"]
    out[f"{pr}.query_feat.weight"] = hf[f"{tm}.queries_features.weight"]
    out[f"{pr}.query_embed.weight"] = hf[f"{tm}.queries_embedder.weight"]
    out[f"{pr}.level_embed.weight"] = hf[f"{tm}.level_embed.weight"]
    for i in range(config.decoder_layers - 1):
        src = f"{tm}.decoder.layers.{i}"
        sa, ca, ffn = (f"{pr}.transformer_{k}_layers.{i}" for k in ("self_attention", "cross_attention", "ffn"))
        out[f"{sa}.self_attn.in_proj_weight"] = torch.cat([hf[f"{src}.self_attn.{q}_proj.weight"] for q in "qkv"])
        out[f"{sa}.self_attn.in_proj_bias"] = torch.cat([hf[f"{src}.self_attn.{q}_proj.bias"] for q in "qkv"])
        out[f"{ca}.multihead_attn.in_proj_weight"] = hf[f"{src}.cross_attn.in_proj_weight"]
        out[f"{ca}.multihead_attn.in_proj_bias"] = hf[f"{src}.cross_attn.in_proj_bias"]
        for p in ("weight", "bias"):
            out[f"{sa}.self_attn.out_proj.{p}"] = hf[f"{src}.self_attn.out_proj.{p}"]
            out[f"{sa}.norm.{p}"] = hf[f"{src}.self_attn_layer_norm.{p}"]
            out[f"{ca}.multihead_attn.out_proj.{p}"] = hf[f"{src}.cross_attn.out_proj.{p}"]
            out[f"{ca}.norm.{p}"] = hf[f"{src}.cross_attn_layer_norm.{p}"]
            out[f"{ffn}.linear1.{p}"] = hf[f"{src}.fc1.{p}"]
            out[f"{ffn}.linear2.{p}"] = hf[f"{src}.fc2.{p}"]
            out[f"{ffn}.norm.{p}"] = hf[f"{src}.final_layer_norm.{p}"]
    for p in ("weight", "bias"):
        out[f"{pr}.decoder_norm.{p}"] = hf[f"{tm}.decoder.layernorm.{p}"]
        out[f"{pr}.class_embed.{p}"] = hf[f"class_predictor.{p}"]
        for k in range(3):
            out[f"{pr}.mask_embed.layers.{k}.{p}"] = hf[f"{tm}.decoder.mask_predictor.mask_embedder.{k}.0.{p}"]
    out["criterion.empty_weight"] = torch.ones(config.num_labels + 1)
    return out


def detectron2_state(hf: dict[str, torch.Tensor], config: Mask2FormerConfig) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict re-spelled as the original Mask2Former's ``state_dict()``."""
    backbone = config.backbone_config
    body = _resnet(hf, backbone) if isinstance(backbone, ResNetConfig) else _swin(hf, backbone)
    return {**body, **_heads(hf, config)}


def write_pkl(state: dict[str, torch.Tensor], path: Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    """The model zoo's ``.pkl``: ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}``."""
    model = {k: v.detach().cpu().numpy() for k, v in state.items()}
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "Facebook AI Research", "matching_heuristics": True}, f, protocol)
    return Path(path)


def write_pth(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A detectron2 training checkpoint (``.pth``): the model's tensors plus the trainer's bookkeeping."""
    torch.save({"model": dict(state), "iteration": 89999, "scheduler": {"last_epoch": 89999}}, path)
    return Path(path)
