"""One way to write a small file so that a reader never sees half of it: a per-process temp file, then a rename.

Light on purpose (no torch): config rendering and the run folder's records use it before anything heavy loads.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    # Per-process temp name: every rank of a distributed run may write the same file into the same folder.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
