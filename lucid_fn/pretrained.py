"""Published ImageNet-1k weights by name.

    model, params = lucid_fn.pretrained("pvt_v2_b2")            # timm/pvt_v2_b2.in1k
    model, params = lucid_fn.pretrained("pvt_small", num_classes=10)   # new head, rest loaded
    model, params = lucid_fn.pretrained("pvt_small", weights="pvt-small-224/")  # no network
    init, apply = registry["pvt_v2_b2"](pretrained=True)       # init(key) gives the weights

``PRETRAINED`` is the table: for each model and tag, where the file lives on the Hugging Face
hub, its layout, the builder arguments it fits, its license, label set and input config, and
the top-1 its authors report. Files come through ``huggingface_hub`` (its cache, its offline
mode ``HF_HUB_OFFLINE=1``; an optional dependency, ``pip install 'lucid-fn[hub]'``) or from a
local file or folder; each is converted once into our safetensors (``weights.save``) under
``$LUCID_FN_CACHE/pretrained`` (default ``~/.cache/lucid_fn``), so a second load reads one
file. docs/pretrained.md says how each entry was verified.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os

import jax

from lucid_fn import weights as weights_lib
from lucid_fn.imagenet import InputConfig
from lucid_fn.registry import Model, registry

# timm's pvt_v2 default_cfgs (crop_pct 0.9, bicubic, ImageNet mean and std).
TIMM_V2_INPUT = InputConfig(img_size=224, crop_fraction=0.9, interpolation="bicubic")
# The official PVT v1 classification code evaluates as DeiT does: Resize(int(256 / 224 *
# 224), bicubic) then CenterCrop(224), i.e. crop fraction 0.875.
OFFICIAL_V1_INPUT = InputConfig(img_size=224, crop_fraction=0.875, interpolation="bicubic")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """One published checkpoint: ``model`` (a registry name) built with ``builder`` loads
    the file ``repo``/``files[0]`` (else the next of ``files``) in ``layout``."""
    model: str
    tag: str
    repo: str
    layout: str  # weights.LAYOUTS name: "timm" (v2) or "hf" (v1)
    top1: float
    top1_source: str
    params_m: float  # the parameter count the source publishes, in millions
    verified: str
    builder: dict = dataclasses.field(default_factory=dict)
    files: tuple = HUB_FILES
    revision: str | None = None  # None: the repo's main branch
    license: str = "apache-2.0"
    num_classes: int = 1000
    labels: str = "imagenet-1k"
    input: InputConfig = TIMM_V2_INPUT

    @property
    def name(self) -> str:
        return f"{self.model}.{self.tag}"

    @property
    def flavor(self) -> str | None:
        return self.builder.get("flavor")

    def native_kwargs(self) -> dict:
        """The builder arguments the file was made for."""
        return {**self.builder, "num_classes": self.num_classes, "img_size": self.input.img_size}

    def url(self, filename: str) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/{self.revision or 'main'}/{filename}"


_PVT_REPO = "https://github.com/whai362/PVT classification/README.md (Acc@1)"
# How each fact was checked (docs/pretrained.md): what all entries of a source share, then
# what was seen of each repository on the hub.
_TIMM_VERIFIED = ("hub id and input config from timm's pvt_v2.py default_cfgs (hf_hub_id='timm/',"
                  " crop_pct 0.9, bicubic, ImageNet mean/std); top-1 from the PVT model zoo; "
                  "params and apache-2.0 from the model cards; ")
_HF_VERIFIED = ("repo id from transformers' convert_pvt_to_pytorch.py and the Zetatech org page; "
                "top-1 and params from the PVT model zoo; input config from the official code's "
                "DeiT evaluation transform; apache-2.0 on the repo page; ")


def _timm(model: str, top1: float, params_m: float, seen: str, **builder) -> Pretrained:
    return Pretrained(model, "in1k", f"timm/{model}.in1k", "timm", top1, _PVT_REPO,
                      params_m, _TIMM_VERIFIED + seen, builder=builder)


def _hf(model: str, size: str, top1: float, params_m: float, seen: str,
        **builder) -> Pretrained:
    return Pretrained(model, "in1k", f"Zetatech/pvt-{size}-224", "hf", top1, _PVT_REPO,
                      params_m, _HF_VERIFIED + seen, builder=dict(flavor="paper", **builder),
                      input=OFFICIAL_V1_INPUT)


_SAME_FILES = "files: not listed, taken to be those of the source's other copies"
PRETRAINED: dict[str, Pretrained] = {e.name: e for e in [
    _timm("pvt_v2_b0", 70.5, 3.7, "files: list at 49dc831 (model.safetensors, pytorch_model.bin)"),
    _timm("pvt_v2_b1", 78.7, 14.0, _SAME_FILES),
    _timm("pvt_v2_b2", 82.0, 25.4, "files: pytorch_model.bin history (250d713); safetensors "
                                   "taken as for b0"),
    _timm("pvt_v2_b2_li", 82.1, 22.6, "files: list at c7eccd6 (model.safetensors, "
                                      "pytorch_model.bin)", linear=True),
    _timm("pvt_v2_b3", 83.1, 45.2, _SAME_FILES),
    _timm("pvt_v2_b4", 83.6, 62.6, _SAME_FILES),
    _timm("pvt_v2_b5", 83.8, 82.0, "files: commit b18cbdb adds model.safetensors and "
                                   "pytorch_model.bin"),
    _hf("pvt_tiny", "tiny", 75.1, 13.2, "files: list at main 6a44ba9 (model.safetensors, "
                                        "pytorch_model.bin)"),
    _hf("pvt_small", "small", 79.8, 24.5, _SAME_FILES),
    _hf("pvt_medium", "medium", 81.2, 44.2, _SAME_FILES),
    # The official PVT-Large has 8 blocks in stage 2 (classification/pvt.py), Lucid's 4.
    _hf("pvt_large", "large", 81.7, 61.4, _SAME_FILES, depths=(3, 8, 27, 3)),
]}


# ------------------------------------------------------------------------ the table


def list_pretrained(pattern: str = "*") -> list[str]:
    """Names of the published checkpoints (``model.tag``) matching a shell pattern."""
    import fnmatch

    return sorted(n for n in PRETRAINED if fnmatch.fnmatchcase(n, pattern))


def find(name: str) -> Pretrained:
    """The entry for ``"pvt_v2_b2.in1k"``, or a model's first entry for ``"pvt_v2_b2"``."""
    if name in PRETRAINED:
        return PRETRAINED[name]
    for entry in PRETRAINED.values():
        if entry.model == name:
            return entry
    known = sorted({e.model for e in PRETRAINED.values()} | set(PRETRAINED))
    if name in registry:
        raise ValueError(f"{name} has no published weights; models that have: "
                         f"{', '.join(sorted({e.model for e in PRETRAINED.values()}))}")
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"no published weights named {name!r}.{hint} Known: {', '.join(known)}")


