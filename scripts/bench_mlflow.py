"""Times what a training script logs, through the real `mlflow` client, against
whatever MLFLOW_TRACKING_URI names (kiln's coordinators or `mlflow server`).

  python bench_mlflow.py --metrics 1000 --batches 100 --artifact-mb 1024

Prints one JSON object: log_metric calls/s, metrics/s through log_batch (1,000
metrics a call), and MB/s of one log_artifact (a file of random bytes).
"""

import argparse
import json
import os
import tempfile
import time

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--metrics", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--artifact-mb", type=int, default=1024)
    parser.add_argument("--experiment", default="bench")
    args = parser.parse_args()

    client = MlflowClient()
    experiment = mlflow.set_experiment(args.experiment)
    run = client.create_run(experiment.experiment_id, run_name="bench")
    run_id = run.info.run_id
    out = {}

    if args.metrics > 0:
        started = time.perf_counter()
        for i in range(args.metrics):
            client.log_metric(run_id, "loss", 1.0 / (i + 1), step=i)
        seconds = time.perf_counter() - started
        out["log_metric_per_s"] = args.metrics / seconds

    if args.batches > 0:
        now = int(time.time() * 1000)
        started = time.perf_counter()
        for b in range(args.batches):
            metrics = [Metric(f"m{k % 10}", float(k), now, b * 1000 + k) for k in range(1000)]
            client.log_batch(run_id, metrics=metrics)
        seconds = time.perf_counter() - started
        out["log_batch_metrics_per_s"] = args.batches * 1000 / seconds

    if args.artifact_mb > 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "blob.bin")
            with open(path, "wb") as f:
                for _ in range(args.artifact_mb):
                    # Random throughout: content-defined chunking would find the
                    # repeats in blocks that differ only in a prefix, and kiln
                    # would deduplicate its way out of most of the work.
                    f.write(os.urandom(1 << 20))
            # The file's own write-back must not run during either side's upload.
            os.sync()
            started = time.perf_counter()
            client.log_artifact(run_id, path)
            seconds = time.perf_counter() - started
            out["log_artifact_mb_per_s"] = args.artifact_mb / seconds
            listed = {f.path: f.file_size for f in client.list_artifacts(run_id)}
            if listed.get("blob.bin") != args.artifact_mb << 20:
                raise SystemExit(f"the artifact is not listed whole: {listed}")
        # What the server left to write back is not charged to the next run.
        os.sync()
    client.set_terminated(run_id)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
