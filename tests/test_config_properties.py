"""Property tests of training configs: random `--set` overrides and config files either
load into exactly what they say, or raise a ConfigError (a ValueError) naming the key;
never a numpy, XLA or Python internal error, never a silently different value.

The contract for numeric settings is stated here on its own (``NUMERIC``), not read back
from lucid_fn.train.config, so a range dropped or widened there fails here. No model is
compiled or initialised: configs are validated, not trained.
"""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from lucid_fn import registry
from lucid_fn.train import ConfigError, load_config
from lucid_fn.train import config as config_lib

# Fixed examples (derandomized) keep the suite reproducible and fast; the boundary sweep
# below is exhaustive where random draws are thin.
FAST = settings(max_examples=150, deadline=None, derandomize=True)
INT64 = 2**63 - 1
INF = math.inf

# path: (type, lowest, highest, lowest excluded, highest excluded)
NUMERIC = {
    "data.img_size": (int, 1, 16384, False, False),
    "data.test_fraction": (float, 0, 1, True, True),
    "data.split_seed": (int, 0, INF, False, False),
    "data.workers": (int, 0, INF, False, False),
    "augment.pad_crop": (int, 0, INF, False, False),
    "augment.mixup_alpha": (float, 0, INF, False, False),
    "augment.cutmix_alpha": (float, 0, INF, False, False),
    "augment.mix_prob": (float, 0, 1, False, False),
    "augment.label_smoothing": (float, 0, 1, False, True),
    "optim.lr": (float, 0, INF, True, False),
    "optim.weight_decay": (float, 0, INF, False, False),
    "optim.b1": (float, 0, 1, False, True),
    "optim.b2": (float, 0, 1, False, True),
    "optim.warmup_steps": (int, 0, 2**31 - 1, False, False),
    "optim.final_lr_ratio": (float, 0, 1, False, False),
    "optim.clip_norm": (float, 0, INF, False, False),
    "optim.ema_decay": (float, 0, 1, False, True),
    "optim.accum_steps": (int, 1, INF, False, False),
    "train.steps": (int, 1, 2**31 - 1, False, False),
    "train.batch_size": (int, 1, INF, False, False),
    "train.seed": (int, 0, INF, False, False),
    "train.log_every": (int, 1, 2**31 - 1, False, False),
    "train.eval_every": (int, 0, 2**31 - 1, False, False),
    "train.eval_batch_size": (int, 1, INF, False, False),
    "train.checkpoint_every": (int, 1, 2**31 - 1, False, False),
    "train.keep_checkpoints": (int, 1, INF, False, False),
}
DEFAULT = load_config(None)


def in_range(path, value) -> bool:
    kind, lo, hi, lo_open, hi_open = NUMERIC[path]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind is int and not isinstance(value, int):
        return False
    return math.isfinite(value) and (lo < value if lo_open else lo <= value) and \
        (value < hi if hi_open else value <= hi)


def consistent(path, value) -> bool:
    """The rules that tie a setting to the default config's others."""
    d = DEFAULT
    if path == "data.img_size":  # the default pvt_tiny: patch 4, three 2x downsamplings
        return value % 32 == 0
    if path == "augment.pad_crop":
        return value <= d.data.img_size
    if path == "optim.warmup_steps":
        return value < d.train.steps
    if path == "train.steps":
        return value > d.optim.warmup_steps
    if path == "optim.accum_steps":
        return d.train.batch_size % value == 0
    if path == "train.batch_size":
        return value % d.optim.accum_steps == 0
    return True


def boundaries():
    """Values at and around every range's ends, where off-by-one rules hide."""
    edges = {0, 1, -1, 2**31 - 1, 2**31, INT64, -INT64}
    return st.sampled_from(sorted(edges) + [0.0, 1.0, -0.0, 0.5, 1e-300, 1 - 1e-16, 1.5,
                                            -1e-3, math.nan, INF, -INF, 1e308])


ANY_VALUE = st.one_of(
    boundaries(),
    st.integers(-INT64, INT64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=6),
    st.lists(st.integers(-3, 3), max_size=3),
)


def override(path, value) -> str:
    return f"{path}={config_lib.toml_value(value)}"


def assert_names(error: Exception, *keys: str) -> None:
    assert isinstance(error, ConfigError), repr(error)
    assert any(k in str(error) for k in keys), (keys, str(error))


# ------------------------------------------------------------------------ properties


BOUNDARY_VALUES = [0, 1, -1, 2, 32, 2**31 - 1, 2**31, INT64, -INT64, 0.0, -0.0, 1.0, 0.5,
                   1e-300, 1 - 1e-16, 1.5, -1e-3, 255.0, math.nan, INF, -INF, True, "1", [1]]


def test_every_numeric_setting_at_every_boundary():
    """Every setting against the values where off-by-one and NaN rules hide (exhaustive:
    a random draw would rarely land on b2=1.0 exactly)."""
    for path in sorted(NUMERIC):
        for value in BOUNDARY_VALUES:
            check_numeric_override(path, value)


@FAST
@given(path=st.sampled_from(sorted(NUMERIC)), value=ANY_VALUE)
def test_a_numeric_override_loads_exactly_or_names_its_key(path, value):
    check_numeric_override(path, value)


