"""What a flow run's Logs tab shows: the steps' own log lines, and one readable line for an
expected error instead of a traceback.

``attach()`` (called when ``flows.tasks`` is imported, so in every process that runs our flows)
sends the ``steps.*`` loggers to the Prefect API of the run they are logged in (lines logged
outside a run, e.g. by a step called from a test, stay local), and filters Prefect's own run
loggers: a ``DataQualityError`` or ``ConfigError`` (bad data or configuration: the message says
what to fix) is logged once, as ``<task> failed: <message>``, without its traceback; unexpected
errors keep theirs.
"""

from __future__ import annotations

import logging

from steps.core.errors import ConfigError, DataQualityError

EXPECTED = (DataQualityError, ConfigError)
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")
_attached = False


class StepLogHandler(logging.Handler):
    """Prefect's API log handler for lines logged inside a flow or task run; silent elsewhere."""

    def __init__(self) -> None:
        from prefect.logging.handlers import APILogHandler

        super().__init__()
        self.api = APILogHandler()

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        self.api.emit(record)


def expected_error(record: logging.LogRecord) -> BaseException | None:
    """The expected error a log record carries (in ``exc_info`` or anywhere in its cause chain), if any."""
    exc = record.exc_info[1] if record.exc_info else None
    for _ in range(8):
        if exc is None or isinstance(exc, EXPECTED):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class ExpectedErrorFilter(logging.Filter):
    """One line per expected error: the first record carrying it loses its traceback and reads
    ``DataQualityError: <message>``; later records of the same error in the same flow run (the flow
    re-raising what a task raised) are dropped, and Prefect's ``Finished in state Failed(...)`` lines,
    which repeat the message repr'd (``\\n`` and all), are shortened to the error's type."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[tuple[str, str], None] = {}  # (flow run id, message) already shown

    def filter(self, record: logging.LogRecord) -> bool:
        run = str(getattr(record, "flow_run_id", ""))
        exc = expected_error(record)
        if exc is not None:
            key = (run, str(exc))
            if key in self.seen:
                return False
            self.seen[key] = None
            while len(self.seen) > 256:
                self.seen.pop(next(iter(self.seen)))
            record.msg, record.args = f"{type(exc).__name__}: {exc}", ()
            record.exc_info, record.exc_text = None, None
            return True
        message = record.getMessage()
        if message.startswith("Finished in state Failed("):  # the state's message, repr'd: once is enough
            kind = next((k.__name__ for k in EXPECTED if f"{k.__name__}: " in message), None)
            if kind is not None:
                record.msg, record.args = f"Finished in state Failed ({kind})", ()
        return True


def attach() -> None:
    """Install the step handler and the expected-error filter once per process."""
    global _attached
    if _attached:
        return
    _attached = True
    steps = logging.getLogger("steps")
    steps.addHandler(StepLogHandler())
    if steps.level == logging.NOTSET:
        steps.setLevel(logging.INFO)
    shared = ExpectedErrorFilter()
    for name in RUN_LOGGERS:
        logging.getLogger(name).addFilter(shared)

