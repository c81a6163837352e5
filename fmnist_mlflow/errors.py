"""The one base class of every error the library raises for a person to read.

The CLI catches `FmnistError` once and prints its message as one line (exit 1); each subclass also keeps
its builtin base (ValueError for bad input, RuntimeError for failures) for callers that catch those.
"""


class FmnistError(Exception):
    """An error whose message names what went wrong and what to do; no traceback needed."""
