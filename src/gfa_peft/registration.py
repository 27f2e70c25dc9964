"""Register GFA with PEFT when `gfa_peft` is imported, without importing PEFT just for that.

PEFT has no plugin discovery: GFA must be registered before `PeftModel.from_pretrained` meets a saved GFA
adapter, and users rely on `import gfa_peft` doing it. Importing PEFT takes seconds (torch, transformers),
which the `gfa` command line must not pay before it knows what to run. So: if PEFT is already imported,
register now; otherwise register the moment PEFT's own import finishes, through a one-shot import hook.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


def register_gfa() -> None:
    """Add GFA to PEFT's method tables (importing `gfa_peft.tuner` does it)."""
    importlib.import_module("gfa_peft.tuner")


def register_when_peft_is_imported() -> None:
    if "peft" in sys.modules:
        register_gfa()
    elif not any(isinstance(finder, _AfterPeftImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when `peft` is about to load, wraps its loader so GFA is registered right after."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot; the finders after us locate peft as usual
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None:
            return spec
        load_peft = spec.loader.exec_module

        def exec_module(module):
            load_peft(module)
            register_gfa()

        spec.loader.exec_module = exec_module
        return spec