def input_config(name: str) -> InputConfig:
    """How ``name``'s images are prepared (for ``lucid_fn.imagenet.preprocess``)."""
    return find(name).input


def _check_flavor(entry: Pretrained, kwargs: dict) -> None:
    asked = kwargs.get("flavor", entry.flavor)
    if entry.flavor is not None and asked != entry.flavor:
        raise ValueError(
            f"{entry.model} has no published weights for flavor={asked!r}: Lucid's network "
            f"has no attention output projection and tanh GELU, so no published checkpoint "
            f"fits it. The published weights are the PVT paper's network: use "
            f"flavor={entry.flavor!r} (the default here)")


# -------------------------------------------------------------------- finding files


def _hub_error(entry: Pretrained, why: str) -> FileNotFoundError:
    first = entry.files[0]
    return FileNotFoundError(
        f"cannot get {entry.repo} ({' or '.join(entry.files)}): {why}. With network, run "
        f"`hf download {entry.repo} {first}` (it fills the hub cache this reads); or download "
        f"{entry.url(first)} by hand and pass weights='path/to/{first}' (the file or its "
        f"folder)")


def hub_file(entry: Pretrained, cache_dir=None) -> str:
    """The first of ``entry.files`` that the hub (or its cache) has, through
    ``huggingface_hub.hf_hub_download``. ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` are read at
    each call (huggingface_hub reads them once, at import)."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ImportError(
            f"downloading {entry.repo} needs huggingface_hub: pip install 'lucid-fn[hub]' "
            f"(or pip install huggingface_hub); or pass weights='path/to/{entry.files[0]}'"
        ) from None
    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE") or None
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    unreachable = False
    for filename in entry.files:
        try:
            return huggingface_hub.hf_hub_download(
                entry.repo, filename, revision=entry.revision, cache_dir=cache_dir,
                local_files_only=offline or unreachable)
        except errors.LocalEntryNotFoundError:  # not cached, and the hub not reached
            # The next file is looked for in the cache only: huggingface_hub retries a
            # connection for tens of seconds.
            unreachable = True
        except errors.EntryNotFoundError:  # the hub answered: no such file
            continue
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
            raise _hub_error(entry, f"the hub has no such repository or revision "
                                    f"({type(e).__name__})") from None
    where = huggingface_hub.constants.HF_HUB_CACHE if cache_dir is None else cache_dir
    why = ("offline (HF_HUB_OFFLINE=1)" if offline else
           "the hub was not reached (HF_HUB_OFFLINE=1 skips trying)" if unreachable else
           "the hub has none of these files")
    raise _hub_error(entry, f"{why}, and not in the hub cache {where}")


def local_file(entry: Pretrained, path) -> str:
    """``path`` itself, or in a folder the first of ``entry.files`` it holds."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for filename in entry.files:
            candidate = os.path.join(path, filename)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"{path} holds none of {', '.join(entry.files)} (the files of "
                                f"{entry.repo}); download {entry.url(entry.files[0])} into it")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights file at {path}; give the file downloaded from "
                                f"{entry.url(entry.files[0])} or its folder")
    return path


