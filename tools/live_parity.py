"""Full-size parity against live references (timm and HF transformers, in the same process),
on whatever device JAX and torch see. Needs torch, timm and transformers installed (they
are not dependencies of lucid_fn); the GPU image of our device machine has them:

    JAX_DEFAULT_MATMUL_PRECISION=highest PYTHONPATH=. python3 tools/live_parity.py

For each model: build the reference at its default size (random init, eval mode), import
its state dict with ``lucid_fn.weights.from_state_dict``, run both in float32 on the same
224x224 images and print the largest logits error relative to the reference's largest
magnitude. HF's PVT v1 uses LayerNorm eps 1e-6 in two places where the official network
(ours) keeps 1e-5 (README, "Checkpoints"); the HF v1 row sets those two norms to 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from lucid_fn import registry, weights


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def compare(title, torch_model, name, **kw):
    torch_model.eval()
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = torch_model(x)
        ref = (out.logits if hasattr(out, "logits") else out).numpy()
    params = weights.from_state_dict(torch_model.state_dict(), name, **kw)
    _, apply = registry[name](**kw)
    ours = jax.jit(apply)(params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    print(f"{title:<44} {name:<14} logits rel. error {rel(ours, ref):.1e}", flush=True)


def main():
    import timm
    import transformers

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__}, "
          f"timm {timm.__version__}, transformers {transformers.__version__}; matmul precision "
          f"{jax.config.jax_default_matmul_precision}")
    torch.manual_seed(0)
    for variant in ("pvt_v2_b0", "pvt_v2_b2", "pvt_v2_b2_li"):
        compare(f"timm {variant}", timm.create_model(variant, pretrained=False), variant)
    hf = transformers.PvtForImageClassification(transformers.PvtConfig())  # pvt-tiny
    for module in hf.modules():  # the official network's epsilons (README)
        name = type(module).__name__
        if name in ("PvtPatchEmbeddings", "PvtEfficientSelfAttention"):
            module.layer_norm.eps = 1e-5
    compare("HF PvtForImageClassification (official eps)", hf, "pvt_tiny", flavor="paper")
    hf2 = transformers.PvtV2ForImageClassification(transformers.PvtV2Config())  # b0
    for module in hf2.modules():
        name = type(module).__name__
        if name in ("PvtV2OverlapPatchEmbeddings", "PvtV2SelfAttention") and hasattr(
                module, "layer_norm"):
            module.layer_norm.eps = 1e-5
    compare("HF PvtV2ForImageClassification (timm eps)", hf2, "pvt_v2_b0", norm_eps=1e-6)


if __name__ == "__main__":
    main()
