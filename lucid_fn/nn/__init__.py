"""Functional building blocks shared by the model families."""

from lucid_fn.nn import fused
from lucid_fn.nn.attention import init_sra, sra
from lucid_fn.nn.block import init_block, run_blocks
from lucid_fn.nn.block import block as block
from lucid_fn.nn.layers import (
    Biased,
    Init,
    adaptive_avg_pool,
    add_bias,
    conv,
    depthwise_conv3x3,
    drop_path,
    dropout,
    gelu,
    init_conv,
    init_layer_norm,
    init_linear,
    layer_norm,
    linear,
    materialize,
    normal,
    patchify_conv,
    space_to_depth_conv,
    resize_pos_embed,
    stack,
)

__all__ = [
    "Biased",
    "Init",
    "adaptive_avg_pool",
    "add_bias",
    "block",
    "conv",
    "depthwise_conv3x3",
    "drop_path",
    "dropout",
    "fused",
    "gelu",
    "init_block",
    "init_conv",
    "init_layer_norm",
    "init_linear",
    "init_sra",
    "layer_norm",
    "linear",
    "materialize",
    "normal",
    "patchify_conv",
    "space_to_depth_conv",
    "resize_pos_embed",
    "run_blocks",
    "sra",
    "stack",
]
