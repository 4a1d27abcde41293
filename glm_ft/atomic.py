"""One way to write a file or a folder so that a reader never sees half of it: write beside it, then one rename.

Light on purpose (no torch): config rendering and the run folder's records use it before anything heavy loads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from glm_ft.errors import GlmFtError


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    # Per-process temp name: every rank of a distributed run may write the same file into the same folder.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:  # a full disk keeps no half-written file, which would only hold on to the space
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def folder_atomic(target: Path, done_by_another: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty folder beside `target` to fill; when the block succeeds it becomes `target` in one rename.

    What is at `target` then (an empty folder, or a stale build that `done_by_another` does not accept) is set aside
    and removed. Several processes may build the same folder at once (ranks, sweep jobs): the first rename wins, and
    a later one is fine when `done_by_another(target)` says the folder in place is complete. On failure nothing is
    left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old = target.with_name(f".{target.name}.old.{os.getpid()}")
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would follow the folder into place
        yield staging
        if done_by_another is not None and done_by_another(target):
            return
        try:
            if target.exists():
                os.replace(target, old)  # a rename cannot replace a folder that exists
            os.replace(staging, target)
        except OSError:
            if done_by_another is None or not done_by_another(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def check_writable(path: Path, what: str) -> None:
    """Before the work whose result goes to `path` (a file or folder to be written): its folder exists (created if
    need be) and takes files, so a bad output path fails at once rather than after minutes of generation."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise GlmFtError(f"{what}: cannot write into {parent} ({err.strerror or err})") from None
