"""Fixtures shared by the reliability tests of this directory: registered here once, so that the
load and security tests share one production-shaped stack and one first run (prod_stack.py)."""

from prod_stack import first_run, load_params, load_run, prod_stack, run_pool  # noqa: F401 - fixtures
