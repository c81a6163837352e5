"""Where the tracking store is, and whether it can be used: checked before any work, in seconds, naming
the URI with its password hidden.

The tracking URI comes from `MLFLOW_TRACKING_URI`, else MLflow's default (`sqlite:///mlflow.db` in the
working directory). A server must answer /health and a real API call, both through MLflow's own REST
client with the credentials MLflow would send ($MLFLOW_TRACKING_USERNAME and _PASSWORD, a token,
~/.mlflow/credentials), so that a server that refuses this host name, or these credentials, fails here with
the reason; a database must accept a connection. A new store's schema is created once, before any work.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import mlflow
import sqlalchemy

from ..errors import FULL_DISK_ADVICE, FmnistError
from ..retry import on_race
from ..urls import redact, scrub

REACH_TIMEOUT_S = 15.0  # give up on an unreachable tracking server after this long
REFUSED_TIMEOUT_S = 3.0  # ... and after this long when its port refuses connections (no server there)
PROBE_TIMEOUT_S = 5.0  # one request of the check


class TrackingError(FmnistError, RuntimeError):
    """The tracking server could not be used; the message names the URI."""


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def use_uri(uri: str) -> None:
    mlflow.set_tracking_uri(uri)


def check_reachable(uri: Optional[str] = None, timeout: float = REACH_TIMEOUT_S) -> str:
    """Fail within `timeout` seconds, naming the URI (password hidden), if the tracking store cannot be used;
    create a new store's tables once (see `open_store`)."""
    uri = uri or tracking_uri()
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        _check_database(uri)
        open_store(uri)
    elif scheme == "sqlite":
        path = sqlalchemy.engine.make_url(uri).database or ""  # (without a query such as ?timeout=30)
        in_memory = path in ("", ":memory:") or path.startswith("file:")
        folder = Path(path).parent if not in_memory else Path(".")
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking store {uri}: folder {folder} does not exist or is not writable")
        open_store(uri, sqlite_file=None if in_memory else Path(path))
    elif scheme not in ("", "file") and len(scheme) > 1:  # (a one-letter scheme is a Windows drive)
        _check_other_store(uri, scheme)
    return uri


