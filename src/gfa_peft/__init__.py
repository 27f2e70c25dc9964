"""gfa-peft: Global Factorized Adaptation as a Hugging Face PEFT method."""

from gfa_peft.layout import Layout, ModuleSlice, build_layout

__version__ = "0.1.0"

__all__ = ["Layout", "ModuleSlice", "build_layout", "__version__"]
