"""An unchanged MLflow script, run as a command job's rank: it knows nothing of
kiln. MLflow's own variables (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN,
MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_RUN_ID, MLFLOW_EXPERIMENT_NAME) point it
at the job's run. Then it tries what the job's own token must not do, and
prints each answer for the test.
"""

import os
import sys
import time

import mlflow
from mlflow import MlflowClient

with mlflow.start_run() as run:
    run_id = run.info.run_id
    print("run", run_id, flush=True)
    mlflow.log_param("lr", "0.1")
    for step in range(3):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    mlflow.log_dict({"layers": [4, 16, 3]}, "config.json")
    # Above the multipart threshold the ranks have: uploaded in parts,
    # through the worker.
    big = os.path.join(os.environ["KILN_OUTPUT_DIR"], "big.bin")
    with open(big, "wb") as f:
        f.write(os.urandom(40 << 20))
    mlflow.log_artifact(big)
    os.remove(big)
    print("big artifact logged", flush=True)

client = MlflowClient()
other = os.environ["OTHER_RUN"]
attempts = [
    ("read another run", lambda: client.get_run(other)),
    ("write another run", lambda: client.log_metric(other, "x", 1.0)),
    ("search experiments", lambda: client.search_experiments()),
    ("create an experiment", lambda: client.create_experiment("not-mine")),
]
for what, call in attempts:
    try:
        call()
        print(f"ALLOWED {what}", flush=True)
    except Exception as e:  # the client raises MlflowException on 403
        code = getattr(e, "error_code", "") or type(e).__name__
        print(f"REFUSED {what}: {code}: {str(e)[:160]}", flush=True)
# Metrics over time: the test kills the leading coordinator meanwhile; the
# worker's tracking port passes the calls to whichever coordinator answers.
ticks = int(os.environ.get("TICKS", "0"))
if ticks:
    # MLflow reads MLFLOW_RUN_ID once (and unsets it): the run is named again.
    with mlflow.start_run(run_id=run_id):
        for i in range(ticks):
            mlflow.log_metric("tick", i, step=i)
            print(f"tick {i}", flush=True)
            time.sleep(0.2)
    history = MlflowClient().get_metric_history(run_id, "tick")
    print(f"ticks logged {len(history)}", flush=True)
sys.exit(0)
