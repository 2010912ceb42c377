"""flows/logs.py: an expected error reads as one line in a run's logs; anything else keeps its traceback."""

from __future__ import annotations

import logging
import sys

from flows.logs import ExpectedErrorFilter
from steps.core.errors import ConfigError, DataQualityError


def record(msg: str, exc: BaseException | None, run: str = "run-1") -> logging.LogRecord:
    info = None
    if exc is not None:
        try:
            raise exc
        except BaseException:  # noqa: BLE001 - the record carries it as Prefect's engine does
            info = sys.exc_info()
    rec = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, msg, (), info)
    rec.flow_run_id = run
    return rec


def test_an_expected_error_is_one_line_once_per_run_and_others_keep_their_traceback():
    shown = ExpectedErrorFilter()
    error = DataQualityError("validate: rule 'x': 1 of 2 records fail\n(e.g. lines 2)")
    first = record("Task run failed with exception: %r - Retries are exhausted", error)
    assert shown.filter(first)
    assert first.getMessage() == "DataQualityError: validate: rule 'x': 1 of 2 records fail\n(e.g. lines 2)"
    assert first.exc_info is None
    assert not shown.filter(record("Encountered exception during execution: %r", error))  # the flow re-raising it
    done = record(f"Finished in state Failed('Flow run encountered an exception: DataQualityError: {error!s}')", None)
    assert shown.filter(done) and done.getMessage() == "Finished in state Failed (DataQualityError)"
    assert shown.filter(record("x", ConfigError("bad key"), run="run-2"))  # another run shows its own
    assert shown.filter(record("x", error, run="run-2"))  # the same error in another run is shown there too

    unexpected = record("Task run failed with exception: %r", KeyError("tokenizer"))
    assert shown.filter(unexpected) and unexpected.exc_info is not None  # a bug keeps its traceback
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = ConfigError("dispatch.train: no deployment")
    chained = record("x", wrapped)
    assert shown.filter(chained) and chained.getMessage() == "ConfigError: dispatch.train: no deployment"
