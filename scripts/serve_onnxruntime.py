"""The serving benchmark's peer: a FastAPI + uvicorn server that answers the KServe
v2 JSON infer call with onnxruntime, with the faster `async def` handler.
Usage: serve_onnxruntime.py MODEL.onnx PORT"""
import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
app = FastAPI()


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request):
    body = await request.json()
    tensor = body["inputs"][0]
    x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    (y,) = session.run(None, {"input": x})
    return {
        "model_name": name,
        "outputs": [
            {"name": "output", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}
        ],
    }


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
