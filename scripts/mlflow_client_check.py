"""Drives an MLflow tracking server with the real `mlflow` client, unchanged, the way
MLflow's quickstart does, and asserts every answer: a run with params, metrics and
artifacts; an ONNX model logged (MLflow 3's logged models), registered and aliased;
the artifacts listed and downloaded byte for byte; the model loaded back through
its alias; run search with filters, ordering and paging; experiment search; and
the error codes of requests made to fail on purpose.

tests/tests/mlflow_client.rs runs it against a kiln coordinator's HTTP port, then
checks kiln's side (`kiln runs show`, `kiln artifact pull`, `kiln models ls`,
`kiln deploy`) against the report it writes. It expects a fresh server: no
experiment "quickstart" yet.

Configured by environment variables:
    MLFLOW_TRACKING_URI               https://127.0.0.1:PORT (or http:// for a plain server)
    MLFLOW_TRACKING_TOKEN             a bearer token
    MLFLOW_TRACKING_SERVER_CERT_PATH  the CA to trust (unset for http://)
    KILN_CHECK_OUT                    where report.json and the originals go

Writes KILN_CHECK_OUT/report.json, the bytes of every file it logged to the run
under KILN_CHECK_OUT/originals/<artifact path>, and the logged model's files
under KILN_CHECK_OUT/model/. Prints a line per step; on the first failure prints
which step failed and why and exits 1.

Needs the venv of scripts/env.sh's kiln_mlflow_python (mlflow 3.17.2, onnx,
onnxruntime, matplotlib, numpy)."""
import os

# A broken server fails the check in seconds, not after MLflow's 4 minutes of
# retries; set before mlflow reads them.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import mlflow.artifacts  # noqa: E402
import mlflow.onnx  # noqa: E402
import mlflow.sklearn  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

EXPERIMENT = "quickstart"
MODEL = "quickstart-mlp"
ALIAS = "champion"
SKLEARN_MODEL = "quickstart-sklearn"
EXTERNAL_MODEL = "quickstart-external"
LOSS = [round(1.0 / (step + 1), 6) for step in range(10)]
ACCURACY = [round(0.5 + 0.04 * step, 6) for step in range(10)]
# The search runs: (lr, rmse). Only lr 0.01 has rmse < 0.5 and lr = '0.01'.
SEARCH_RUNS = [(0.1, 0.7), (0.01, 0.3), (0.001, 0.45)]
# Longest the client waits for a model version to leave PENDING_REGISTRATION.
REGISTRATION_WAIT_S = 60
# Most pages the paging loop reads before it calls the server's tokens endless.
MAX_PAGES = 10
# log-batch's limit on metrics + params + tags in one request.
LOG_BATCH_MAX_ITEMS = 1000
# Timeout of the raw HTTP request of step f.
RAW_REQUEST_TIMEOUT_S = 60


class CheckFailed(Exception):
    """An answer that is not what MLflow's client relies on."""


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def step(name, fn, *args):
    """Runs one step; on its first failure prints why and exits 1."""
    print(f"step {name} ...", flush=True)
    started = time.monotonic()
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 - every failure names its step
        traceback.print_exc()
        print(
            f"FAILED step {name}: {type(e).__name__}: {e}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)
    print(f"ok   {name} ({time.monotonic() - started:.1f} s)", flush=True)
    return result


def expect_error(code, what, fn):
    """Calls fn, which must raise an MlflowException with error_code `code`."""
    try:
        fn()
    except MlflowException as e:
        check(
            e.error_code == code,
            f"{what}: error_code {e.error_code}, want {code} ({e})",
        )
        print(f"     {what}: {e.error_code}", flush=True)
        return
    raise CheckFailed(f"{what}: no error, want {code}")


class Context:
    """What the steps learn and hand on."""

    def __init__(self, out, work):
        self.out = out
        self.work = work
        self.client = MlflowClient()
        self.originals = {}  # artifact path -> bytes logged
        self.experiment_id = None
        self.run_id = None
        self.model_bytes = None
        self.model_id = None
        self.model_version = None
        self.model_files = []
        self.search_run_ids = {}  # lr -> run id
        self.external = None  # the external-data model: name, input, X·W
        self.x = None
        self.y = None

    def keep(self, path, data):
        """Remembers the bytes logged at artifact `path` and keeps a copy."""
        self.originals[path] = data
        dest = os.path.join(self.out, "originals", *path.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(data)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def loss_figure():
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(range(len(LOSS)), LOSS, label="loss")
    ax.set_xlabel("step")
    ax.legend()
    return fig


def build_model():
    """X [N,4] -> X·W + B -> Y [N,3], every tensor far under 1 KiB, so that
    mlflow.onnx writes no external data file."""
    w = (np.arange(12, dtype=np.float32).reshape(4, 3) / 20).astype(np.float32)
    b = np.array([0.1, -0.2, 0.3], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["XW"]),
            helper.make_node("Add", ["XW", "B"], ["Y"]),
        ],
        "quickstart-mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
        producer_name="kiln-mlflow-check",
    )
    onnx.checker.check_model(model)
    x = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    return model, x, x @ w + b


