"""Writes the serving benchmarks' requests as KServe v2 binary bodies into WORK:
for each of mlp (one row of 32 features, scripts/serving_model.py's input),
resnet (one 3x224x224 image) and bert (input_ids and attention_mask, one sequence
of 64), NAME.bin (the JSON header, then the tensors' little-endian bytes) and
NAME.len (the header's length, for Inference-Header-Content-Length). Seeded, so
every benchmark sends the same bytes.

    python kserve_bodies.py WORK"""
import json
import sys

import numpy as np


def body(work, name, tensors, output):
    header = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": d,
             "parameters": {"binary_data_size": a.nbytes}}
            for n, d, a in tensors
        ],
        "outputs": [{"name": output, "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    data = b"".join(a.astype(a.dtype.newbyteorder("<")).tobytes() for _, _, a in tensors)
    with open(f"{work}/{name}.bin", "wb") as f:
        f.write(head + data)
    with open(f"{work}/{name}.len", "w") as f:
        f.write(str(len(head)))


def main():
    work = sys.argv[1]
    rng = np.random.default_rng(1)
    body(work, "mlp", [("input", "FP32", rng.standard_normal((1, 32)).astype(np.float32))], "output")
    image = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    body(work, "resnet", [("input", "FP32", image)], "output")
    ids = rng.integers(1000, 30522, size=(1, 64), dtype=np.int64)
    ids[:, 0] = 101
    mask = np.ones((1, 64), np.int64)
    body(work, "bert", [("input_ids", "INT64", ids), ("attention_mask", "INT64", mask)], "logits")


if __name__ == "__main__":
    main()
