"""gfa-peft: Global Factorized Adaptation as a Hugging Face PEFT method.

Importing this package registers the method with PEFT, so `get_peft_model(model, GfaConfig(...))`
and `PeftModel.from_pretrained(model, saved_gfa_adapter)` work. The public names below are loaded on
first use, so `import gfa_peft` (and the `gfa` command line) stays cheap until they are needed.

How the package is laid out, each layer importing only from the layers above it in this list:

- core, pure torch: `layout` (the m x k grid), `scatter` (the slice autograd function), `weight_ops`
  (each layer type's weight as a matrix), `internals` (every use of a PEFT or torch internal);
- PEFT integration: `targets` (PEFT's target matching), `tuner/` (GfaConfig, GfaLayer, GfaModel), `introspect`;
- `io/`: atomic files, text tables, figures;
- `data/`: the asset cache, tasks, splits, tokenisation, architecture presets;
- `adapters/`: saved adapters, merging into checkpoints, conversion to LoRA, distributed training helpers;
- `analysis/`: budgets and rank anchors, realized ranks, the approximation lens;
- `training/`: one run, methods, recipes and learning rates, evaluation, sweeps;
- `bench/`: the step-time and memory benchmark;
- `cli/`: the `gfa` command, one thin module per subcommand.
"""

# Only the standard library's `sys` is imported here (through `registration`): the installed start-up hook
# imports this package in every Python process, so anything more would slow every interpreter's start.
from gfa_peft.registration import register_when_peft_is_imported

# Logging is the application's to configure: the `gfa` command quiets third-party libraries for its own runs
# (gfa_peft.cli.quiet_libraries); importing the library changes nothing.
register_when_peft_is_imported()

__version__ = "0.1.0"

_PUBLIC = {
    "AdapterLayout": "gfa_peft.introspect",
    "delta_weights": "gfa_peft.introspect",
    "factors": "gfa_peft.introspect",
    "layout_of": "gfa_peft.introspect",
    "Layout": "gfa_peft.layout",
    "ModuleSlice": "gfa_peft.layout",
    "build_layout": "gfa_peft.layout",
    "GfaConfig": "gfa_peft.tuner",
    "GfaLayer": "gfa_peft.tuner",
    "GfaModel": "gfa_peft.tuner",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'gfa_peft' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