def set_experiment():
    experiment = mlflow.set_experiment(EXPERIMENT)
    check(experiment.name == EXPERIMENT, f"set_experiment gave {experiment.name}")
    check(
        experiment.lifecycle_stage == "active",
        f"experiment lifecycle {experiment.lifecycle_stage}",
    )


def log_quickstart_run(ctx, run):
    """Step a: params, metrics with steps and every kind of artifact."""
    ctx.run_id = run.info.run_id
    ctx.experiment_id = run.info.experiment_id
    check(run.info.status == "RUNNING", f"a new run is {run.info.status}")
    check(
        run.info.artifact_uri.startswith("mlflow-artifacts:/")
        or run.info.artifact_uri.startswith("http"),
        f"artifact_uri {run.info.artifact_uri} is not served by the tracking server",
    )
    mlflow.log_param("lr", 0.01)
    mlflow.log_params({"layers": 2})
    for s, (loss, accuracy) in enumerate(zip(LOSS, ACCURACY)):
        mlflow.log_metric("loss", loss, step=s)
        mlflow.log_metrics({"accuracy": accuracy}, step=s)

    readme = os.path.join(ctx.work, "readme.txt")
    write(readme, b"kiln quickstart run\nlogged by the mlflow client\n")
    mlflow.log_artifact(readme)
    ctx.keep("readme.txt", read(readme))

    data = os.path.join(ctx.work, "data")
    files = {
        "train.csv": b"x1,x2,x3,x4,y\n1,2,3,4,0\n5,6,7,8,1\n",
        "nested/labels.txt": b"setosa\nversicolor\nvirginica\n",
        # Binary and large enough for several chunks: byte for byte or not at all.
        "nested/blob.bin": np.random.default_rng(7).bytes(300_000),
    }
    for rel, content in files.items():
        write(os.path.join(data, *rel.split("/")), content)
        ctx.keep(f"data/{rel}", content)
    mlflow.log_artifacts(data, artifact_path="data")

    config = {"lr": 0.01, "layers": 2, "optimizer": {"name": "adam", "betas": [0.9, 0.999]}}
    mlflow.log_dict(config, "config/params.json")
    # mlflow's log_dict writes json.dump(indent=2, default=str) (tracking/client.py).
    ctx.keep("config/params.json", json.dumps(config, indent=2, default=str).encode())

    fig = loss_figure()
    mlflow.log_figure(fig, "plots/loss.png")
    png = os.path.join(ctx.work, "loss.png")
    fig.savefig(png)  # what log_figure saved: Agg's PNG is deterministic
    plt.close(fig)
    ctx.keep("plots/loss.png", read(png))

    mlflow.log_text("hello", "notes/hello.txt")
    ctx.keep("notes/hello.txt", b"hello")


