import pytest

import lucid_fn
from lucid_fn import list_models, register_model, registry
from lucid_fn.registry import Model

V1 = ["pvt_tiny", "pvt_small", "pvt_medium", "pvt_large", "pvt_huge"]


def test_registry_is_a_read_only_mapping_of_v1_names():
    assert set(V1) <= set(registry)
    assert "pvt_small" in registry
    assert len(registry) == len(list(registry))
    assert list(registry) == sorted(registry)
    with pytest.raises(TypeError):
        registry["pvt_small"] = lambda **kw: None


def test_list_models_filters_with_shell_patterns():
    assert set(V1) <= set(list_models("pvt_*"))
    assert list_models("pvt_[tsmlh]*") == sorted(V1)
    assert list_models("pvt_s*") == ["pvt_small"]
    assert list_models("resnet*") == []


def test_builder_returns_init_apply_pair_with_config():
    m = registry["pvt_small"](num_classes=10)
    init, apply = m
    assert callable(init) and callable(apply)
    assert isinstance(m, Model) and m.init is init and m.apply is apply
    assert m.name == "pvt_small" and m.config.num_classes == 10


def test_unknown_name_is_a_key_error_listing_close_names():
    with pytest.raises(KeyError) as e:
        registry["pvt_smal"]
    msg = str(e.value)
    assert "unknown model 'pvt_smal'" in msg and "Did you mean: pvt_small" in msg


def test_register_and_unregister_a_new_builder():
    @register_model
    def my_pvt(img_size=64, num_classes=10, **kwargs):
        return registry["pvt_tiny"](img_size=img_size, num_classes=num_classes, **kwargs)

    try:
        assert "my_pvt" in registry and registry["my_pvt"] is my_pvt
        assert lucid_fn.list_models("my_*") == ["my_pvt"]
        with pytest.raises(ValueError, match="already registered"):

            @register_model(name="my_pvt")
            def other(**kw):
                return None
    finally:
        registry.unregister("my_pvt")
    assert "my_pvt" not in registry
