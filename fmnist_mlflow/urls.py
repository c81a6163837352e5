"""Store and storage URLs as the CLI takes, checks and shows them, without importing MLflow, Optuna or torch:
the default Optuna storage, a password hidden (`redact`, `scrub`), and an Optuna storage URL's form and
database driver checked at the boundary (`storage_problem`), before any data is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

DEFAULT_STORAGE = "sqlite:///optuna.db"  # the Optuna storage of sweeps and searches: the working directory's
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")  # the databases Optuna's RDBStorage supports
STORAGE_FORMS = "sqlite:///FILE, postgresql://USER@HOST:PORT/DB, mysql://USER@HOST/DB or journal:FILE"
HIDDEN = "***"


def redact(url: str) -> str:
    """`url` with its password replaced by ***: SQLAlchemy's rendering for database URLs, urllib's parse for
    http(s); where neither can parse it (a port that is not a number), the password as written is hidden."""
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=f"{parts.username}:{HIDDEN}@{host}").geturl()
    if "://" not in url:
        return url
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):  # e.g. a port that is not a number
        return scrub(url, url)


def password(url: str) -> Optional[str]:
    """The password a URL carries, as written, or None."""
    if "://" not in url:
        return None
    netloc = url.split("://", 1)[1].rpartition("@")
    if not netloc[1]:
        return None
    user = netloc[0]
    return user.split(":", 1)[1] if ":" in user else None


def scrub(text: str, *urls: str) -> str:
    """`text` (an error message) with the passwords of `urls` replaced by ***, as written and as decoded."""
    for url in urls:
        secret = password(url)
        for form in filter(None, {secret, unquote(secret) if secret else None}):
            text = text.replace(form, HIDDEN)
    return text


def storage_problem(url: str) -> Optional[str]:
    """Why `url` cannot be an Optuna storage here (its form, a missing folder, no database driver), or None.
    Reaching the database is left to the command (it may be a server that is not up yet)."""
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        if not url[len("journal:"):].strip() or path.is_dir():
            return f"{url!r} names no file: give journal:FILE (a log file Optuna appends to)"
        return None if path.parent.is_dir() else f"journal folder {path.parent} does not exist"
    scheme = url.split(":", 1)[0]
    if "://" not in url or scheme.split("+")[0] not in STORAGE_SCHEMES:
        return f"{redact(url)!r} is not a storage URL; use {STORAGE_FORMS}"
    if scheme.startswith("sqlite") and url.split("://", 1)[1] in ("", "/"):
        return f"{url!r} names no database file: give sqlite:///FILE (sqlite:////ABSOLUTE/PATH)"
    import sqlalchemy

    try:
        dialect = sqlalchemy.engine.make_url(url).get_dialect()
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError) as exc:
        return f"{redact(url)!r}: {scrub(str(exc).splitlines()[0], url)}"
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        extra = " (pip install 'fmnist-mlflow[postgres]')" if scheme.startswith("postgresql") else ""
        return f"{redact(url)}: the database driver {exc.name or scheme!r} is not installed{extra}"
    return None


def file_backed(url: str) -> bool:
    """Whether a store URL names files on this host (sqlite, a journal, a folder), not a server or database
    that other hosts reach (or a hosted service MLflow names by a word, `databricks`)."""
    if "://" not in url and not url.startswith("journal:"):
        return not url.startswith("databricks")  # a bare path: MLflow's file store
    scheme = url.split(":", 1)[0].lower()
    return scheme.startswith("sqlite") or scheme in ("journal", "file")


def absolute_file_url(url: str) -> str:
    """`sqlite:///REL`, `journal:REL` or a bare path with the path made absolute; other URLs as they are."""
    import os

    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = url[len("sqlite:///"):]
        return url if path.startswith(":memory:") or not path else f"sqlite:///{os.path.abspath(path)}"
    if url.startswith("journal:"):
        return f"journal:{os.path.abspath(url[len('journal:'):])}"
    if "://" not in url and file_backed(url):
        return os.path.abspath(url)
    return url


def loopback(url: str) -> bool:
    """Whether a server or database URL names this host by its loopback address (unreachable from others)."""
    if "://" not in url:
        return False
    host = (urlsplit(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")
