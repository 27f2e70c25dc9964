"""How every `gfa` command writes, so that no user file is ever lost.

The rule, for a file (`write_atomic`) and for a result folder (`output_folder`):

- a command writes only inside the folder it was given; it builds its result in a temporary sibling
  (`.NAME.*.partial`) and publishes it with an atomic rename, after `fsync`ing every file and folder of it;
- it refuses a non-empty folder that is not its own kind of result (`is_own_result`: the record the command
  writes first, recognised by its content, and nothing the command does not write), a folder that holds or lies
  inside one of its inputs, and one that holds the working directory;
- a finished result is replaced only with `overwrite`, and only once the new one is complete; a publish killed
  between its two renames is undone by the next run (the old result is put back);
- one process at a time writes a folder: it holds an exclusive lock (`folder_lock`) on `.NAME.lock` beside it,
  which the operating system releases when the process ends, however it ends;
- what a killed run left (`.NAME.*.partial`, `.NAME.*.old`) is removed by the next run on the same folder.

Every refusal is an `OutputRefused` (a ValueError) whose message is one line naming the folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPORT_MARK = "gfa_report"
"""The key that marks a file as a report or figure a `gfa` command wrote (the top-level key of a JSON report, a
PNG's text chunk; its value: the version that wrote it): a file holding it is ours to replace."""
PARTIAL_SUFFIX = ".partial"
RETIRED_SUFFIX = ".old"
# Errors that say the destination cannot take the files (rather than a bug or a missing input).
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.ENOTDIR}
# How Rust's I/O errors read inside the exceptions of Rust-backed writers (safetensors' SafetensorError).
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


class OutputRefused(ValueError):
    """A destination a command must not or cannot write; the message is one line naming it."""


class FolderBusy(OutputRefused):
    """Another process holds the lock of the folder."""


@dataclass(frozen=True)
class ResultKind:
    """What a command writes, so the rule can tell its own results from a user's files."""

    name: str
    """What the result is called in messages: "run", "merged model"."""
    is_own: Callable[[Path], bool]
    """Whether a non-empty folder is this command's result, finished or not: it must carry a record the command
    writes first (recognised by its content: a file name alone is no proof) and nothing the command does not
    write. `is_own_result` applies it."""
    is_finished: Callable[[Path], bool]
    """Whether a folder holds a complete result, which only `overwrite` replaces."""
    manifest: str | None = None
    """For results whose files have no fixed names (a merged model's copied files): the file `output_folder`
    adds listing everything in the result, so that a folder holding anything else is not the command's."""


# ---------------------------------------------------------------- single files

