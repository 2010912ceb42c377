"""Typed errors raised by steps.

The flow's retry condition looks at these types: a `TransientError` is retried,
every other error (bad data, bad config) stops the run at once.
"""


class TunelineError(Exception):
    """Base class for errors a user can act on."""


class DataQualityError(TunelineError):
    """The input data breaks a rule; the message names the rule, the count and example record ids."""


class ConfigError(TunelineError):
    """The configuration is invalid or inconsistent."""


class ArtifactError(TunelineError):
    """An artifact is missing or does not match its manifest."""


class TransientError(TunelineError):
    """A failure that a retry can fix (storage or network trouble)."""


class StepRunError(TunelineError):
    """A step sent to another flow run (``dispatch``) failed there; the message says where and why."""
