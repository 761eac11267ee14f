"""Prefect flows and the ``grpo`` command line: wiring only (logic lives in ``grpo/`` and ``tasks/``)."""
