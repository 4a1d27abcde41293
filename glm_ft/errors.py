"""Exceptions that carry a message meant for the user: the CLI prints them without a traceback."""


class GlmFtError(Exception):
    """Base class: a problem the user can fix (bad config, bad data, missing files)."""


class ConfigError(GlmFtError):
    """A composed config that is invalid; the message names the key."""


class DataError(GlmFtError):
    """A data file that can't be used; the message names file:line."""


class CheckpointError(GlmFtError):
    """A model, adapter or checkpoint folder that can't be loaded; the message names the path."""
