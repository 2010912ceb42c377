"""Text processing the data steps share: normalization, PII detection and replacement, exact and
near-duplicate detection, and the pre-token cache of byte-level BPE tokenizers."""
