"""The register step (``step.register_model``) and the promotion gate (``step.promote_model``), the
registry commands (``registry``), the run summary (``report``) and the served model (``serving``)."""
