"""Functional building blocks shared by the model families."""

from lucid_fn.nn.layers import (
    drop_path,
    dropout,
    gelu,
    init_conv,
    init_layer_norm,
    init_linear,
    layer_norm,
    linear,
    normal_init,
    patchify_conv,
    trunc_normal_init,
)

__all__ = [
    "drop_path",
    "dropout",
    "gelu",
    "init_conv",
    "init_layer_norm",
    "init_linear",
    "layer_norm",
    "linear",
    "normal_init",
    "patchify_conv",
    "trunc_normal_init",
]
