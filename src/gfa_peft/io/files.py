"""Writing files so that a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON through a temporary file in the same folder, then rename it over `path`."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` through a temporary file in the same folder, then rename it over `path`."""
    write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(temporary)` into a temporary file beside `path`, then rename it over `path`: a reader sees the old
    file or the whole new one, never a part."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, file_mode(0o666))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def file_mode(full: int) -> int:
    """`full` less the process umask: temporary files start private, finished ones get the usual mode."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask
