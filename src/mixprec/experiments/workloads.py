"""Workloads: a model, a data set and the training defaults that suit them.

Built-ins (``--workload``): digits-mlp, digits-cnn, text-transformer.  Users bring their
own with ``package.module:callable`` specs:

* ``--model pkg.mod:make_model`` -- called with no arguments, returns an ``nn.Module``
  (for classification: (B, ...) -> (B, num_classes) logits; for "lm": (B, T) token ids
  -> (B, T, vocab) logits);
* ``--data pkg.mod:make_data`` -- called with no arguments, returns a
  :class:`mixprec.experiments.data.Dataset`.

``--model hf:SPEC`` builds a Hugging Face causal LM from a config with random weights
(:mod:`mixprec.experiments.hf`: a config.json, a directory holding one, or a model name in
the local cache; nothing is downloaded). Without ``--data`` it trains on the text
workload's data (``stdlib-text``, 256 byte tokens) and defaults; its vocabulary must
cover the data's tokens.

The working directory is importable, as with ``python -m``.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

from torch import nn

from .data import Dataset, load_digits_dataset, load_text_dataset
from .models import CharTransformer, digits_cnn, digits_mlp

__all__ = ["Workload", "WORKLOADS", "DEFAULT_WORKLOAD", "get_workload", "load_factory",
           "resolve_workload", "SPEC_FORM"]

SPEC_FORM = "package.module:callable"


@dataclass(frozen=True)
class Workload:
    """A model factory, a data factory and their default training settings."""
    name: str
    make_model: Callable[[], nn.Module]
    make_data: Callable[[], Dataset]
    steps: int
    batch_size: int
    lr: float
    model_name: str
    data_name: str


WORKLOADS: dict = {w.name: w for w in [
    Workload("digits-cnn", digits_cnn, load_digits_dataset, steps=300, batch_size=64,
             lr=3e-3, model_name="digits_cnn", data_name="digits"),
    Workload("digits-mlp", digits_mlp, load_digits_dataset, steps=300, batch_size=64,
             lr=2e-3, model_name="digits_mlp", data_name="digits"),
    Workload("text-transformer", CharTransformer, load_text_dataset, steps=200, batch_size=32,
             lr=3e-3, model_name="CharTransformer", data_name="stdlib-text"),
]}
DEFAULT_WORKLOAD = "digits-cnn"
LM_WORKLOAD = "text-transformer"     # data and defaults of a hf: causal LM without --data


def get_workload(name: str) -> Workload:
    """The built-in workload called ``name``."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; valid choices: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


def load_factory(spec: str, *, what: str = "factory") -> Callable:
    """Import the callable named by ``package.module:callable``.

    Raises ValueError naming the spec and the expected form when the spec has no colon,
    the module cannot be imported, the attribute is missing or it is not callable.
    """
    if not isinstance(spec, str):
        raise ValueError(f"{what} spec must be a string of the form '{SPEC_FORM}', got {spec!r}")
    module_name, sep, attr = spec.partition(":")
    if not (sep and module_name.strip() and attr.strip()):
        raise ValueError(f"bad {what} spec {spec!r}: expected the form '{SPEC_FORM}' "
                         f"(e.g. 'mypkg.models:make_model')")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name.strip())
    except ImportError as e:
        raise ValueError(f"bad {what} spec {spec!r}: cannot import module "
                         f"{module_name!r} ({e}); expected the form '{SPEC_FORM}'") from e
    obj = module
    for part in attr.strip().split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ValueError(f"bad {what} spec {spec!r}: module {module_name!r} has no "
                             f"attribute {attr!r}; expected the form '{SPEC_FORM}'") from e
    if not callable(obj):
        raise ValueError(f"bad {what} spec {spec!r}: {attr!r} is a {type(obj).__name__}, "
                         f"not callable; expected the form '{SPEC_FORM}'")
    return obj


def _checked_model(factory: Callable, spec: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"--model {spec!r} returned a {type(model).__name__}; a model "
                             f"factory must return a torch.nn.Module")
        return model
    return make


def _checked_data(factory: Callable, spec: str) -> Callable[[], Dataset]:
    def make() -> Dataset:
        data = factory()
        if not isinstance(data, Dataset):
            raise ValueError(f"--data {spec!r} returned a {type(data).__name__}; a data factory "
                             f"must return a mixprec.experiments.data.Dataset(name, task, "
                             f"x_train, y_train, x_test, y_test, num_classes)")
        return data
    return make


def _hf_spec(model: Optional[str]) -> Optional[str]:
    """SPEC of a ``hf:SPEC`` model, else None."""
    from .hf import HF_PREFIX
    if isinstance(model, str) and model.startswith(HF_PREFIX):
        return model[len(HF_PREFIX):]
    return None


def resolve_workload(workload: str = DEFAULT_WORKLOAD, *, model: Optional[str] = None,
                     data: Optional[str] = None) -> Workload:
    """The built-in ``workload`` with its model and/or data replaced by user factories.

    >>> resolve_workload("digits-cnn", model="mypkg.nets:small_cnn").model_name
    'mypkg.nets:small_cnn'
    """
    base = get_workload(workload)
    hf_spec = _hf_spec(model)
    if hf_spec is not None and data is None and base.name != LM_WORKLOAD:
        base = get_workload(LM_WORKLOAD)     # a causal LM needs token data
    make_model, model_name = base.make_model, base.model_name
    make_data, data_name = base.make_data, base.data_name
    if hf_spec is not None:
        from .hf import causal_lm_from_config, load_hf_config
        load_hf_config(hf_spec)              # a bad spec fails here, before any training
        make_model, model_name = partial(causal_lm_from_config, hf_spec), model
    elif model is not None:
        make_model, model_name = _checked_model(load_factory(model, what="--model"), model), model
    if data is not None:
        make_data, data_name = _checked_data(load_factory(data, what="--data"), data), data
    return Workload(base.name if model is None and data is None else "custom",
                    make_model, make_data, base.steps, base.batch_size, base.lr,
                    model_name, data_name)