def log_and_register_model(ctx, run):
    """Step b: an ONNX model logged in the run, registered and aliased."""
    model, ctx.x, ctx.y = build_model()
    ctx.model_bytes = model.SerializeToString()
    info = mlflow.onnx.log_model(model, name="model")
    check(
        model.SerializeToString() == ctx.model_bytes,
        "log_model changed the model (external data?)",
    )
    check(
        isinstance(info.model_id, str) and info.model_id.startswith("m-"),
        f"logged model id {info.model_id!r}",
    )
    check(info.run_id == run.info.run_id, f"logged model run {info.run_id}")
    ctx.model_id = info.model_id
    logged = ctx.client.get_logged_model(info.model_id)
    check(
        str(logged.status).endswith("READY"),
        f"logged model status {logged.status}, want READY",
    )
    check(logged.source_run_id == run.info.run_id, f"source run {logged.source_run_id}")

    mv = mlflow.register_model(
        f"runs:/{run.info.run_id}/model",
        MODEL,
        await_registration_for=REGISTRATION_WAIT_S,
    )
    check(mv.name == MODEL, f"registered as {mv.name}")
    check(mv.run_id == run.info.run_id, f"version's run {mv.run_id}")
    check(
        getattr(mv, "model_id", None) in (None, info.model_id),
        f"version's model_id {mv.model_id}, want {info.model_id}",
    )
    check(str(mv.status).endswith("READY"), f"version status {mv.status}")
    ctx.model_version = int(mv.version)
    ctx.client.set_registered_model_alias(MODEL, ALIAS, mv.version)
    by_alias = ctx.client.get_model_version_by_alias(MODEL, ALIAS)
    check(
        int(by_alias.version) == ctx.model_version,
        f"{MODEL}@{ALIAS} is version {by_alias.version}, want {mv.version}",
    )
    print(f"     {MODEL} version {mv.version} from {info.model_id}, alias {ALIAS}", flush=True)


def read_back_run_and_artifacts(ctx):
    """Step c: the finished run, its metrics, and its artifacts listed and
    downloaded byte for byte."""
    client = ctx.client
    run = client.get_run(ctx.run_id)
    check(run.info.status == "FINISHED", f"the run ended {run.info.status}")
    check(run.info.run_name == "first", f"run name {run.info.run_name}")
    check(
        run.data.params == {"lr": "0.01", "layers": "2"},
        f"params {run.data.params}",
    )
    check(
        run.data.metrics.get("loss") == LOSS[-1],
        f"latest loss {run.data.metrics.get('loss')}, want {LOSS[-1]}",
    )
    history = client.get_metric_history(ctx.run_id, "loss")
    got = sorted((m.step, m.value) for m in history)
    check(got == list(enumerate(LOSS)), f"loss history {got}")
    check(
        len(client.get_metric_history(ctx.run_id, "accuracy")) == len(ACCURACY),
        "accuracy history length",
    )

    def listing(path=None):
        files = client.list_artifacts(ctx.run_id, path)
        return {f.path: (f.is_dir, f.file_size if not f.is_dir else None) for f in files}

    size = lambda path: len(ctx.originals[path])  # noqa: E731
    root = listing()
    want = {
        "readme.txt": (False, size("readme.txt")),
        "data": (True, None),
        "config": (True, None),
        "plots": (True, None),
        "notes": (True, None),
    }
    check(root == want, f"list_artifacts(run) = {root}, want {want}")
    data = listing("data")
    want = {"data/train.csv": (False, size("data/train.csv")), "data/nested": (True, None)}
    check(data == want, f"list_artifacts(run, 'data') = {data}, want {want}")
    nested = listing("data/nested")
    want = {
        "data/nested/labels.txt": (False, size("data/nested/labels.txt")),
        "data/nested/blob.bin": (False, size("data/nested/blob.bin")),
    }
    check(nested == want, f"list_artifacts(run, 'data/nested') = {nested}, want {want}")

    for path, original in ctx.originals.items():
        dst = tempfile.mkdtemp(dir=ctx.work)
        local = mlflow.artifacts.download_artifacts(
            run_id=ctx.run_id, artifact_path=path, dst_path=dst
        )
        got = read(local)
        if path.endswith(".json"):
            check(json.loads(got) == json.loads(original), f"{path}: {got!r}")
        check(got == original, f"{path}: {len(got)} bytes differ from the {len(original)} logged")
    # A whole directory, recursively.
    dst = tempfile.mkdtemp(dir=ctx.work)
    local = mlflow.artifacts.download_artifacts(
        run_id=ctx.run_id, artifact_path="data", dst_path=dst
    )
    for path, original in ctx.originals.items():
        if path.startswith("data/"):
            rel = path[len("data/") :]
            got = read(os.path.join(local, *rel.split("/")))
            check(got == original, f"{path} in the downloaded dir differs")
    print(f"     {len(ctx.originals)} files listed and downloaded", flush=True)


