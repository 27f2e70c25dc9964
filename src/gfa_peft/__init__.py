"""gfa-peft: Global Factorized Adaptation as a Hugging Face PEFT method.

Importing this package registers the method with PEFT, so `get_peft_model(model, GfaConfig(...))`
and `PeftModel.from_pretrained(model, saved_gfa_adapter)` work.
"""

import logging

# bitsandbytes, which PEFT imports when it is installed, warns on import that it could not fetch an optional CPU
# 4-bit kernel from the Hub (nothing here downloads at run time). Quiet that one logger unless its level was set.
if logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.NOTSET:
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from gfa_peft.introspect import AdapterLayout, delta_weights, factors, layout_of
from gfa_peft.layout import Layout, ModuleSlice, build_layout
from gfa_peft.tuner import GfaConfig, GfaLayer, GfaModel

__version__ = "0.1.0"

__all__ = [
    "AdapterLayout",
    "GfaConfig",
    "GfaLayer",
    "GfaModel",
    "Layout",
    "ModuleSlice",
    "build_layout",
    "delta_weights",
    "factors",
    "layout_of",
    "__version__",
]
