"""Exceptions that carry a message meant for the user: the CLI prints them without a traceback."""


class GlmFtError(Exception):
    """Base class: a problem the user can fix (bad config, bad data, missing files)."""


class ConfigError(GlmFtError):
    """A composed config that is invalid; the message names the key."""


class DataError(GlmFtError):
    """A data file that can't be used; the message names file:line."""


class CheckpointError(GlmFtError):
    """A model, adapter or checkpoint folder that can't be loaded; the message names the path."""


def to_stderr(line: str) -> None:
    """Write `line` to stderr in one write. `print` writes the text and its newline separately, and without
    buffering (PYTHONUNBUFFERED, as CI and many clusters set it) two ranks sharing the terminal then interleave
    into "error: Aerror: A" lines; one write below the pipe's atomic size cannot be split."""
    import sys

    sys.stderr.write(line + "\n")
    sys.stderr.flush()