# --------------------------------------------------------------- the converted cache


def cache_root() -> str:
    return os.environ.get("LUCID_FN_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lucid_fn")


def converted_path(entry: Pretrained, source: str) -> str:
    """Where ``source`` converted for ``entry`` is kept. The key is the file's real path,
    size and modification time: a hub snapshot links to a blob named by its content hash,
    so a new revision gets a new key, and a local file that changes does too."""
    real = os.path.realpath(source)
    stat = os.stat(real)
    key = hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    folder = os.path.join(cache_root(), "pretrained", entry.repo.replace("/", "--"))
    return os.path.join(folder, f"{entry.model}-{key[:16]}.safetensors")


def converted(entry: Pretrained, source: str) -> str:
    """Our safetensors file of ``source`` at the entry's own build: written once
    (atomically), then reused. A file ``weights.save`` wrote is used as it is."""
    if weights_lib.is_own_file(source):
        return source
    target = converted_path(entry, source)
    if not os.path.exists(target):
        kwargs = entry.native_kwargs()
        # Any layout of the family converts (the official .pth releases too), not only
        # the hub copy's.
        params = weights_lib.load_torch_checkpoint(source, entry.model, **kwargs)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        weights_lib.save(target, params, entry.model, **kwargs)
    return target


# ---------------------------------------------------------------------- the one line


def pretrained(name: str, *, weights=None, cache_dir=None, rng=None, **builder_kwargs):
    """``(model, params)``: ``registry[model](**builder_kwargs)`` with the published weights
    of ``name`` (``"pvt_v2_b2"`` or ``"pvt_v2_b2.in1k"``, see ``list_pretrained``).

    Builder arguments default to the entry's (v1: ``flavor="paper"``); ``num_classes``
    other than the checkpoint's starts a new head from ``rng`` (default key 0) with the
    rest loaded (0: headless); a v1 ``img_size`` other than 224 resizes the position
    embeddings; ``dtype``, ``scan_blocks``, ``kernels`` and ``features=True`` in ``apply``
    work as on any model. ``weights``: a local file or folder instead of the hub;
    ``cache_dir``: the hub cache (default ``HF_HUB_CACHE``)."""
    entry = find(name)
    _check_flavor(entry, builder_kwargs)
    kwargs = {**entry.native_kwargs(), **builder_kwargs}
    model = registry[entry.model](**kwargs)  # bad arguments fail before any download
    source = hub_file(entry, cache_dir) if weights is None else local_file(entry, weights)
    head = "keep" if model.config.num_classes == entry.num_classes else "reset"
    params = weights_lib.load_torch_checkpoint(converted(entry, source), entry.model,
                                               head=head, rng=rng, **kwargs)
    return model, params


def pretrained_model(name: str, source, **builder_kwargs) -> Model:
    """What ``registry[name](pretrained=source, ...)`` returns: the model of ``name``'s
    published weights (``source``: True for the hub, or a weights file or folder), whose
    ``init(key)`` returns those weights; the key draws only a new head, when
    ``num_classes`` is not the checkpoint's."""
    if source is True:
        source = None
    elif not isinstance(source, (str, os.PathLike)) or not os.path.exists(source):
        raise ValueError(f"pretrained= takes True (the published weights of {name}) or the "
                         f"path of a weights file or folder; got {source!r}"
                         + (" (no such file or folder)" if isinstance(source, str) else ""))
    model, params = pretrained(name, weights=source, **builder_kwargs)
    new_head = model.config.num_classes not in (0, find(name).num_classes)

    def init(key) -> dict:
        out = jax.tree_util.tree_map(lambda a: a, params)  # the caller's dicts, not ours
        if new_head:
            out["head"] = model.init(key)["head"]
        return out

    return Model(init, model.apply, name=model.name, config=model.config)
