"""Every model class in m2f_deploy.modeling says what it is (timm style: shapes in the docstring)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from torch import nn

import m2f_deploy.modeling


def test_every_model_class_has_a_docstring():
    classes = []
    for info in pkgutil.iter_modules(m2f_deploy.modeling.__path__):
        module = importlib.import_module(f"m2f_deploy.modeling.{info.name}")
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass)
                    if issubclass(c, nn.Module) and c.__module__ == module.__name__]  # fmt: skip
    assert len(classes) >= 20  # the test sees the model's classes
    missing = sorted(c.__qualname__ for c in classes if not (c.__doc__ or "").strip())
    assert not missing, missing
