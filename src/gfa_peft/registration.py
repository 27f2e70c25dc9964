"""Register GFA with PEFT whenever PEFT is imported, without importing PEFT just for that.

PEFT has no plugin discovery: GFA must be in PEFT's method tables before `PeftModel.from_pretrained` meets a
saved GFA adapter. Importing PEFT takes seconds (torch, transformers), which neither `import gfa_peft` nor the
`gfa` command line may pay before it is needed. So: if PEFT is already imported, register now; otherwise install
an import hook that registers the moment PEFT's own module has finished executing.

The hook must survive probes that only look PEFT up: transformers' `is_peft_available()` (run while loading any
model) calls `importlib.util.find_spec("peft")`, which asks every finder but executes nothing. The hook therefore
stays in `sys.meta_path` until PEFT's module has actually run, and removes itself only then.

The installed package also carries `gfa-peft-autoregister.pth`, which imports `gfa_peft` (this module and the
package's `__init__`, standard library only) at interpreter start-up unless the environment variable
`GFA_PEFT_AUTOREGISTER` is `0`, so any process that imports PEFT knows GFA without importing this package.
Where `gfa_peft` cannot be found (a moved editable checkout), the .pth file does nothing and prints nothing.
"""

import sys  # the only module imported at start-up: `importlib` and `warnings` load when needed

AUTOREGISTER_VARIABLE = "GFA_PEFT_AUTOREGISTER"
"""`GFA_PEFT_AUTOREGISTER=0` keeps the installed `.pth` file from installing the hook at start-up; an explicit
`import gfa_peft` still registers GFA."""


def register_gfa() -> None:
    """Add GFA to PEFT's method tables (importing `gfa_peft.tuner` does it)."""
    import importlib

    importlib.import_module("gfa_peft.tuner")


def register_when_peft_is_imported() -> None:
    if "peft" in sys.modules:
        register_gfa()
    elif not any(isinstance(finder, _RegisterAfterPeft) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft())


class _RegisterAfterPeft:
    """A meta path finder that finds nothing itself. Asked for `peft`, it returns the spec the other finders
    return, with a loader that registers GFA right after PEFT's module has executed; only then does it leave
    `sys.meta_path`. A spec that is only looked at (find_spec) and never executed leaves it in place."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        spec = self._spec_from_other_finders(fullname, path, target)
        if spec is None or spec.loader is None or isinstance(spec.loader, type):
            return None  # nothing of ours to add; the import system asks the other finders as usual
        loader = spec.loader  # each lookup gets its own loader object, so wrapping it affects this spec only
        load_peft = loader.exec_module

        def exec_module(module) -> None:
            load_peft(module)  # if PEFT's own import fails, this raises and the hook stays for the next try
            del loader.exec_module  # back to the loader class's own method
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            try:
                register_gfa()
            except Exception as error:  # a broken GFA must not break `import peft` in every process
                import warnings

                warnings.warn(f"gfa-peft could not register GFA with PEFT ({type(error).__name__}: {error}); "
                              f"set {AUTOREGISTER_VARIABLE}=0 to stop trying at start-up", stacklevel=2)

        loader.exec_module = exec_module
        return spec

    def _spec_from_other_finders(self, fullname, path, target):
        for finder in list(sys.meta_path):
            if isinstance(finder, _RegisterAfterPeft) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None
