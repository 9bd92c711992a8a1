"""Modules declared at import time, imported on first use: the CLI's command implementations.

`domainlm --help` or a command that fails validation should not pay for torch, transformers and datatrove
(~7 s of CPU on a laptop core). The CLI names every module it calls at its top (`lazy("domainlm.plan.command")`),
so its dependencies are in plain sight (tests/test_imports.py counts these as imports when it checks the package
DAG), and the module is imported the first time one of its attributes is read. A proxy rather than
`importlib.util.LazyLoader`: a lazy module placed in `sys.modules` is executed by whatever walks `sys.modules`
(torch does at import), possibly while a module it imports is half-initialised.
"""

from __future__ import annotations

import importlib


class lazy:  # noqa: N801 - reads as the function it stands for
    """Module ``name``, imported when one of its attributes is first read."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"lazy({self._name!r})"
