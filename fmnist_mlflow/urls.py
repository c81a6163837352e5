"""Store and storage URLs as the CLI shows and checks them, without importing MLflow, Optuna or torch: a
password hidden (`redact`), and an Optuna storage URL's form and database driver checked at the boundary
(`storage_problem`), before any data is loaded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")  # the databases Optuna's RDBStorage supports
STORAGE_FORMS = "sqlite:///FILE, postgresql://USER@HOST:PORT/DB, mysql://USER@HOST/DB or journal:FILE"


def redact(url: str) -> str:
    """A URL with its password replaced by ***, whatever its scheme, parseable or not."""
    return re.sub(r"(://[^/:@\s]*):[^@/\s]*@", r"\1:***@", url)


def storage_problem(url: str) -> Optional[str]:
    """Why `url` cannot be an Optuna storage here (its form, a missing folder, no database driver), or None.
    Reaching the database is left to the command (it may be a server that is not up yet)."""
    if url.startswith("journal:"):
        folder = Path(url[len("journal:"):]).parent
        return None if folder.is_dir() else f"journal folder {folder} does not exist"
    scheme = url.split(":", 1)[0]
    if "://" not in url or scheme.split("+")[0] not in STORAGE_SCHEMES:
        return f"{redact(url)!r} is not a storage URL; use {STORAGE_FORMS}"
    import sqlalchemy

    try:
        dialect = sqlalchemy.engine.make_url(url).get_dialect()
    except Exception as exc:  # ArgumentError (a malformed URL), NoSuchModuleError (an unknown +driver)
        return f"{redact(url)!r}: {redact(str(exc).splitlines()[0])}"
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        extra = " (pip install 'fmnist-mlflow[postgres]')" if scheme.startswith("postgresql") else ""
        return f"{redact(url)}: the database driver {exc.name or scheme!r} is not installed{extra}"
    return None
