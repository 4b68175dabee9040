"""Functional building blocks shared by the model families."""

from lucid_fn.nn.layers import (
    Init,
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
    stack,
)

__all__ = [
    "Init",
    "drop_path",
    "dropout",
    "gelu",
    "init_conv",
    "init_layer_norm",
    "init_linear",
    "layer_norm",
    "linear",
    "materialize",
    "normal",
    "patchify_conv",
    "stack",
]
