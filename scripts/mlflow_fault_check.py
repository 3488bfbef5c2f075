"""The real `mlflow` client through coordinator faults (tests/tests/mlflow_faults.rs).

  python mlflow_fault_check.py multipart SIZE_MB
      logs one SIZE_MB file through MLflow's proxy multipart upload (parts of
      MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE), printing "UPLOADING <exp> <run>" just
      before, then downloads it and checks every byte; prints "OK <bytes>".
  python mlflow_fault_check.py retry N
      logs N metrics one call at a time, printing "LOGGED <i>" after each, then
      checks that the run holds all N points; prints "OK <n>".

Configured by MLflow's own variables (MLFLOW_TRACKING_URI, _TOKEN,
_SERVER_CERT_PATH, REQUESTS_CA_BUNDLE for the part PUTs). Exits non-zero naming
the step that failed.
"""

import hashlib
import os
import sys
import tempfile
import time

import mlflow
from mlflow.tracking import MlflowClient


def say(line):
    print(line, flush=True)


def multipart(size_mb):
    os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] = "true"
    os.environ.setdefault("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", str(1 << 20))
    os.environ.setdefault("MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE", str(10 << 20))
    client = MlflowClient()
    experiment = mlflow.set_experiment("faults")
    run = client.create_run(experiment.experiment_id, run_name="multipart")
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.bin")
        digest = hashlib.sha256()
        block = os.urandom(1 << 20)
        with open(path, "wb") as f:
            for i in range(size_mb):
                data = i.to_bytes(8, "little") + block[8:]
                digest.update(data)
                f.write(data)
        say(f"UPLOADING {experiment.experiment_id} {run_id}")
        started = time.monotonic()
        client.log_artifact(run_id, path, artifact_path="blobs")
        say(f"UPLOADED in {time.monotonic() - started:.1f} s")
        listed = {f.path: f.file_size for f in client.list_artifacts(run_id, "blobs")}
        if listed.get("blobs/big.bin") != size_mb << 20:
            sys.exit(f"listing: blobs/big.bin is not listed whole: {listed}")
        back = client.download_artifacts(run_id, "blobs/big.bin", os.path.join(tmp, "back"))
        got = hashlib.sha256()
        with open(back, "rb") as f:
            for piece in iter(lambda: f.read(1 << 20), b""):
                got.update(piece)
        if got.hexdigest() != digest.hexdigest():
            sys.exit("download: the bytes read back differ from the bytes logged")
    client.set_terminated(run_id)
    say(f"OK {size_mb << 20}")


def retry(n):
    client = MlflowClient()
    experiment = mlflow.set_experiment("faults")
    run = client.create_run(experiment.experiment_id, run_name="retry")
    run_id = run.info.run_id
    say(f"RUN {run_id}")
    for i in range(n):
        client.log_metric(run_id, "loss", 1.0 / (i + 1), step=i)
        say(f"LOGGED {i + 1}")
        time.sleep(0.1)
    history = client.get_metric_history(run_id, "loss")
    steps = sorted(m.step for m in history)
    if steps != list(range(n)):
        sys.exit(f"history: {len(steps)} points, not the {n} logged: {steps[:5]}...")
    client.set_terminated(run_id)
    say(f"OK {n}")


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("multipart", "retry"):
        sys.exit(__doc__)
    {"multipart": multipart, "retry": retry}[sys.argv[1]](int(sys.argv[2]))


if __name__ == "__main__":
    main()
