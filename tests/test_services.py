"""Against the real servers of ``make services`` (``make test-services``): the MLflow tracking
server on PostgreSQL with proxied artifacts records a run and registers a model version, and
the Prefect server answers and stores what it is sent. Skipped when the servers do not answer
(see ``live_services`` in conftest.py)."""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.services


def add_constant(c: float):
    """A tiny pyfunc model, y = x + c (cloudpickled by value: it is defined here)."""
    import mlflow.pyfunc

    class AddConstant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: pd.DataFrame, params=None) -> list[float]:
            return (model_input["x"] + c).tolist()

    return AddConstant()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_mlflow_records_and_registers_and_prefect_answers(live_services, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", live_services.mlflow_uri)
    client = mlflow.MlflowClient(live_services.mlflow_uri, live_services.mlflow_uri)
    name = f"services-smoke-{uuid.uuid4().hex[:8]}"
    experiment = client.create_experiment(name)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_param("c", 3)
            mlflow.log_metric("loss", 0.25, step=1)
            mlflow.log_text("hello", "notes/hello.txt")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=add_constant(3.0), pip_requirements=[],
                registered_model_name=name,
            )  # fmt: skip
        # proxied artifacts: the client sees only the server's scheme, never its folder
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        path = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="notes/hello.txt", dst_path=str(tmp_path)
        )
        assert Path(path).read_text() == "hello"
        stored = client.get_run(run.info.run_id)
        assert stored.data.params == {"c": "3"} and stored.info.status == "FINISHED"
        assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [0.25]

        version = client.get_model_version(name, info.registered_model_version)
        assert version.status == "READY" and version.run_id == run.info.run_id
        client.set_registered_model_alias(name, "champion", version.version)
        assert client.get_model_version_by_alias(name, "champion").version == version.version
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        assert list(model.predict(pd.DataFrame({"x": [1.0, -2.5]}))) == [4.0, 0.5]
    finally:
        client.delete_registered_model(name)
        client.delete_experiment(experiment)

    api = live_services.prefect_api_url
    with urllib.request.urlopen(f"{api}/health", timeout=10) as response:
        assert json.loads(response.read()) is True
    flow = _post(f"{api}/flows/", {"name": name})  # stored in the server's database
    with urllib.request.urlopen(f"{api}/flows/{flow['id']}", timeout=10) as response:
        assert json.loads(response.read())["name"] == name
    request = urllib.request.Request(f"{api}/flows/{flow['id']}", method="DELETE")
    urllib.request.urlopen(request, timeout=10).close()