def load_model_through_registry(ctx):
    """Step d: the model through its alias, its version and its logged-model id."""
    loaded = mlflow.onnx.load_model(f"models:/{MODEL}@{ALIAS}")
    check(
        loaded.SerializeToString() == ctx.model_bytes,
        "the model loaded through the alias differs from the one logged",
    )
    by_alias = mlflow.artifacts.download_artifacts(
        f"models:/{MODEL}@{ALIAS}", dst_path=tempfile.mkdtemp(dir=ctx.work)
    )
    by_version = mlflow.artifacts.download_artifacts(
        f"models:/{MODEL}/{ctx.model_version}", dst_path=tempfile.mkdtemp(dir=ctx.work)
    )
    by_id = mlflow.artifacts.download_artifacts(
        f"models:/{ctx.model_id}", dst_path=tempfile.mkdtemp(dir=ctx.work)
    )
    # The client writes what it resolved into registered_model_meta
    # (store/artifact/models_artifact_repo.py); it was never uploaded.
    names = sorted(n for n in os.listdir(by_id) if n != "registered_model_meta")
    check({"MLmodel", "model.onnx"} <= set(names), f"the logged model holds {names}")
    check(not any(n.endswith(".data") for n in names), f"external data in {names}")
    for local in (by_alias, by_version):
        meta = yaml.safe_load(read(os.path.join(local, "registered_model_meta")))
        check(
            meta == {"model_name": MODEL, "model_version": str(ctx.model_version)},
            f"registered_model_meta {meta}",
        )
        got = sorted(n for n in os.listdir(local) if n != "registered_model_meta")
        check(got == names, f"{local} holds {got}, the logged model {names}")
        for name in names:
            check(
                read(os.path.join(local, name)) == read(os.path.join(by_id, name)),
                f"{name} differs between the registry and the logged model",
            )
    check(read(os.path.join(by_id, "model.onnx")) == ctx.model_bytes, "model.onnx bytes")
    mlmodel = yaml.safe_load(read(os.path.join(by_id, "MLmodel")))
    check(mlmodel.get("model_id") == ctx.model_id, f"MLmodel model_id {mlmodel.get('model_id')}")
    check(mlmodel.get("run_id") == ctx.run_id, f"MLmodel run_id {mlmodel.get('run_id')}")
    check("onnx" in mlmodel.get("flavors", {}), f"MLmodel flavors {mlmodel.get('flavors')}")
    for name in names:
        shutil.copyfile(os.path.join(by_id, name), os.path.join(ctx.out, "model", name))
    ctx.model_files = names


