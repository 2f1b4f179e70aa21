"""MLflow tracker writing to a local file store in the run dir unless a tracking URI is given."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from greenstack.errors import ConfigError
from greenstack.io import jsonable
from greenstack.tracking.base import Tracker


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, experiment: str = "greenstack", tracking_uri: str | None = None) -> None:
        self.experiment, self.tracking_uri = experiment, tracking_uri
        self._mlflow: Any = None
        self._last_step = 0

    def start(self, *, run_dir: Path, run_id: str, run_name: str, config: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError as e:
            raise ConfigError("MLflow is not installed", key="tracker", value="mlflow",
                              fix="pip install 'greenstack[mlflow]'") from e
        uri = self.tracking_uri
        if uri is None:
            # mlflow-skinny has no SQL store; its file store still works but must be opted into (MLflow 3)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (Path(run_dir).resolve() / "mlruns").as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(self.experiment)
        mlflow.start_run(run_name=run_name, tags={"greenstack.run_id": run_id})
        params = {k: str(v)[:500] for k, v in _flatten(jsonable(config)).items()}
        mlflow.log_params(params)
        self._mlflow = mlflow

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("/", ".")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._last_step = max(self._last_step, step)
        if self._mlflow is not None:
            numeric = {self._key(k): float(v) for k, v in jsonable(metrics).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numeric:
                self._mlflow.log_metrics(numeric, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self.log(values, step=self._last_step)

    def finish(self, exit_code: int = 0) -> None:
        if self._mlflow is not None:
            self._mlflow.end_run(status="FINISHED" if exit_code == 0 else "FAILED")
            self._mlflow = None