def _request(uri: str, endpoint: str, timeout: float, **params):
    """One GET through MLflow's REST client, with the credentials MLflow sends to this host; no retries."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(get_default_host_creds(uri), endpoint, "GET", max_retries=0, backoff_factor=0,
                        timeout=timeout, raise_on_status=False, params=params or None)


def _check_server(uri: str, timeout: float) -> None:
    """/health must answer within `timeout` (3 s when the port refuses connections: no server there), then
    a real API call must succeed."""
    shown = redact(uri)
    started = time.monotonic()
    error = "no answer"
    while (left := started + timeout - time.monotonic()) > 0:
        try:
            response = _request(uri, "/health", min(PROBE_TIMEOUT_S, left))
            if response.ok:
                return _check_api(uri, max(1.0, min(PROBE_TIMEOUT_S, started + timeout - time.monotonic())))
            error = f"HTTP {response.status_code}"
        except mlflow.exceptions.MlflowException as exc:  # MLflow's client wraps connection errors in it
            text = str(exc).lower()
            error = "no answer" if "timeout" in text or "timed out" in text else "no connection"
            # Nothing listens on that port: a server that is starting binds it within seconds, so a refused
            # connection is not worth the whole wait.
            if "refused" in text and time.monotonic() - started > REFUSED_TIMEOUT_S:
                error = "connection refused: no server on that port"
                break
        time.sleep(min(1.0, max(0.0, started + timeout - time.monotonic())))
    raise TrackingError(f"MLflow tracking server {shown} did not answer within {time.monotonic() - started:.0f} s "
                        f"({error}). Start it (mlflow server --host 127.0.0.1 --port PORT) or set MLFLOW_TRACKING_URI.")


def _check_api(uri: str, timeout: float) -> None:
    shown = redact(uri)
    try:
        response = _request(uri, "/api/2.0/mlflow/experiments/search", timeout, max_results=1)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"MLflow tracking server {shown}: its API did not answer "
                            f"({scrub(str(exc).splitlines()[0], uri)})") from None
    if response.ok:
        return
    reason = " ".join(response.text.split())[:200]
    hint = ""
    if response.status_code == 403 and "host" in reason.lower():
        hint = (" The server refuses this host name: start it with --allowed-hosts listing the name clients use "
                "(e.g. --allowed-hosts 'tracking.example.org,tracking.example.org:5000').")
    elif response.status_code == 401:
        given = bool(os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("MLFLOW_TRACKING_TOKEN"))
        hint = (" The server refused the credentials given (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD): "
                "check them." if given else
                " The server needs credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.")
    elif response.status_code == 403:
        hint = " This user may not read experiments on the server: ask its admin for permissions."
    raise TrackingError(f"MLflow tracking server {shown} answered /health but refused an API call: "
                        f"HTTP {response.status_code} {reason}.{hint}")


def _check_other_store(uri: str, scheme: str) -> None:
    """A scheme this module does not know (databricks, a plugin's, a typo): MLflow must have a tracking
    store for it; otherwise say so in one line, not with MLflow's words about the model registry."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # MLflow raises several kinds for an unknown or unusable scheme
        reason = scrub(str(exc).strip().splitlines()[0], uri) if str(exc).strip() else type(exc).__name__
        if any(s in reason.lower() for s in ("unsupported uri", "unexpected uri scheme",
                                             "registry functionality is unavailable")):
            reason = f"MLflow has no tracking store for the scheme {scheme!r}"
        raise TrackingError(f"tracking store {redact(uri)}: {reason}; use sqlite:///FILE, http://HOST:PORT, "
                            "postgresql://USER@HOST/DB or a folder") from None


def open_store(uri: str, sqlite_file: Optional[Path] = None) -> None:
    """Create the store's schema (MLflow does it on first use) once, before any work. For a sqlite file (its
    path as the URI gives it), under a file lock, so that our workers started together on a fresh store wait
    for the first instead of racing its migrations, and normally without migrating beside a client we did
    not start (`fresh_sqlite`: a new file is made aside and linked into place; one another client is making
    is waited for). Retried on a schema race (a database server), where the loser finds the tables made."""
    import contextlib

    from mlflow.tracking import MlflowClient

    from . import fresh_sqlite

    def create(store: str) -> None:
        client = MlflowClient(store)
        client.search_experiments(max_results=1)  # the tracking tables
        client.search_registered_models(max_results=1)  # the registry's, in the same database

    def beside(private: Path) -> str:  # the URI of a private file beside the store, with the URI's query
        return sqlalchemy.engine.make_url(uri).set(database=str(private)).render_as_string(hide_password=False)

    with _file_lock(sqlite_file.resolve()) if sqlite_file is not None else contextlib.nullcontext():
        if sqlite_file is not None:
            if not sqlite_file.exists() and fresh_sqlite.make_aside(sqlite_file, beside, create):
                return
            if sqlite_file.exists():  # (absent still: no hard links here, or an old journal: made in place)
                try:
                    fresh_sqlite.wait_until_made(sqlite_file)
                except TimeoutError as exc:
                    raise TrackingError(f"tracking store {uri}: {exc}; run the command again when it has finished") from None
        on_race(lambda: create(uri))


def _file_lock(db_path: Path):
    """An exclusive lock for one sqlite file, held in the system's temp folder (not beside the user's file)."""
    import hashlib
    import tempfile

    from filelock import FileLock

    name = hashlib.sha256(str(db_path).encode()).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"fmnist-mlflow-store-{name}.lock")


def _check_database(uri: str) -> None:
    """A database tracking URI: connect once with a short timeout."""
    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5})
        with engine.connect():
            pass
        engine.dispose()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"tracking store {redact(uri)} cannot be reached: {scrub(first, uri)}") from None


def describe_failure(exc: BaseException, store: Optional[str] = None) -> str:
    """One line for an error raised while talking to a store (default: the tracking store)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 300:
        text = text[:300] + "..."
    store = store or f"tracking store {redact(tracking_uri())}"
    if "disk is full" in text or "No space left" in text:
        return f"{store} failed: its disk is full. {FULL_DISK_ADVICE}"
    return f"{store} failed: {scrub(text, tracking_uri())}"
