"""The local services tuneline starts for itself (``stack``): SeaweedFS, MLflow, Prefect, PostgreSQL."""