def check_numeric_override(path, value):
    section, key = path.split(".")
    valid = in_range(path, value) and consistent(path, value)
    try:
        cfg = load_config(None, [override(path, value)])
    except Exception as e:  # noqa: BLE001 (the property: which exceptions, which message)
        assert not valid, f"{path}={value!r} is valid but raised {e!r}"
        related = {"augment.pad_crop": "data.img_size", "optim.warmup_steps": "train.steps",
                   "train.steps": "optim.warmup_steps", "optim.accum_steps": "batch_size",
                   "train.batch_size": "accum_steps", "data.img_size": "img_size"}
        assert_names(e, path, related.get(path, path))
        return
    assert valid, f"{path}={value!r} was accepted"
    got, kind = getattr(getattr(cfg, section), key), NUMERIC[path][0]
    assert type(got) is kind and got == kind(value), (got, value)  # ints taken as floats


@FAST
@given(path=st.sampled_from(sorted(NUMERIC)), data=st.data())
def test_every_value_in_range_loads(path, data):
    kind, lo, hi, lo_open, hi_open = NUMERIC[path]
    hi = min(hi, 10**6)
    if kind is int:
        value = data.draw(st.integers(int(lo) + lo_open, int(hi) - hi_open))
    else:
        value = data.draw(st.floats(lo, hi, exclude_min=lo_open, exclude_max=hi_open))
    if not consistent(path, value):
        return
    cfg = load_config(None, [override(path, value)])
    assert getattr(getattr(cfg, path.split(".")[0]), path.split(".")[1]) == value


KNOWN_KEYS = [f"{s}.{f}" for s, cls in config_lib.SECTIONS.items()
              for f in cls.__dataclass_fields__]
NAMES = st.text(st.characters(codec="ascii", categories=["Ll"]), min_size=1, max_size=8)


@FAST
@given(path=st.one_of(st.sampled_from(KNOWN_KEYS),
                      st.tuples(NAMES, NAMES).map(".".join),
                      st.tuples(st.sampled_from(KNOWN_KEYS), NAMES).map(".".join)),
       value=ANY_VALUE)
def test_any_override_of_any_key_loads_or_is_a_config_error_naming_it(path, value):
    try:
        cfg = load_config(None, [override(path, value)])
    except Exception as e:  # noqa: BLE001
        section, key = path.split(".")[:2]
        assert_names(e, path, f"{section}.{key}", repr(section), "model.kwargs")
        return
    parts = path.split(".")
    node = getattr(cfg, parts[0])
    node = getattr(node, parts[1]) if len(parts) == 2 else getattr(node, parts[1])[parts[2]]
    assert node == value or (isinstance(value, int) and node == float(value)), (node, value)


BUILDER_KEYS = ["embed_dims", "num_heads", "depths", "mlp_ratios", "sr_ratios", "patch_size",
                "in_channels", "num_classes", "img_size", "qkv_bias", "drop_rate",
                "attn_drop_rate", "drop_path_rate", "norm_eps", "scan_blocks", "remat",
                "flavor", "embed_dim", "dtype", "linear"]
PER_STAGE = st.lists(st.one_of(st.integers(-2, 600), st.floats(-1, 10)), min_size=0,
                     max_size=5)
# The builders' own arguments are fuzzed by the model tests; these test the config's
# merging and error wrapping, over moderate values.
KWARG_VALUE = st.one_of(st.integers(-1000, 1000), st.floats(-10, 10), st.booleans(),
                        st.text(st.characters(codec="ascii", categories=["L"]), max_size=6),
                        st.sampled_from([math.nan, INF, -INF]))


@FAST
@given(key=st.sampled_from(BUILDER_KEYS), value=st.one_of(KWARG_VALUE, PER_STAGE),
       base=st.sampled_from([None, "digits"]))
def test_model_keyword_overrides_merge_or_name_model_kwargs(key, value, base, tmp_path_factory):
    """`--set model.kwargs.K=v` adds K to the config's kwargs (the file's or the built-in
    run's, alike) or is a ConfigError about model.kwargs: the builder's checks run when the
    config loads, and nothing but a ConfigError comes out of them."""
    path = None if base is None else config_lib.pathlib.Path(__file__).parents[1] / \
        "configs" / "digits.toml"
    try:
        cfg = load_config(path, [f"model.kwargs.{key}={config_lib.toml_value(value)}"])
    except Exception as e:  # noqa: BLE001
        assert_names(e, "model.kwargs")
        return
    assert cfg.model.kwargs == {**DEFAULT.model.kwargs, key: value}
    registry[cfg.model.name](**{"img_size": cfg.data.img_size, **cfg.model.kwargs})


TABLE_VALUES = st.one_of(ANY_VALUE, st.dictionaries(NAMES, st.integers(0, 3), max_size=2))


@FAST
@given(tables=st.dictionaries(
    st.one_of(st.sampled_from(list(config_lib.SECTIONS)), NAMES),
    st.one_of(st.dictionaries(st.one_of(st.sampled_from(
        [k.split(".")[1] for k in KNOWN_KEYS]), NAMES), TABLE_VALUES, max_size=3),
        ANY_VALUE), max_size=3))
def test_a_config_file_loads_what_it_says_or_names_the_key(tables, tmp_path_factory):
    lines = []
    for section, table in tables.items():
        if isinstance(table, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {config_lib.toml_value(v)}" for k, v in table.items()]
        else:
            lines.insert(0, f"{section} = {config_lib.toml_value(table)}")
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text("\n".join(lines) + "\n")
    try:
        cfg = load_config(path)
    except Exception as e:  # noqa: BLE001
        names = [f"{s}.{k}" for s, t in tables.items() if isinstance(t, dict) for k in t]
        names += [repr(s) for s in tables] + list(tables) + ["model.kwargs", "not valid TOML"]
        assert_names(e, *names)
        return
    for section, table in tables.items():
        for key, value in table.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value or (isinstance(value, int) and got == float(value))
