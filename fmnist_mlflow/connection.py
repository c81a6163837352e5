"""Where the tracking store is, and whether it can be used: checked before any work, in seconds, naming
the URI with its password hidden.

The tracking URI comes from `MLFLOW_TRACKING_URI`, else MLflow's default (`sqlite:///mlflow.db` in the
working directory). A server must answer /health and a real API call (a server that refuses this host
name, or needs credentials, fails here with the reason); a database must accept a connection.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import mlflow

from .errors import FmnistError
from .urls import redact  # noqa: F401  (re-exported: tracking.redact, connection.redact)


REACH_TIMEOUT_S = 15.0  # give up on an unreachable tracking server after this long
REFUSED_TIMEOUT_S = 3.0  # ... and after this long when its port refuses connections (no server there)


class TrackingError(FmnistError, RuntimeError):
    """The tracking server could not be used; the message names the URI."""


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()




def check_reachable(uri: Optional[str] = None, timeout: float = REACH_TIMEOUT_S) -> str:
    """Fail within `timeout` seconds, naming the URI (password hidden), if the tracking store cannot be used.

    For a server: its /health must answer, and then a real API call must succeed, so that a server that
    refuses this host name (MLflow's "Invalid Host header": see --allowed-hosts) or needs credentials
    fails here in seconds with the reason, not later with a traceback.
    """
    uri = uri or tracking_uri()
    shown = redact(uri)
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        import requests

        started = time.monotonic()
        deadline = started + timeout
        error = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                response = requests.get(uri.rstrip("/") + "/health", timeout=min(5.0, left))
                if response.ok:
                    _check_api(uri, shown, min(5.0, max(1.0, deadline - time.monotonic())))
                    return uri
                error = f"HTTP {response.status_code}"
            except requests.ConnectionError as exc:
                error = type(exc).__name__
                # Nothing listens on that port: a server that is starting binds it within seconds, so a
                # refused connection is not worth the whole wait.
                if "refused" in str(exc).lower() and time.monotonic() - started > REFUSED_TIMEOUT_S:
                    error = "connection refused: no server on that port"
                    break
            except requests.RequestException as exc:
                error = type(exc).__name__
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        raise TrackingError(
            f"MLflow tracking server {shown} did not answer within {time.monotonic() - started:.0f} s ({error}). "
            "Start it (mlflow server --host 127.0.0.1 --port PORT) or set MLFLOW_TRACKING_URI."
        )
    if scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        _check_database(uri, shown)
        open_store(uri)
        return uri
    if scheme == "sqlite":
        path = uri[len("sqlite:///") :]
        folder = Path(path).parent if path else Path(".")
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking store {uri}: folder {folder} does not exist or is not writable")
        open_store(uri, lock=Path(path).resolve() if path else None)
    elif scheme not in ("", "file") and len(scheme) > 1:  # (a one-letter scheme is a Windows drive)
        _check_other_store(uri, shown, scheme)
    return uri


def _check_other_store(uri: str, shown: str, scheme: str) -> None:
    """A scheme this module does not know (databricks, a plugin's, a typo): MLflow must have a tracking
    store for it; otherwise say so in one line, not with MLflow's words about the model registry."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # MLflow raises several kinds for an unknown or unusable scheme
        reason = redact(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        if "unsupported uri" in reason.lower() or "unexpected uri scheme" in reason.lower() or \
                "registry functionality is unavailable" in reason.lower():
            reason = f"MLflow has no tracking store for the scheme {scheme!r}"
        raise TrackingError(f"tracking store {shown}: {reason}; use sqlite:///FILE, http://HOST:PORT, "
                            "postgresql://USER@HOST/DB or a folder") from None


# What a database says when two processes create (or migrate) a new MLflow store's tables at the same moment:
# sqlite ("table ... already exists", a UNIQUE constraint), PostgreSQL ("duplicate key value"), alembic
# ("Online migration expected to match one row ... 0 found").
SCHEMA_RACES = ("already exists", "UNIQUE constraint", "duplicate key value", "expected to match one row",
                "database is locked")


def open_store(uri: str, lock: Optional[Path] = None, attempts: int = 6) -> None:
    """Create the store's schema (MLflow does it on first use) once, before any work: under a file lock for
    a sqlite file, so that workers started together on a fresh store wait for the first instead of racing
    its migrations; with a few retries for a database server, where the loser of the race finds the
    tables made."""
    from mlflow.tracking import MlflowClient

    guard = _file_lock(lock) if lock is not None else contextlib.nullcontext()
    with guard:
        for attempt in range(attempts):
            try:
                client = MlflowClient(uri)
                client.search_experiments(max_results=1)  # the tracking tables
                client.search_registered_models(max_results=1)  # the registry's, in the same database
                return
            except Exception as exc:  # MLflow wraps SQLAlchemy and alembic errors in several types
                if attempt == attempts - 1 or not any(race in str(exc) for race in SCHEMA_RACES):
                    raise
                time.sleep(0.5 * (attempt + 1))


@contextlib.contextmanager
def _file_lock(db_path: Path):
    """An exclusive lock for one sqlite file, held in the system's temp folder (not beside the user's file)."""
    import fcntl
    import hashlib
    import tempfile

    name = hashlib.sha256(str(db_path).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"fmnist-mlflow-store-{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_api(uri: str, shown: str, timeout: float) -> None:
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                                params={"max_results": 1}, timeout=timeout)
    except requests.RequestException as exc:
        raise TrackingError(f"MLflow tracking server {shown}: its API did not answer ({type(exc).__name__})") from None
    if response.ok:
        return
    reason = " ".join(response.text.split())[:200]
    hint = ""
    if response.status_code == 403 and "host" in reason.lower():
        hint = (" The server refuses this host name: start it with --allowed-hosts listing the name clients use "
                "(e.g. --allowed-hosts 'tracking.example.org,tracking.example.org:5000').")
    elif response.status_code in (401, 403):
        hint = " The server needs credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."
    raise TrackingError(f"MLflow tracking server {shown} answered /health but refused an API call: "
                        f"HTTP {response.status_code} {reason}.{hint}")


def _check_database(uri: str, shown: str) -> None:
    """A database tracking URI: connect once with a short timeout."""
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # driver and SQLAlchemy errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"tracking store {shown} cannot be reached: {redact(first)}") from None


def describe_failure(exc: BaseException, store: Optional[str] = None) -> str:
    """One line for an error raised while talking to a store (default: the tracking store)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 300:
        text = text[:300] + "..."
    store = store or f"tracking store {redact(tracking_uri())}"
    if "disk is full" in text or "No space left" in text:
        return f"{store} failed: its disk is full. {FULL_DISK_ADVICE}"
    return f"{store} failed: {redact(text)}"


FULL_DISK_ADVICE = ("What was logged before stays (params, the epochs' metrics); a run that could not be closed is "
                    "ended FAILED by the next fmnist command on this experiment, once there is room.")


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system error (a full disk, a folder that cannot be written)."""
    import errno

    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device{where} while writing runs or artifacts. {FULL_DISK_ADVICE}"
    return f"{exc.strerror or type(exc).__name__}{where}"


def use_uri(uri: str) -> None:
    mlflow.set_tracking_uri(uri)
