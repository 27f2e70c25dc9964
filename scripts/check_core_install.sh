#!/usr/bin/env bash
# Build the wheel, install it the way `pip install gfa-peft` does (core dependencies, no extras) into a fresh
# virtual environment, and run the commands that need no extra: they must work there, and a command that needs
# the experiments extra must say so in one line (exit 2). Run by .ci/run after the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip wheel --quiet --no-deps --no-build-isolation -w "$work/dist" .
python -m venv "$work/venv"
venv_python="$work/venv/bin/python"
# The CPU build of torch 2.13.0 (an unpinned torch would pull a multi-GB CUDA build), then the wheel alone.
"$venv_python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0" "$work"/dist/gfa_peft-*.whl
gfa="$work/venv/bin/gfa"
cd "$work"  # not the checkout: nothing may come from src/
"$venv_python" - <<'PY'
import importlib.util
from gfa_peft.cli import experiments_extra
core = {"accelerate"}  # PEFT itself needs it
present = sorted(name for name in experiments_extra() - core if importlib.util.find_spec(name) is not None)
assert not present, f"the core install pulled in packages of the experiments extra: {present}"
import gfa_peft, peft
from gfa_peft.training.recipes import SHIPPED_LEARNING_RATES
from gfa_peft.bench.report import TARGETS_FILE
from gfa_peft.data.presets import preset_names
assert SHIPPED_LEARNING_RATES.is_file() and TARGETS_FILE.is_file(), "data files are missing from the wheel"
assert "minilm" in preset_names(), "presets are missing from the wheel"
assert peft.PeftType.GFA.value == "GFA"
print("core install: import, registration and shipped data OK")
PY
"$gfa" --help >/dev/null
"$gfa" count --model smollm2 >/dev/null
"$gfa" count --model minilm --json - >/dev/null
for command in count inspect merge lens bench; do "$gfa" "$command" --help >/dev/null; done
status=0
message=$("$gfa" train --task rt --method gfa --anchor 1 2>&1) || status=$?
if [ "$status" -ne 2 ] || ! grep -q "needs the experiments extra" <<<"$message"; then
    echo "gfa train without the extra: expected one line and exit 2, got exit $status: $message" >&2
    exit 1
fi
echo "core install: gfa --help, count, inspect/merge/lens/bench --help OK; train says it needs the extra"
# The start-up hook (gfa-peft-autoregister.pth): a process that imports only PEFT knows GFA, and
# GFA_PEFT_AUTOREGISTER=0 turns the hook off.
known=$("$venv_python" -c "import peft; print('GFA' in peft.PeftType.__members__)" 2>/dev/null)
off=$(GFA_PEFT_AUTOREGISTER=0 "$venv_python" -c "import peft; print('GFA' in peft.PeftType.__members__)" 2>/dev/null)
if [ "$known" != "True" ] || [ "$off" != "False" ]; then
    echo "start-up hook: expected PEFT alone to know GFA (got $known) and GFA_PEFT_AUTOREGISTER=0 to stop it (got $off)" >&2
    exit 1
fi
# `pip install -e .` carries the hook too: the same venv, the checkout installed editable over the wheel.
(cd "$checkout" && "$venv_python" -m pip install --quiet --disable-pip-version-check --no-deps -e .)
"$venv_python" - "$checkout/src" <<'PY'
import sys
assert sys.modules["gfa_peft"].__file__.startswith(sys.argv[1]), "the editable install's hook did not import gfa_peft"
import peft
assert "GFA" in peft.PeftType.__members__, "the editable install's hook did not register GFA"
PY
echo "core install: PEFT alone knows GFA, GFA_PEFT_AUTOREGISTER=0 turns that off; the editable install has the hook"
