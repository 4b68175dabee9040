"""Fused GPU kernels (Pallas, Triton backend), one module per family, each beside the
plain-JAX reference it replaces and a dispatcher that runs the kernel on CUDA where it
applies and the reference everywhere else:

    gelu.py           GELU and erf, the XLA path's and the kernels' forms
    mlp.py            PVT v1's MLP, fc2(GELU(fc1(x))), hidden layer kept on chip
    conv_mlp.py       PVT v2's MLP: fc1's bias, depthwise 3x3 conv and GELU in one pass
    conv_mlp_grad.py  its backward: the transposed conv and the taps' gradient
    attention.py      softmax(q k^T * scale) v and its backward
    layer_norm.py     residual add + LayerNorm, norm + norm, and the add+norm's backward
    dispatch.py       the custom-VJP call every family goes through
    settings.py       KernelSettings: what the kernels may do, chosen when a model is built
    backend.py        the Pallas Triton backend, and the families off where it cannot run

A model chooses its settings with the builder keyword ``kernels`` (None: the measured
defaults; "off"; a spec such as "attention.block_q=64"; or a KernelSettings), so they are
part of its config. docs/design.md says where the kernels plug in.
"""

from lucid_fn.kernels.backend import usable
from lucid_fn.kernels.settings import (AttentionSettings, ConvMlpSettings, KernelSettings,
                                       MlpSettings, NormSettings, parse, resolve)

__all__ = ["AttentionSettings", "ConvMlpSettings", "KernelSettings", "MlpSettings",
           "NormSettings", "parse", "resolve", "usable"]