def search(ctx):
    """Step e: run search with filters, ordering and paging; experiment search."""
    for lr, rmse in SEARCH_RUNS:
        with mlflow.start_run(run_name=f"lr-{lr}") as run:
            mlflow.log_param("lr", lr)
            mlflow.log_metric("rmse", rmse)
            ctx.search_run_ids[lr] = run.info.run_id

    found = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        filter_string="metrics.rmse < 0.5 and params.lr = '0.01'",
        order_by=["metrics.rmse ASC"],
    )
    got = list(found["run_id"]) if "run_id" in found else []  # no column when empty
    want = [ctx.search_run_ids[0.01]]
    check(got == want, f"filtered search found {got}, want {want}")
    found = mlflow.search_runs(
        experiment_ids=[ctx.experiment_id],
        filter_string="metrics.rmse < 0.5",
        order_by=["metrics.rmse ASC"],
        output_format="list",
    )
    got = [r.info.run_id for r in found]
    want = [ctx.search_run_ids[0.01], ctx.search_run_ids[0.001]]
    check(got == want, f"metrics.rmse < 0.5 ordered ASC found {got}, want {want}")

    seen, token = [], None
    for _ in range(MAX_PAGES):
        page = ctx.client.search_runs(
            [ctx.experiment_id],
            "",
            order_by=["metrics.rmse DESC"],
            max_results=2,
            page_token=token,
        )
        check(len(page) <= 2, f"a page of {len(page)} runs, max_results 2")
        seen += [r.info.run_id for r in page]
        token = page.token
        if not token:
            break
    else:
        raise CheckFailed(f"still a page token after {MAX_PAGES} pages")
    check(len(seen) == len(set(seen)), f"paging repeated runs: {seen}")
    # MLflow orders runs without the metric last.
    by_rmse = sorted(SEARCH_RUNS, key=lambda lr_rmse: -lr_rmse[1])
    want = [ctx.search_run_ids[lr] for lr, _ in by_rmse] + [ctx.run_id]
    check(seen == want, f"paged through {seen}, want {want}")

    experiments = ctx.client.search_experiments(filter_string=f"name = '{EXPERIMENT}'")
    got = [(e.experiment_id, e.name) for e in experiments]
    check(got == [(ctx.experiment_id, EXPERIMENT)], f"search_experiments found {got}")


