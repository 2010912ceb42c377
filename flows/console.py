"""What ``tuneline`` prints: quiet by default, everything with ``--verbose``.

Quiet: one line per thing a step did (``HH:MM:SS validate: 2479 chat records pass 11 rules``), the
steps' warnings, a progress bar for long loops on a terminal (steps/core/progress.py), then the
summary. Libraries' info lines and warnings (Great Expectations, transformers, MLflow, Prefect's
task-run chatter) stay out of the terminal; Prefect still records every line of a run in its
Logs tab. ``--verbose``: every logger at INFO with its name, Python warnings included.
"""

from __future__ import annotations

import logging
import os

OURS = ("steps", "flows", "services")
CHATTY = ("httpx", "httpcore", "botocore", "urllib3", "alembic")


def setup(verbose: bool = False) -> None:
    """Configure this process's terminal logging (before Prefect is imported). A program that configured
    logging already (one embedding tuneline, pytest) keeps its own configuration."""
    root = logging.getLogger()
    if root.handlers:
        return
    logging.captureWarnings(True)
    handler = logging.StreamHandler()
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for chatty in CHATTY:
            logging.getLogger(chatty).setLevel(logging.WARNING)
    else:
        # Prefect's own console handler (task runs beginning and finishing, "View at ...") at warnings only.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        # transformers' and huggingface_hub's own bars (loading weights, converting GGUF): ours say enough.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # transformers writes to its own handler, past ours: its load reports (a new head's weights MISSING) too.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TQDM_DISABLE", "1")  # any other library's tqdm (ours pass disable= themselves)
        # MLflow's: artifact transfer bars, "View run ... at" prints, its own info lines.
        for key, value in (("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
                           ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"), ("MLFLOW_LOGGING_LEVEL", "WARNING")):
            os.environ.setdefault(key, value)
        handler.setFormatter(StepFormatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler.addFilter(quiet)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def quiet(record: logging.LogRecord) -> bool:
    """Our lines at info and above; anyone else's only when they are errors."""
    return record.name.split(".")[0] in OURS or record.levelno >= logging.ERROR


class StepFormatter(logging.Formatter):
    """Warnings and errors say so; info lines are the step's own words."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            head, _, rest = text.partition(" ")
            return f"{head} {record.levelname}: {rest}"
        return text
