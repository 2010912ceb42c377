"""The scrub step (``step.scrub_records``: normalize, replace PII, deduplicate) and the standalone
streaming scrubber of ``tuneline scrub`` (``file.scrub_file``)."""
