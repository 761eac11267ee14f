"""Pipeline stage functions, one outside system each (DVC, Great Expectations, MLflow, ...).

``dvc.yaml`` stages (through ``grpo stage NAME``) and the Prefect flow call the same functions.
"""
