"""Weights in and out: checkpoints of other layouts, and our own files.

    from lucid_fn import weights
    params = weights.load_torch_checkpoint("pvt_v2_b0.pth", "pvt_v2_b0")
    weights.save("pvt_v2_b0.safetensors", params, "pvt_v2_b0")

``convert``: state dicts of every PVT layout (timm, HF, official, Lucid) to our params and
back (``from_state_dict``, ``to_state_dict``, ``detect_layout``), every tensor checked.
``files``: our safetensors files, which carry their model (``save``, ``load``), reading
any checkpoint file (``read_state_dict``, ``load_torch_checkpoint``), and atomic writes
(``atomic_write``, ``check_writable``). Everything is used as ``weights.NAME``.
"""

from lucid_fn.weights.convert import (LAYOUTS, Layout, detect_layout, from_state_dict,
                                      infer_kwargs, to_state_dict, unwrap)
from lucid_fn.weights.files import (atomic_write, check_writable, decode_builder_kwargs,
                                    encode_builder_kwargs, is_own_file, load,
                                    load_torch_checkpoint, read_state_dict, save)

__all__ = ["LAYOUTS", "Layout", "atomic_write", "check_writable", "decode_builder_kwargs",
           "detect_layout", "encode_builder_kwargs", "from_state_dict", "infer_kwargs",
           "is_own_file", "load", "load_torch_checkpoint", "read_state_dict", "save",
           "to_state_dict", "unwrap"]
