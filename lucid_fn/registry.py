"""Model names -> builders.

``registry`` is a read-only mapping (``list(registry)``, ``"pvt_small" in registry``,
``registry["pvt_small"](num_classes=10)``); builders are added with
``@register_model`` and found with ``list_models("pvt*")``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable, Iterator, Mapping


class Model(tuple):
    """What a builder returns: the ``(init, apply)`` pair, unpackable as a 2-tuple.

    It also carries the model's ``name`` and resolved ``config`` (a frozen dataclass), so
    that tools such as weight import and summaries need not re-derive them.
    """

    def __new__(cls, init, apply, *, name: str, config):
        self = super().__new__(cls, (init, apply))
        self.name = name
        self.config = config
        return self

    @property
    def init(self):
        return self[0]

    @property
    def apply(self):
        return self[1]

    @property
    def kwargs(self) -> dict:
        """Builder arguments that build this model again (its config's fields):
        ``registry[m.name](**{**m.kwargs, "img_size": 96})`` is the same model at 96.
        A config whose fields are not all builder keywords says which are
        (``builder_kwargs()``)."""
        if hasattr(self.config, "builder_kwargs"):
            return self.config.builder_kwargs()
        return {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}

    def __repr__(self):
        return f"Model(name={self.name!r}, config={self.config!r})"


Builder = Callable[..., Model]


class UnknownModelError(KeyError):
    """A KeyError whose message prints as written (KeyError quotes its argument)."""

    def __str__(self):
        return str(self.args[0])


class Registry(Mapping):
    def __init__(self):
        self._builders: dict[str, Builder] = {}

    def register(self, fn: Builder | None = None, *, name: str | None = None):
        """Decorator: ``@register_model`` or ``@register_model(name="my_pvt")``."""

        def add(f: Builder) -> Builder:
            key = name or f.__name__
            if not isinstance(key, str) or not key:
                raise ValueError(f"model name must be a non-empty string, got {key!r}")
            if key in self._builders and self._builders[key] is not f:
                raise ValueError(
                    f"a model named {key!r} is already registered; pick another name "
                    f"or call unregister({key!r}) first"
                )
            self._builders[key] = f
            return f

        return add(fn) if fn is not None else add

    def unregister(self, name: str) -> None:
        self[name]  # the same helpful KeyError for a missing name
        del self._builders[name]

    def list_models(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style pattern, like timm's ``list_models``."""
        return sorted(n for n in self._builders if fnmatch.fnmatchcase(n, pattern))

    def __getitem__(self, name: str) -> Builder:
        try:
            return self._builders[name]
        except KeyError:
            raise UnknownModelError(_unknown_name_message(name, list(self._builders))) from None

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._builders))

    def __len__(self) -> int:
        return len(self._builders)

    def __repr__(self):
        return f"Registry({list(self)})"


def resolve(model, builder_kwargs: dict) -> Model:
    """``model`` as a Model: a registered name built with ``builder_kwargs``, or a Model
    (then no builder keywords)."""
    if isinstance(model, Model):
        if builder_kwargs:
            raise ValueError("pass builder keywords only with a model name, not a built Model")
        return model
    return registry[model](**builder_kwargs)


def _unknown_name_message(name, known: list[str]) -> str:
    close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown model {name!r}.{hint} Registered models: {', '.join(sorted(known))}."


registry = Registry()
register_model = registry.register
list_models = registry.list_models
