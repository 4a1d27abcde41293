"""torchrun whose rendezvous store listens on the loopback interface when the job is on one machine.

    python -m glm_ft.launch --nproc_per_node 2 train.py method=sft deepspeed=zero3 ...     # same arguments as torchrun

torchrun's TCPStore server (in the launcher process) listens on every interface even when --master_addr is
127.0.0.1, its default: anyone on the network could then write into the job's rendezvous. Here a store whose host is
a loopback name gets a socket bound to 127.0.0.1 (torch's `master_listen_fd`), so a single-node job opens nothing
beyond the machine. A multi-node job passes a routable --master_addr and keeps torch's behaviour unchanged.

Ctrl-C or SIGTERM to it is recorded for its ranks before torchrun tells them, one after the other (`record_stops`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import sys
import tempfile
from pathlib import Path

from glm_ft.dist import LAUNCH_STOP, is_loopback
from glm_ft.errors import to_stderr


def loopback_store_class():
    import torch.distributed as dist

    base = dist.TCPStore

    class LoopbackTCPStore(base):  # type: ignore[misc, valid-type]
        """A TCPStore that, as a server on a loopback host, listens on 127.0.0.1 only."""

        def __init__(self, host_name, port, world_size=None, is_master=False, *args, **kwargs):
            if is_master and kwargs.get("master_listen_fd") is None and is_loopback(str(host_name)):
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", int(port)))
                listener.listen(1024)
                kwargs["master_listen_fd"] = listener.fileno()
                port = listener.getsockname()[1]
                self._glm_ft_listener = listener  # kept open as long as the store lives
            super().__init__(host_name, port, world_size, is_master, *args, **kwargs)

    return base, LoopbackTCPStore


def install() -> None:
    """Replace TCPStore wherever torch.distributed's modules hold it (some import the name at load time)."""
    import torch.distributed.run  # noqa: F401  (loads the elastic modules that bind the name)

    base, patched = loopback_store_class()
    for name, module in list(sys.modules.items()):
        if (name == "torch.distributed" or name.startswith("torch.distributed.")) and \
                getattr(module, "TCPStore", None) is base:
            module.TCPStore = patched


def record_stops(record: Path) -> None:
    """Ctrl-C or SIGTERM to the launcher is written to `record` (the ranks' LAUNCH_STOP) before torchrun signals any
    rank. torchrun signals them one after the other: the first may have stopped before the next is told, and that
    one's collective with it fails ("Connection closed by peer") -- the job being stopped, which the record says
    (glm_ft.tracking.signals.stop_behind)."""
    from torch.distributed.elastic.multiprocessing import api

    forward = api._terminate_process_handler  # what torchrun's agent installs for these signals as it starts ranks

    def record_then_forward(signum: int, frame) -> None:
        if signum in (signal.SIGINT, signal.SIGTERM):
            # Created here, never followed through a link; a second signal finds the first one's record and keeps it.
            # On any failure the ranks are stopped all the same, only not told why.
            with contextlib.suppress(OSError):
                fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    out.write(signal.Signals(signum).name)
        forward(signum, frame)

    api._terminate_process_handler = record_then_forward


def main(argv: list[str] | None = None) -> int:
    """torchrun; a failed rank or a signal to the launcher ends it with one line and the exit code, not torchrun's
    own 30-line report: each rank has printed its own error above (glm-ft's one line, or its traceback)."""
    install()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # Only a stopped launcher writes it: one killed outright (SIGKILL) leaves nothing behind.
    record = Path(tempfile.gettempdir()) / f"glm_ft_launch-{os.getpid()}-{secrets.token_hex(8)}.stop"
    os.environ[LAUNCH_STOP] = str(record)  # the ranks inherit the launcher's environment
    record_stops(record)
    try:
        torchrun(argv if argv is not None else sys.argv[1:])
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {-failure.exitcode}"
        more = f", and {len(err.failures) - 1} more" if len(err.failures) > 1 else ""
        to_stderr(f"error: {err.name}: rank {rank} failed with {how}{more} (each rank's own error is above)")
        return code
    except SignalException as err:  # SIGTERM or SIGINT to the launcher: torchrun has stopped the ranks
        to_stderr(f"glm_ft.launch: stopped by {signal.Signals(err.sigval).name}")
        return 128 + int(err.sigval)
    finally:
        record.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
