"""The one build step pyproject.toml cannot express: the wheel and the editable install both put
gfa-peft-autoregister.pth into site-packages, so every Python process registers GFA when it imports PEFT
(see src/gfa_peft/registration.py). Everything else about the build is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

AUTOREGISTER_PTH = Path("src", "gfa-peft-autoregister.pth")


class BuildPyWithAutoregister(build_py):
    """Copies the .pth file to the top of the wheel (site-packages once installed)."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(str(AUTOREGISTER_PTH), str(Path(self.build_lib, AUTOREGISTER_PTH.name)),
                           preserve_mode=False)


class EditableWheelWithAutoregister(editable_wheel):
    """`pip install -e .`: setuptools picks how the editable wheel points at src/ (its `_select_strategy`, the
    hook setuptools' own editable modes use); the .pth file is added beside whatever it writes."""

    def _select_strategy(self, name, tag, build_lib):
        return _WithAutoregister(super()._select_strategy(name, tag, build_lib))


class _WithAutoregister:
    def __init__(self, strategy) -> None:
        self.strategy = strategy

    def __call__(self, wheel, files, mapping) -> None:
        self.strategy(wheel, files, mapping)
        wheel.write(str(AUTOREGISTER_PTH), AUTOREGISTER_PTH.name)

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exception):
        return self.strategy.__exit__(*exception)


setup(cmdclass={"build_py": BuildPyWithAutoregister, "editable_wheel": EditableWheelWithAutoregister})