def error_codes(ctx):
    """Step f: requests made to fail on purpose answer MLflow's error codes."""
    client = ctx.client
    expect_error(
        "RESOURCE_DOES_NOT_EXIST", "get_run of an unknown run", lambda: client.get_run("0" * 32)
    )
    expect_error(
        "RESOURCE_ALREADY_EXISTS",
        "create_experiment of an existing name",
        lambda: client.create_experiment(EXPERIMENT),
    )
    expect_error(
        "INVALID_PARAMETER_VALUE",
        "search_runs with an unquoted param value",
        lambda: client.search_runs([ctx.experiment_id], "params.lr = 0.1"),
    )
    expect_error(
        "INVALID_PARAMETER_VALUE",
        "log_param changing a param",
        lambda: client.log_param(ctx.run_id, "lr", 0.5),
    )
    check(client.get_run(ctx.run_id).data.params["lr"] == "0.01", "the refused param changed")

    # mlflow's client splits big batches itself, so this one goes raw.
    target = ctx.search_run_ids[0.1]
    now_ms = int(time.time() * 1000)
    body = {
        "run_id": target,
        "metrics": [
            {"key": "bulk", "value": float(i), "timestamp": now_ms, "step": i}
            for i in range(LOG_BATCH_MAX_ITEMS)
        ],
        "params": [{"key": "extra", "value": "1"}],
        "tags": [],
    }
    uri = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    headers = {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    answer = requests.post(
        f"{uri}/api/2.0/mlflow/runs/log-batch",
        json=body,
        headers=headers,
        verify=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True,
        timeout=RAW_REQUEST_TIMEOUT_S,
    )
    try:
        error = answer.json()
    except ValueError:
        error = {}
    check(
        answer.status_code == 400 and error.get("error_code") == "INVALID_PARAMETER_VALUE",
        f"log-batch of {LOG_BATCH_MAX_ITEMS} metrics + 1 param answered "
        f"{answer.status_code} {answer.text[:300]!r}, want 400 INVALID_PARAMETER_VALUE",
    )
    print(f"     log-batch over the limit: {answer.status_code} {error['error_code']}", flush=True)
    run = client.get_run(target)
    check(
        "extra" not in run.data.params and "bulk" not in run.data.metrics,
        "the refused batch was partly logged",
    )


def log_models_people_log(ctx):
    """Step h: other models people log: a fitted scikit-learn pipeline
    (mlflow.sklearn, a pickle), which kiln keeps but cannot serve (kiln's side
    checks that `kiln deploy` refuses it, saying why), and an ONNX model whose
    weights mlflow.onnx saves as external data (its default for tensors of 1 KiB or
    more), which kiln serves from the files logged beside model.onnx (kiln's side
    deploys it and checks X·W)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    with mlflow.start_run(run_name="sklearn"):
        mlflow.sklearn.log_model(pipeline, name="model", registered_model_name=SKLEARN_MODEL)
    mv = ctx.client.get_model_version(SKLEARN_MODEL, "1")
    check(str(mv.status).endswith("READY"), f"{SKLEARN_MODEL} status {mv.status}")
    loaded = mlflow.sklearn.load_model(f"models:/{SKLEARN_MODEL}/1")
    check(
        (loaded.predict(x) == pipeline.predict(x)).all(),
        "the pipeline loaded through the registry predicts otherwise",
    )

    w = rng.normal(size=(64, 64)).astype(np.float32)  # 16 KiB: saved externally
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "external",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 64])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with mlflow.start_run(run_name="external"):
        info = mlflow.onnx.log_model(model, name="model", registered_model_name=EXTERNAL_MODEL)
    loaded = mlflow.onnx.load_model(f"models:/{EXTERNAL_MODEL}/1")
    check(
        numpy_helper.to_array(loaded.graph.initializer[0]).tobytes() == w.tobytes(),
        "the external weights did not come back through the registry",
    )
    check(info.model_id.startswith("m-"), f"logged model id {info.model_id!r}")
    x = rng.normal(size=(2, 64)).astype(np.float32)
    ctx.external = {
        "model": EXTERNAL_MODEL,
        "input": "X",
        "output": "Y",
        "x": x.reshape(-1).tolist(),
        "x_shape": list(x.shape),
        "y": (x @ w).reshape(-1).tolist(),
    }


def write_report(ctx):
    """Step g: what kiln's side checks."""
    report = {
        "run_id": ctx.run_id,
        "experiment_id": ctx.experiment_id,
        "experiment_name": EXPERIMENT,
        "model_name": MODEL,
        "unservable_models": {
            SKLEARN_MODEL: "no model.onnx",
        },
        "external_data_model": ctx.external,
        "model_version": ctx.model_version,
        "model_alias": ALIAS,
        "logged_model_id": ctx.model_id,
        "files": sorted(ctx.originals),
        "model_files": ctx.model_files,
        "search_run_ids": sorted(ctx.search_run_ids.values()),
        "infer": {
            "input": "X",
            "output": "Y",
            "x": ctx.x.reshape(-1).tolist(),
            "x_shape": list(ctx.x.shape),
            "y": ctx.y.reshape(-1).tolist(),
            "y_shape": list(ctx.y.shape),
        },
    }
    path = os.path.join(ctx.out, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"     wrote {path}", flush=True)


def main():
    for name in ("MLFLOW_TRACKING_URI", "KILN_CHECK_OUT"):
        if not os.environ.get(name):
            print(f"FAILED: {name} is not set", file=sys.stderr)
            return 2
    if not os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        # An empty value would be handed to requests as a CA path.
        os.environ.pop("MLFLOW_TRACKING_SERVER_CERT_PATH", None)
    out = os.environ["KILN_CHECK_OUT"]
    os.makedirs(os.path.join(out, "model"), exist_ok=True)
    print(
        f"mlflow {mlflow.__version__} against {os.environ['MLFLOW_TRACKING_URI']}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as work:
        ctx = Context(out, work)
        step("a0 set_experiment", set_experiment)
        with mlflow.start_run(run_name="first") as run:
            step("a  params, metrics and artifacts logged", log_quickstart_run, ctx, run)
            step("b  ONNX model logged, registered and aliased", log_and_register_model, ctx, run)
        step("c  run and artifacts read back byte for byte", read_back_run_and_artifacts, ctx)
        step("d  model loaded through the registry", load_model_through_registry, ctx)
        step("e  runs and experiments searched and paged", search, ctx)
        step("f  error codes", error_codes, ctx)
        step("h  other models people log", log_models_people_log, ctx)
        step("g  report written", write_report, ctx)
    print("all steps passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
