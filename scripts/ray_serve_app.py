"""The Ray Serve peer of scripts/bench_rayserve.sh (issue 19, Measured): one ONNX
model in one Ray Serve replica, behind Ray Serve's HTTP proxy on loopback.

The replica holds an onnxruntime InferenceSession set up as kiln's ONNX Runtime
engine sets up its own (intra-op threads = the CPUs given, every graph
optimisation, intra-op spinning off) and joins requests with `@serve.batch`,
configured like kiln's batcher defaults: up to 64 rows per run (rows, through
`batch_size_fn`, as kiln counts them) and a 0.5 ms wait for a batch to fill.

Requests are kiln's own: the KServe v2 binary body (the JSON header, whose length
the Inference-Header-Content-Length header gives, then each input's little-endian
bytes, `parameters.binary_data_size` long), parsed here in Python, on
POST /v2/models/NAME/infer. Answers are binary too (the JSON header, then the
outputs' bytes), so neither side pays JSON for big outputs.

Ray runs on `--cpus` CPUs (ray.init(num_cpus=N)) and the one replica asks for all
of them, so it is placed with the same CPUs kiln's replica gets. The replica may
hold up to 128 requests at once (max_ongoing_requests; Ray's default, 5, would cap
its batches at 5 rows), and Serve's access log is off, as kiln keeps none.

Runs until SIGTERM or SIGINT, then shuts Serve and the Ray processes it started
down. Prints "ready" on stdout once the application answers.

Usage: ray_serve_app.py MODEL.onnx --name NAME --port PORT --cpus N
           [--max-batch-size 64] [--batch-wait-ms 0.5] [--temp-dir DIR]
"""
import argparse
import asyncio
import json
import signal
import threading

import numpy as np
import onnxruntime as ort
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

# KServe v2 datatypes and the numpy types of their little-endian bytes.
KSERVE_TO_NUMPY = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
NUMPY_TO_KSERVE = {d.newbyteorder("="): name for name, d in KSERVE_TO_NUMPY.items()}

# The most requests the replica holds at once: twice a full batch, so one batch
# forms while the previous one runs.
MAX_ONGOING_REQUESTS = 128


class BadRequest(Exception):
    """A request this server cannot read; answered with 400."""


def decode_request(body: bytes, json_len: int):
    """Returns the request's inputs by name and the outputs it asks for (None: all)."""
    if json_len <= 0 or json_len > len(body):
        raise BadRequest(f"Inference-Header-Content-Length {json_len} is outside the body")
    header = json.loads(body[:json_len])
    inputs = {}
    offset = json_len
    for tensor in header.get("inputs", []):
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is None:
            raise BadRequest(f"input '{tensor.get('name')}' is not binary")
        dtype = KSERVE_TO_NUMPY.get(tensor.get("datatype"))
        if dtype is None:
            raise BadRequest(f"datatype {tensor.get('datatype')} is not served")
        if offset + size > len(body):
            raise BadRequest(f"input '{tensor['name']}' runs past the body")
        array = np.frombuffer(body, dtype=dtype, count=size // dtype.itemsize, offset=offset)
        inputs[tensor["name"]] = array.reshape(tensor["shape"])
        offset += size
    if offset != len(body):
        raise BadRequest(f"{len(body) - offset} bytes follow the last input")
    outputs = [o["name"] for o in header.get("outputs", [])] or None
    return inputs, outputs


def encode_response(model_name: str, outputs) -> Response:
    """Returns the KServe v2 binary answer: the JSON header, then each output's bytes."""
    tensors = []
    blobs = []
    for name, array in outputs:
        array = np.ascontiguousarray(array)
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        tensors.append(
            {
                "name": name,
                "datatype": NUMPY_TO_KSERVE[array.dtype.newbyteorder("=")],
                "shape": list(array.shape),
                "parameters": {"binary_data_size": len(blob)},
            }
        )
        blobs.append(blob)
    head = json.dumps({"model_name": model_name, "outputs": tensors}).encode()
    return Response(
        content=head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


def request_rows(request) -> int:
    """Rows of a queued request (its inputs' first dimension), which the batch counts."""
    inputs, _ = request
    return next(iter(inputs.values())).shape[0]


@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING_REQUESTS)
class OnnxModel:
    def __init__(self, model_path: str, model_name: str, cpus: int, max_batch_size: int, batch_wait_s: float):
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpus
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.model_name = model_name
        self.run_batch.set_max_batch_size(max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(batch_wait_s)

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        try:
            json_len = int(request.headers.get("inference-header-content-length", "0"))
            inputs, wanted = decode_request(body, json_len)
            if sorted(inputs) != sorted(self.input_names):
                raise BadRequest(f"the model takes {self.input_names}, got {sorted(inputs)}")
            rows = {a.shape[0] if a.ndim else None for a in inputs.values()}
            if len(rows) != 1 or None in rows:
                raise BadRequest("the inputs disagree on the batch dimension")
            unknown = set(wanted or []) - set(self.output_names)
            if unknown:
                raise BadRequest(f"no outputs {sorted(unknown)}")
        except (BadRequest, ValueError, KeyError, TypeError) as e:
            return Response(content=json.dumps({"error": str(e)}), status_code=400, media_type="application/json")
        outputs = await self.run_batch((inputs, wanted))
        return encode_response(self.model_name, outputs)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0005, batch_size_fn=lambda batch: sum(map(request_rows, batch)))
    async def run_batch(self, requests):
        """Runs the queued requests as one batch per input shape; returns each one's outputs."""
        groups = {}
        for index, (inputs, _) in enumerate(requests):
            key = tuple((name, inputs[name].shape[1:], inputs[name].dtype) for name in self.input_names)
            groups.setdefault(key, []).append(index)
        results = [None] * len(requests)
        for indices in groups.values():
            feed = {
                name: np.concatenate([requests[i][0][name] for i in indices]) if len(indices) > 1 else requests[indices[0]][0][name]
                for name in self.input_names
            }
            # onnxruntime lets the GIL go while it runs: the replica keeps reading
            # requests meanwhile.
            values = await asyncio.to_thread(self.session.run, self.output_names, feed)
            start = 0
            for i in indices:
                rows = request_rows(requests[i])
                wanted = requests[i][1] or self.output_names
                by_name = dict(zip(self.output_names, values))
                results[i] = [(name, by_name[name][start : start + rows]) for name in wanted]
                start += rows
        return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cpus", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=0.5)
    parser.add_argument("--temp-dir", default=None)
    args = parser.parse_args()

    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=args.temp_dir,
    )
    # After ray.init, whose core worker installs its own SIGTERM handler (it
    # aborts the process): a signal stops Serve and Ray in order instead.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": args.port},
            logging_config={"log_level": "WARNING", "enable_access_log": False},
        )
        app = OnnxModel.options(
            ray_actor_options={"num_cpus": args.cpus},
            logging_config={"log_level": "WARNING", "enable_access_log": False},
        ).bind(args.model, args.name, args.cpus, args.max_batch_size, args.batch_wait_ms / 1000)
        serve.run(app, name=args.name, route_prefix="/", blocking=False)
        print("ready", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
