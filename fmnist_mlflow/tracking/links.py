"""Where a person sees a run: its page in the MLflow UI's Model training view.

The MLflow 3 UI opens an experiment in its GenAI view (traces, evaluations) unless the page's URL says
otherwise: its WorkflowTypeProvider reads the query parameter `workflowType` first, then the browser's
last choice (local storage "mlflow.workflowType", default "genai"); the experiment tag
mlflow.experimentKind does not decide it. Every link we print carries the Model training view.
"""

from __future__ import annotations

from urllib.parse import urlparse

from ..urls import redact
from .connection import tracking_uri
from .queries import client

UI_VIEW = "workflowType=machine_learning"


def ui_page(run_id: str) -> str:
    """The run's page in the UI's Model training view, from the UI's root (a link in a run description)."""
    experiment = client().get_run(run_id).info.experiment_id
    return f"/#/experiments/{experiment}/runs/{run_id}?{UI_VIEW}"


def run_link(run_id: str) -> str:
    """Where a person sees the run, in the UI's Model training view: the server's page, or how to start the
    UI on a local store."""
    uri = tracking_uri()
    page = ui_page(run_id)
    if urlparse(uri).scheme in ("http", "https"):
        return f"{redact(uri).rstrip('/')}{page}"
    return f"mlflow ui --backend-store-uri {redact(uri)}, then http://127.0.0.1:5000{page}"