def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON through a temporary file in the same folder, then rename it over `path`."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` through a temporary file in the same folder, then rename it over `path`."""
    write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(temporary)` into a temporary file beside `path`, then rename it over `path`: a reader sees the old
    file or the whole new one, never a part, even after a crash (file and folder are fsynced)."""
    with _unwritable_is_refused(path.parent):
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        try:
            write(Path(temporary))
            os.chmod(temporary, file_mode(0o666))
            _fsync(Path(temporary))
            os.replace(temporary, path)
            _fsync(path.parent)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None where it is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def file_mode(full: int) -> int:
    """`full` less the process umask: temporary files start private, finished ones get the usual mode."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


# ---------------------------------------------------------------- result folders

@contextlib.contextmanager
def output_folder(folder: str | os.PathLike, kind: ResultKind, overwrite: bool = False,
                  inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary sibling of `folder` to build the result in; publish it as `folder` when the
    block ends normally, remove it when the block raises. Raises OutputRefused (see the module docstring)
    before anything is written when `folder` may not be written."""
    folder = Path(os.path.abspath(folder))
    inputs = list(inputs)
    check_output_folder(folder, kind, overwrite, inputs)
    make_folder(folder.parent)
    with folder_lock(folder):
        remove_leftovers(folder)  # first: it may put back the result a killed publish had moved aside
        check_output_folder(folder, kind, overwrite, inputs)  # another process may have published meanwhile
        with _unwritable_is_refused(folder):
            building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=PARTIAL_SUFFIX, dir=folder.parent))
            try:
                building.chmod(file_mode(0o777))
                yield building
                if kind.manifest is not None:
                    write_json_atomic(building / kind.manifest, {"kind": kind.name, "files": _files_in(building)})
                _publish(building, folder)
            except BaseException:
                shutil.rmtree(building, ignore_errors=True)
                raise


def make_folder(folder: Path) -> None:
    """Create `folder` and its parents if missing; one that cannot be created raises OutputRefused naming it."""
    with _unwritable_is_refused(folder):
        folder.mkdir(parents=True, exist_ok=True)


def check_output_folder(folder: str | os.PathLike, kind: ResultKind, overwrite: bool = False,
                        inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raise OutputRefused unless `output_folder` may write `folder` (without writing anything)."""
    folder = Path(os.path.abspath(folder))
    if folder.exists() and not folder.is_dir():
        raise OutputRefused(f"{folder} is a file, not a folder")
    real = folder.resolve()
    for protected, role in [*((Path(path), "an input of this command") for path in inputs),
                            (Path.cwd(), "the working directory")]:
        protected = protected.resolve()
        if protected == real or real in protected.parents:
            raise OutputRefused(f"{folder} holds {protected}, {role}: it cannot be replaced; choose another folder")
    for path in inputs:
        if Path(path).resolve() in real.parents:
            raise OutputRefused(f"{folder} lies inside {Path(path).resolve()}, an input of this command: a result "
                                "is never written into its inputs; choose another folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not is_own_result(folder, kind):
        raise OutputRefused(f"{folder} is not empty and is not a {kind.name} folder; its files are left alone: "
                            "choose a new or empty folder")
    if kind.is_finished(folder) and not overwrite:
        raise OutputRefused(f"{folder} already holds a finished {kind.name}; pass --overwrite to replace it "
                            "(the old one is kept until the new one is complete)")


def is_own_result(folder: Path, kind: ResultKind) -> bool:
    """Whether the non-empty `folder` is `kind`'s result, finished or not (the one rule every command's
    output check applies): `kind.is_own`, and with a manifest, one listing everything the folder holds."""
    if kind.manifest is None:
        return kind.is_own(folder)
    record = read_json_object(folder / kind.manifest)
    return (record is not None and record.get("kind") == kind.name and isinstance(record.get("files"), list)
            and set(_files_in(folder)) <= {*record["files"], kind.manifest} and kind.is_own(folder))


def _files_in(folder: Path) -> list[str]:
    """Every file and folder under `folder`, as sorted paths relative to it."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def leftovers(folder: Path) -> list[Path]:
    """The temporary siblings a killed run on `folder` left behind."""
    pattern = glob.escape(str(folder.parent / f".{folder.name}.")) + "*"
    return sorted(Path(path) for path in glob.glob(pattern)
                  if path.endswith((PARTIAL_SUFFIX, RETIRED_SUFFIX)) and os.path.isdir(path))


def remove_leftovers(folder: Path) -> None:
    """Remove the leftovers of killed runs on `folder`; call it holding `folder_lock(folder)`. A publish killed
    between its two renames left no `folder` and the old result moved aside: that old result is put back first."""
    retired = [leftover / folder.name for leftover in leftovers(folder) if leftover.name.endswith(RETIRED_SUFFIX)]
    moved_aside = [path for path in retired if path.is_dir()]
    if moved_aside and not os.path.lexists(folder):
        with _unwritable_is_refused(folder.parent):
            os.rename(moved_aside[0], folder)
            _fsync(folder.parent)
    for leftover in leftovers(folder):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (the file `.NAME.lock` beside it) or raise FolderBusy at once; with
    `wait`, wait for it instead (for holders that keep it briefly).

    The lock is the operating system's (flock), so a killed process never leaves a stale lock; the lock file
    is removed on release, and a lock taken on a file that was removed meanwhile is retaken on the new one.
    """
    folder = Path(os.path.abspath(folder))
    path = folder.parent / f".{folder.name}.lock"
    while True:
        with _unwritable_is_refused(folder.parent):
            handle = os.open(path, os.O_RDWR | os.O_CREAT, file_mode(0o666))
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(handle)
            raise FolderBusy(f"{folder} is being written by another gfa process (it holds {path})") from None
        try:
            if os.path.samestat(os.fstat(handle), os.stat(path)):
                break
        except FileNotFoundError:  # its holder removed the file as we opened it
            pass
        os.close(handle)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so nobody locks a file that is going away
        os.close(handle)


def folder_is_busy(folder: str | os.PathLike) -> bool:
    """Whether another process holds `folder`'s lock now (none can where the lock's folder does not exist)."""
    if not Path(os.path.abspath(folder)).parent.is_dir():
        return False
    try:
        with folder_lock(folder):
            return False
    except FolderBusy:
        return True


def _publish(building: Path, folder: Path) -> None:
    """Rename the complete `building` to `folder`; an old `folder` is moved aside first and removed after (a
    process killed between the two renames leaves it aside, where `remove_leftovers` finds it)."""
    fsync_tree(building)
    if not folder.exists():
        os.rename(building, folder)
        _fsync(folder.parent)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=RETIRED_SUFFIX, dir=folder.parent))
    os.rename(folder, retired / folder.name)
    os.rename(building, folder)
    _fsync(folder.parent)
    shutil.rmtree(retired)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, so a rename cannot publish unwritten data; give each
    the mode the umask asks for (writers that go through a temporary file, like safetensors, leave it private)."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            executable = path.stat().st_mode & 0o111
            path.chmod(file_mode(0o777 if executable else 0o666))
            _fsync(path)
        _fsync(Path(root))


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextlib.contextmanager
def _unwritable_is_refused(where: Path) -> Iterator[None]:
    """Turn 'permission denied', 'disk full' and the like into one line naming the folder."""
    try:
        yield
    except Exception as error:
        code = _os_error_code(error)
        if code not in _UNWRITABLE:
            raise
        filename = getattr(error, "filename", None)
        detail = f" ({filename})" if filename else ""
        raise OutputRefused(f"cannot write in {where}: {os.strerror(code)}{detail}") from error


def _os_error_code(error: Exception) -> int | None:
    """The operating system's error number behind `error`: an OSError's, or the one a Rust-backed writer quotes
    in its message ("I/O error: No space left on device (os error 28)"); None for any other error."""
    if isinstance(error, OSError):
        return error.errno
    found = _RUST_OS_ERROR.search(str(error))
    return None if found is None else int(found.group(1) or found.group(2))
