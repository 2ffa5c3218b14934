"""Optional: publish the report as a W&B Report. Needs WANDB_API_KEY, a reachable W&B server and the
wandb-workspaces package (`pip install "wandb[workspaces]"`); when any is missing, one line says which and nothing
else happens. A W&B Report lives on the server, so the figures stay in the HTML file: the W&B Report carries the
markdown summary (headline table, sources, runs), and the runs themselves arrive with `wandb sync`."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

DEFAULT_SERVER = "https://api.wandb.ai"


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def publish(markdown: str, title: str, project: str, entity: str | None = None) -> str:
    """Save a W&B Report; returns the line to print (its URL, or why it was skipped)."""
    if not os.environ.get("WANDB_API_KEY"):
        return "publish: skipped, WANDB_API_KEY is not set (the HTML and markdown reports are written)"
    server = os.environ.get("WANDB_BASE_URL", DEFAULT_SERVER)
    if not _reachable(server):
        return f"publish: skipped, the W&B server {server} is not reachable"
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        return 'publish: skipped, wandb-workspaces is not installed (pip install "wandb[workspaces]")'
    try:
        report = wr.Report(project=project, entity=entity, title=title, blocks=[wr.MarkdownBlock(text=markdown)])
        report.save()
    except Exception as err:  # the server's errors come in many types; each means the same here: not published
        return f"publish: failed, {type(err).__name__}: {err}"
    return f"publish: W&B Report saved at {report.url}"
