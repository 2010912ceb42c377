"""Base model step (``prepare_base_model`` in step.py): shipped, local, S3, Hub and registry models as
checked Hugging Face folders in the store."""

from steps.base_model.step import prepare_base_model

__all__ = ["prepare_base_model"]
