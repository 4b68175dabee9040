"""lucid_fn: Pyramid Vision Transformers as pure (init, apply) functions for JAX.

    from lucid_fn import registry
    init, apply = registry["pvt_small"](num_classes=10)
    model, params = lucid_fn.pretrained("pvt_v2_b2")   # published ImageNet weights
"""

from lucid_fn import models as _models  # noqa: F401  (fills the registry)
from lucid_fn import imagenet, weights
from lucid_fn.pretrained import list_pretrained, pretrained
from lucid_fn.registry import Model, list_models, register_model, registry
from lucid_fn.summary import count_params, summary

__version__ = "0.1.0"

__all__ = ["Model", "count_params", "imagenet", "list_models", "list_pretrained", "pretrained",
           "register_model", "registry", "summary", "weights"]

