"""The commands' boundary: how every `fmnist` command runs (`reported`): inside MLflow's environment
defaults and quieter libraries, with SIGTERM as Ctrl-C; library errors become one readable line (exit 1),
a store or file-system error is described by its cause wherever it surfaces, and an interrupt says which
runs it ended KILLED (exit 130)."""

from __future__ import annotations

import functools
import sys
from typing import Optional

import click

from .. import process


def use_threads(threads: int) -> int:
    """Set this process's torch CPU threads (0 keeps torch's default: all cores); returns the count."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def loaded_store_errors() -> tuple:
    """The exception classes of the tracking and Optuna stores that were imported: an error cannot come from
    a library that was never imported, so a usage error answers before MLflow (seconds) is loaded."""
    where = (("mlflow.exceptions", "MlflowException"), ("requests", "RequestException"),
             ("sqlalchemy.exc", "SQLAlchemyError"))
    return tuple(getattr(sys.modules[m], name) for m, name in where if m in sys.modules)


def exception_chain(exc: BaseException, depth: int = 12) -> list:
    """`exc`, then what it was raised from or while handling, and so on."""
    chain = [exc]
    while len(chain) < depth:
        last = chain[-1]
        before = last.__cause__ or (None if last.__suppress_context__ else last.__context__)
        if before is None:
            break
        chain.append(before)
    return chain


def interrupted_line(interrupt: BaseException) -> str:
    """What an interrupt ended: the runs it ended KILLED, or that none was open (e.g. predict)."""
    runs = sys.modules.get(f"{process.__package__}.tracking.runs")
    ended = runs.ended_by(interrupt) if runs else []
    if not ended:
        return "interrupted (no run was open)"
    return f"interrupted: run{'s' if len(ended) > 1 else ''} {', '.join(ended)} ended KILLED"


def described(exc: Exception) -> Optional[str]:
    """One line for a store or file-system error, raised as it is or behind another library's error (Optuna,
    failing to record a failed trial on a full disk, ends in an AssertionError whose context is the
    store's); None for any other error."""
    chain, stores = exception_chain(exc), loaded_store_errors()
    found = next((e for e in chain if isinstance(e, stores + (OSError,))), None)
    if found is None:
        return None
    if not isinstance(found, stores):  # a file-system error
        from ..errors import describe_os_error

        return describe_os_error(found)
    from ..tracking import connection

    optuna_store = any(type(e).__name__ == "StorageInternalError" for e in chain)
    return connection.describe_failure(found, "the Optuna storage" if optuna_store else None)


def reported(fn):
    """Run a command at the boundary (see the module's docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, system_metrics: Optional[bool] = None, **kwargs):
        from ..errors import FmnistError

        process.quiet_libraries()
        try:
            with process.environment(system_metrics), process.sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except FmnistError as exc:
            raise click.ClickException(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # already what the user sees
        except KeyboardInterrupt as exc:
            click.echo(interrupted_line(exc), err=True)
            sys.exit(process.EXIT_INTERRUPTED)
        except Exception as exc:
            line = described(exc)
            if line is None:
                raise
            raise click.ClickException(line) from None

    return wrapper
