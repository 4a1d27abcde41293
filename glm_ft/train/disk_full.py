"""A full disk named in one line: where the save failed, and what is left to resume from.

Light (no torch): the training's saves and the job's other writes (glm_ft.train.trainer, glm_ft.train.finetune) use it.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

from glm_ft.errors import CheckpointError
from glm_ft.runs import last_complete_checkpoint


@contextlib.contextmanager
def disk_full_named(folder: Path, run_dir: Path):
    """A full disk while writing `folder` becomes one line naming it. torch's zip writer reports ENOSPC as
    "inline_container.cc:...: unexpected pos" (no errno), so a RuntimeError counts as a full disk when the folder's
    filesystem has (almost) nothing left. The half-written folder has no completion marker: resume skips it."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not _is_disk_full(err, folder):
            raise
        raise CheckpointError(f"No space left on device while saving {folder}; {resume_point(run_dir)}") from err


def resume_point(run_dir: Path) -> str:
    """The end of a full disk's one line: what is left to resume from."""
    last = last_complete_checkpoint(run_dir)
    return (f"the last complete checkpoint, {last}, stays the resume point: free space, then continue with "
            f"resume=auto hydra.run.dir={run_dir}") if last else "there is no complete checkpoint yet"


DISK_FULL_BELOW_BYTES = 16 << 20


def _is_disk_full(err: BaseException, folder: Path) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    probe = folder if folder.exists() else folder.parent
    try:
        return shutil.disk_usage(probe).free < DISK_FULL_BELOW_BYTES
    except OSError:
        return False
