"""flows/console.py: the terminal gets the steps' lines; libraries' lines only with --verbose."""

from __future__ import annotations

import subprocess
import sys

from flows.cli import REPO

PROBE = """
import logging, warnings
from flows import console
console.setup(verbose={verbose})
logging.getLogger("great_expectations._docs_decorators").info("Skipping registering function x")
logging.getLogger("transformers.generation").warning("a library warning")
warnings.warn("a library UserWarning")
logging.getLogger("steps.validate").info("validate: 12 chat records pass 11 rules")
logging.getLogger("steps.scrub").warning("scrub: 2 records quarantined")
logging.getLogger("mlflow.store").error("an error anyone should see")
from tqdm.auto import tqdm
list(tqdm(range(3), desc="a library's bar", mininterval=0))
"""


def run(verbose: bool) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(verbose=verbose)], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def test_quiet_by_default_everything_with_verbose():
    quiet = run(verbose=False)
    assert [line.split(" ", 1)[1] for line in quiet] == [
        "validate: 12 chat records pass 11 rules",
        "WARNING: scrub: 2 records quarantined",
        "ERROR: an error anyone should see",
    ], quiet
    loud = "\n".join(run(verbose=True))
    for text in ("Skipping registering function x", "a library warning", "a library UserWarning", "a library's bar",
                 "validate: 12 chat records pass", "scrub: 2 records quarantined"):
        assert text in loud
