"""onnxruntime's own CPU numbers for a model, in-process, to compare kiln against.

    python scripts/bench_onnxruntime.py MODEL.onnx KIND [--seconds S] [--warmup S]

KIND is resnet18, bert_seq64 or mlp and picks the sample input: resnet18 a
float32 [b,3,224,224] image batch, bert_seq64 int64 input_ids/attention_mask
[b,64] (ids in BERT's vocabulary, no padding), mlp random values of the model's
own input type (float16 for mlp_fp16.onnx) and width. Run with the exporters
venv's python (scripts/models.sh, kiln_exporters_python).

Measures, with intra_op_num_threads 1 and 2 (inter_op 1, sequential execution,
all graph optimisations): the p50/p99 latency of batch-1 runs after a warm-up,
and at 2 threads the throughput (rows/s) at batch sizes 1, 2, 4, 8, 16 and the
best of them. Prints one JSON object on stdout.
"""

import argparse
import json
import os
import platform
import time

import numpy as np
import onnxruntime as ort

KINDS = ("resnet18", "bert_seq64", "mlp")
BATCHES = (1, 2, 4, 8, 16)

NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def make_inputs(session, kind, batch, rng):
    feeds = {}
    for arg in session.get_inputs():
        shape = [batch if i == 0 else d for i, d in enumerate(arg.shape)]
        if kind == "bert_seq64":
            shape = [batch, 64]
            if arg.name == "attention_mask":
                feeds[arg.name] = np.ones(shape, dtype=np.int64)
            else:
                ids = rng.integers(1000, 30522, size=shape, dtype=np.int64)
                ids[:, 0] = 101
                feeds[arg.name] = ids
            continue
        if kind == "resnet18":
            shape = [batch, 3, 224, 224]
        if any(not isinstance(d, int) for d in shape):
            raise SystemExit(f"input {arg.name} has a dynamic axis besides the batch: {arg.shape}")
        dtype = NUMPY_TYPES.get(arg.type)
        if dtype is None:
            raise SystemExit(f"input {arg.name} has a type this benchmark does not make: {arg.type}")
        feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def session_for(path, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_for(session, feeds, seconds, min_runs=5):
    """Runs until `seconds` have passed (and at least `min_runs` times); returns
    each run's latency in seconds."""
    latencies = []
    end = time.perf_counter() + seconds
    while len(latencies) < min_runs or time.perf_counter() < end:
        t = time.perf_counter()
        session.run(None, feeds)
        latencies.append(time.perf_counter() - t)
    return latencies


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time of each point (default 2)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up time of each session (default 1)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    result = {
        "model": os.path.abspath(args.model),
        "kind": args.kind,
        "onnxruntime": ort.__version__,
        "provider": "CPUExecutionProvider",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "seconds_per_point": args.seconds,
        "latency_batch1": {},
    }
    for threads in (1, 2):
        session = session_for(args.model, threads)
        feeds = make_inputs(session, args.kind, 1, rng)
        run_for(session, feeds, args.warmup)
        lat = np.array(run_for(session, feeds, args.seconds)) * 1e3
        result["latency_batch1"][f"threads_{threads}"] = {
            "runs": int(lat.size),
            "p50_ms": round(float(np.percentile(lat, 50)), 4),
            "p99_ms": round(float(np.percentile(lat, 99)), 4),
            "mean_ms": round(float(lat.mean()), 4),
        }

    session = session_for(args.model, 2)
    by_batch = {}
    for batch in BATCHES:
        feeds = make_inputs(session, args.kind, batch, rng)
        run_for(session, feeds, min(args.warmup, 0.5), min_runs=2)
        lat = run_for(session, feeds, args.seconds, min_runs=3)
        by_batch[str(batch)] = {
            "runs": len(lat),
            "rows_per_s": round(batch * len(lat) / sum(lat), 2),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 4),
        }
    best = max(by_batch, key=lambda b: by_batch[b]["rows_per_s"])
    result["throughput_threads_2"] = {
        "by_batch": by_batch,
        "best_batch": int(best),
        "best_rows_per_s": by_batch[best]["rows_per_s"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
