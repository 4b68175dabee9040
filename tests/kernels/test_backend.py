"""lucid_fn.kernels.backend: without Pallas' Triton backend, or where a family fails to
lower for CUDA, models are built with those kernels off, run their XLA path, and say so
once. Each failure is made in a fresh interpreter, as a JAX without the backend would be."""

import json
import subprocess
import sys
import textwrap

import pytest
from helpers import cuda_hlo

from lucid_fn.kernels import KernelSettings, backend

# each case's program prints one JSON line: what the test checks
COMMON = """
import json, sys, warnings
import jax, jax.numpy as jnp, numpy as np
from lucid_fn import registry
from lucid_fn.kernels import KernelSettings, backend

def ours(caught):
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]

arch = dict(img_size=64, num_classes=10, depths=(1, 1, 1, 1), dtype=jnp.bfloat16)
with warnings.catch_warnings(record=True) as built:
    warnings.simplefilter("always")
    v2 = registry["pvt_v2_b0"](**arch)
    v1 = registry["pvt_small"](flavor="paper", **arch)
    off = registry["pvt_v2_b0"](kernels="off", **arch)
from jax._src import xla_bridge  # whether anything has started JAX's backends yet
started_by_build = xla_bridge.backends_are_initialized()
"""

MISSING_MODULE = COMMON + """
x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
params = v2.init(jax.random.key(0))
with warnings.catch_warnings(record=True) as traced:
    warnings.simplefilter("always")
    same = bool(jnp.array_equal(v2.apply(params, x), off.apply(params, x)))
    v1_params = jax.eval_shape(v1.init, jax.random.key(0))
    hlo = backend.lower_for_cuda(v2.apply, params, x).as_text()
    hlo += backend.lower_for_cuda(v1.apply, v1_params, x).as_text()
print(json.dumps({"at_build": ours(built), "at_trace": ours(traced), "same": same,
                  "started_by_build": started_by_build,
                  "config_as_asked": v2.config.kernels == KernelSettings(),
                  "fused_in_cuda_hlo": "lucid_fn_fused" in hlo, "missing": backend.MISSING}))
"""

NO_LOWERING = """
from jax.interpreters import mlir
from jax._src.pallas import pallas_call

def gone(ctx, *args, **params):
    raise NotImplementedError("no Pallas lowering for CUDA in this JAX")

mlir.register_lowering(pallas_call.pallas_call_p, gone, platform="cuda")
""" + COMMON + """
with warnings.catch_warnings(record=True) as checked:
    warnings.simplefilter("always")
    on_gpu = backend.usable(KernelSettings(), platform="gpu")
    again = backend.usable(KernelSettings(), platform="gpu")
    on_cpu = backend.usable(KernelSettings())
print(json.dumps({"at_build": ours(built), "warnings": ours(checked),
                  "cpu_default": on_cpu == KernelSettings(),
                  "gpu_off": on_gpu == KernelSettings.off(), "same_twice": again == on_gpu}))
"""


def _run(program: str, blocked: str | None = None) -> dict:
    """``program`` in a fresh interpreter (in which importing ``blocked`` fails)."""
    code = f"import sys\nsys.modules[{blocked!r}] = None\n" if blocked else ""
    code += textwrap.dedent(program)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_probes_run_each_familys_kernels_when_lowered_for_cuda():
    """A probe that lowered no kernel would pass a backend that cannot run one."""
    for family in backend.FAMILIES:
        fn, args = backend.probe(family, getattr(KernelSettings(), family))
        assert "lucid_fn_fused" in cuda_hlo(fn, *args), family
    assert backend.lowering_failures(KernelSettings()) == {}
    assert backend.usable(KernelSettings(), platform="gpu") == KernelSettings()
    with pytest.raises(ValueError, match="unknown kernel family 'gelu'"):
        backend.probe("gelu", None)


def test_without_the_triton_module_every_model_runs_its_xla_path_and_warns_once():
    """Nothing is checked as a model is built (asking JAX for its backend would start it,
    before a jax.distributed.initialize); the first trace turns every family off."""
    got = _run(MISSING_MODULE, blocked="jax.experimental.pallas.triton")
    assert got["missing"].startswith("jax.experimental.pallas.triton cannot be imported")
    assert got["at_build"] == [] and got["config_as_asked"] and not got["started_by_build"]
    assert len(got["at_trace"]) == 1, got["at_trace"]  # two models, four traces: one warning
    assert "the fused kernels are off and every model runs its XLA path" in got["at_trace"][0]
    assert got["same"] and not got["fused_in_cuda_hlo"]


def test_families_that_fail_to_lower_on_a_gpu_are_off_with_one_warning():
    """Pallas' lowering for CUDA gone (the Triton module importable): on a GPU every
    family's probe fails, so each is off; off the GPU nothing is lowered, nothing checked."""
    got = _run(NO_LOWERING)
    assert got["at_build"] == []
    assert got["cpu_default"] and got["gpu_off"] and got["same_twice"]
    assert len(got["warnings"]) == 1, got["warnings"]
    message = got["warnings"][0]
    assert "could not lower these fused kernels for CUDA" in message
    assert all(f"{family}: " in message for family in backend.FAMILIES)
