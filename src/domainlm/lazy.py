"""Modules declared at import time, executed on first use: the CLI's command implementations.

`domainlm --help` or a command that fails validation should not pay for torch, transformers and datatrove
(~7 s of CPU on a laptop core). The CLI names every module it calls at its top (`lazy("domainlm.plan.command")`),
so its dependencies are in plain sight (tests/test_imports.py counts these as imports when it checks the package
DAG), and the module runs the first time one of its attributes is read (`importlib.util.LazyLoader`).
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy(name: str) -> ModuleType:
    """Module ``name``, executed when an attribute of it is first read (at once if it is imported already)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
