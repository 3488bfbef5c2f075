"""Calls a kiln deployment with NVIDIA's tritonclient, unchanged, over HTTP (binary
and JSON tensors) and gRPC (TLS), and compares the answers with onnxruntime.

Usage, from a directory with a local cluster (`kiln local up`) where the model
written by scripts/serving_model.py is deployed as `mlp` with `--public`:

    kiln status --json > status.json
    python tritonclient_check.py status.json mlp.onnx .kiln/certs/ca.pem

Needs: pip install "tritonclient[http,grpc]" onnxruntime numpy."""
import json
import sys
import time

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as tg
import tritonclient.http as th


def main(status, model_file, ca):
    worker = json.load(open(status))["workers"][0]
    x = np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32)
    want = ort.InferenceSession(model_file).run(None, {"input": x})[0]
    http = th.InferenceServerClient(worker["inference_http_addr"])
    for _ in range(50):
        if http.is_model_ready("mlp"):
            break
        time.sleep(0.1)
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready("mlp")
    print("http metadata", http.get_model_metadata("mlp"))
    for binary in (True, False):
        tensor = th.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        out = th.InferRequestedOutput("output", binary_data=binary)
        got = http.infer("mlp", [tensor], outputs=[out]).as_numpy("output")
        diff = float(np.abs(got - want).max())
        print("http", "binary" if binary else "json", "max difference from onnxruntime", diff)
        assert diff < 1e-5
    grpc = tg.InferenceServerClient(worker["inference_grpc_addr"], ssl=True, root_certificates=ca)
    assert grpc.is_server_live() and grpc.is_model_ready("mlp")
    tensor = tg.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    got = grpc.infer("mlp", [tensor]).as_numpy("output")
    diff = float(np.abs(got - want).max())
    print("grpc max difference from onnxruntime", diff)
    assert diff < 1e-5
    try:
        http.infer("nope", [th.InferInput("input", [1, 32], "FP32")])
        raise AssertionError("an unknown model answered")
    except Exception as e:  # tritonclient raises its own InferenceServerException
        print("http unknown model:", e)


if __name__ == "__main__":
    main(*sys.argv[1:4])
