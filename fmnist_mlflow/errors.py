"""The one base class of every error the library raises for a person to read, and the words for a full disk.

The CLI catches `FmnistError` once and prints its message as one line (exit 1); each subclass also keeps
its builtin base (ValueError for bad input, RuntimeError for failures) for callers that catch those.
"""


class FmnistError(Exception):
    """An error whose message names what went wrong and what to do; no traceback needed."""


FULL_DISK_ADVICE = ("What was logged before stays (params, the epochs' metrics); a run that could not be closed is "
                    "ended FAILED by the next fmnist command on this experiment, once there is room.")


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system error (a full disk, a folder that cannot be written)."""
    import errno

    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device{where} while writing runs or artifacts. {FULL_DISK_ADVICE}"
    return f"{exc.strerror or type(exc).__name__}{where}"
