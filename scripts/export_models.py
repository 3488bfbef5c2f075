"""Exports the models of kiln's serving tests and benchmarks with the real exporters.

Run by the exporters venv's python (scripts/models.sh, kiln_exported_models) as
`python scripts/export_models.py OUT_DIR`. Every model has random weights from
fixed seeds (nothing comes from a model hub) and is written at opset 17:

  resnet18.onnx          torchvision ResNet-18, input [batch,3,224,224] float32
  bert.onnx              transformers BERT classifier, input_ids/attention_mask
                         int64 [batch,sequence], logits [batch,2]
  bert_seq64.onnx        the same BERT with the sequence fixed at 64
  text_clf.onnx          scikit-learn TfidfVectorizer + LogisticRegression through
                         skl2onnx: string input "text" [N,1], outputs "label"
                         (string) and "probabilities" (float tensor, no ZipMap)
  forest_zipmap.onnx     RandomForestClassifier through skl2onnx's default options:
                         "output_probability" is a sequence of maps (ZipMap)
  mlp_fp16.onnx          a small torch MLP in float16, input/output float16
  external/model.onnx    a torch MLP whose tensors live in external/model.onnx.data
  lstm_time_major.onnx   torch LSTM, input [time,batch,8] -> output [time,batch,16]
  axis0_norm.onnx        x - mean(x, axis 0): rows of a batch change each other

Each MODEL.onnx has a MODEL.expected.json beside it: a fixed sample input and
onnxruntime's CPU output for it (and a suggested tolerance), so that kiln can be
checked against onnxruntime. manifest.json lists the files, each model's inputs
and outputs as onnxruntime reports them, and the versions used. Progress goes to
stderr; the exit status is non-zero when anything failed.
"""

import hashlib
import io
import json
import os
import platform
import sys
import time
import warnings
from importlib import metadata

import numpy as np

OPSET = 17
ML_OPSET = 3
SEED = 0


def log(*args):
    print("export_models:", *args, file=sys.stderr, flush=True)


def seed_everything():
    import torch

    np.random.seed(SEED)
    torch.manual_seed(SEED)


def torch_export(module, args, path, input_names, output_names, dynamic_axes):
    """The TorchScript exporter (dynamo=False): it needs no onnxscript, and its
    graphs are plain opset-17 ONNX."""
    import torch

    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            path,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def ort_session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def encode(value):
    """A JSON form of one onnxruntime value: a tensor (dtype, shape, flat data in
    C order) or a sequence of maps (ZipMap's output)."""
    if isinstance(value, list):
        if all(isinstance(v, dict) for v in value):
            key_types = {type(k) for v in value for k in v}
            key_dtype = "int64" if key_types <= {int, np.int64} else "string"
            return {
                "type": f"seq(map({key_dtype},tensor(float)))",
                "data": [[[k if key_dtype == "string" else int(k), float(str(np.float32(x)))] for k, x in v.items()] for v in value],
            }
        value = np.asarray(value)
    array = np.asarray(value)
    if array.dtype.kind in ("U", "S", "O"):
        dtype, data = "string", [str(x) for x in array.reshape(-1)]
    elif array.dtype == np.float16:
        dtype, data = "float16", [float(x) for x in array.astype(np.float32).reshape(-1)]
    elif array.dtype == np.float32:
        # The shortest decimal that reads back as the same float32.
        dtype, data = "float32", [float(str(x)) for x in array.reshape(-1)]
    elif array.dtype.kind == "f":
        dtype, data = str(array.dtype), [float(x) for x in array.reshape(-1)]
    elif array.dtype == np.bool_:
        dtype, data = "bool", [bool(x) for x in array.reshape(-1)]
    else:
        dtype, data = str(array.dtype), [int(x) for x in array.reshape(-1)]
    onnx_name = {"float32": "float", "float64": "double"}.get(dtype, dtype)  # as onnxruntime names them
    return {"type": f"tensor({onnx_name})", "dtype": dtype, "shape": list(array.shape), "data": data}


def write_expected(out_dir, name, feeds, rtol, atol, reference=None, ref_rtol=None, ref_atol=None):
    """Runs the model in onnxruntime on `feeds`, writes NAME.expected.json, and checks
    onnxruntime's outputs against the framework's own (`reference`: output name ->
    array) when given."""
    path = os.path.join(out_dir, name + ".onnx")
    session = ort_session(path)
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, feeds)
    if reference is not None:
        for key, want in reference.items():
            got = outputs[names.index(key)]
            if np.asarray(want).dtype.kind in ("U", "S", "O", "i"):
                if not np.array_equal(np.asarray(got), np.asarray(want)):
                    raise AssertionError(f"{name}: onnxruntime's {key} differs from the framework's")
            else:
                np.testing.assert_allclose(
                    np.asarray(got, dtype=np.float64),
                    np.asarray(want, dtype=np.float64),
                    rtol=ref_rtol if ref_rtol is not None else rtol,
                    atol=ref_atol if ref_atol is not None else atol,
                    err_msg=f"{name}: onnxruntime's {key} against the framework's",
                )
    doc = {
        "model": name + ".onnx",
        "runtime": f"onnxruntime {onnxruntime_version()} CPUExecutionProvider, 1 thread",
        "tolerance": {"rtol": rtol, "atol": atol},
        "inputs": [{"name": k, **encode(v)} for k, v in feeds.items()],
        "outputs": [{"name": n, **encode(v)} for n, v in zip(names, outputs)],
    }
    with open(os.path.join(out_dir, name + ".expected.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    return outputs


def onnxruntime_version():
    import onnxruntime

    return onnxruntime.__version__


def float_tolerance(outputs, rel=1e-4):
    """An absolute tolerance scaled by the largest output, for float32 models."""
    scale = max(float(np.max(np.abs(np.asarray(o, dtype=np.float64)))) for o in outputs)
    return float(f"{rel * max(1.0, scale):.3g}")


def export_resnet18(out_dir):
    import torch
    import torchvision

    seed_everything()
    model = torchvision.models.resnet18(weights=None).eval()
    path = os.path.join(out_dir, "resnet18.onnx")
    dummy = torch.randn(1, 3, 224, 224)
    torch_export(model, (dummy,), path, ["input"], ["output"], {"input": {0: "batch"}, "output": {0: "batch"}})
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224), dtype=np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    atol = float_tolerance([want])
    write_expected(out_dir, "resnet18", {"input": x}, 1e-4, atol, {"output": want})


class BertLogits:
    """Wraps BertForSequenceClassification so that the graph has exactly
    (input_ids, attention_mask) -> logits."""

    @staticmethod
    def make():
        import torch
        import transformers

        seed_everything()
        config = transformers.BertConfig(
            vocab_size=30522,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=512,
            num_labels=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            # Wider than BERT's 0.02, so that the logits depend visibly on the
            # input (and on the attention mask) rather than being near-constant.
            initializer_range=0.1,
        )
        config._attn_implementation = "eager"
        bert = transformers.BertForSequenceClassification(config).eval()

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).logits

        return Wrapper().eval(), config


def bert_sample(rng, batch, sequence, vocab):
    ids = rng.integers(1000, vocab, size=(batch, sequence), dtype=np.int64)
    ids[:, 0] = 101  # [CLS]
    mask = np.ones((batch, sequence), dtype=np.int64)
    if batch > 1:  # the last row is padded: a real mix of lengths
        pad = sequence // 4
        mask[-1, sequence - pad :] = 0
        ids[-1, sequence - pad :] = 0
    return ids, mask


def export_bert(out_dir, sequence=None):
    import torch

    model, config = BertLogits.make()
    name = "bert" if sequence is None else f"bert_seq{sequence}"
    path = os.path.join(out_dir, name + ".onnx")
    trace_seq = sequence or 16
    ids, mask = bert_sample(np.random.default_rng(2), 2, trace_seq, config.vocab_size)
    axes = {0: "batch"} if sequence else {0: "batch", 1: "sequence"}
    torch_export(
        model,
        (torch.from_numpy(ids), torch.from_numpy(mask)),
        path,
        ["input_ids", "attention_mask"],
        ["logits"],
        {"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
    )
    # The sample differs from the tracing input: a batch of 3 and, for the
    # dynamic model, another sequence length.
    sample_seq = sequence or 24
    ids, mask = bert_sample(np.random.default_rng(3), 3, sample_seq, config.vocab_size)
    with torch.no_grad():
        want = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    atol = float_tolerance([want])
    write_expected(out_dir, name, {"input_ids": ids, "attention_mask": mask}, 1e-4, atol, {"logits": want})


TEXTS = {
    "sports": [
        "the striker scored a late goal to win the match",
        "the team trained hard before the championship final",
        "a record crowd watched the tennis semi final",
        "the coach praised the defence after the game",
        "she won the marathon in record time",
        "the goalkeeper saved a penalty in extra time",
    ],
    "weather": [
        "heavy rain and strong wind are expected tomorrow",
        "a sunny afternoon with a light breeze",
        "snow will fall on the hills overnight",
        "the forecast says thunderstorms in the evening",
        "temperatures drop below freezing this weekend",
        "fog in the morning then clear skies",
    ],
    "cooking": [
        "simmer the onions in butter until golden",
        "bake the bread for forty minutes in a hot oven",
        "whisk the eggs with sugar and a pinch of salt",
        "season the soup with pepper and fresh herbs",
        "roast the vegetables with olive oil and garlic",
        "let the dough rest before rolling it out",
    ],
    "computing": [
        "the server crashed after a memory leak",
        "compile the program and run the unit tests",
        "the database query returns rows in sorted order",
        "update the kernel driver to fix the network card",
        "the compiler reports a type error on line ten",
        "deploy the service behind a load balancer",
    ],
}


def export_text_clf(out_dir):
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    texts = [t for ts in TEXTS.values() for t in ts]
    labels = [label for label, ts in TEXTS.items() for _ in ts]
    tfidf = TfidfVectorizer()
    clf = LogisticRegression(C=10.0, max_iter=1000, random_state=SEED)
    pipe = Pipeline([("tfidf", tfidf), ("clf", clf)]).fit(texts, labels)
    onx = convert_sklearn(
        pipe,
        "text_clf",
        initial_types=[("text", StringTensorType([None, 1]))],
        final_types=[("label", StringTensorType([None])), ("probabilities", FloatTensorType([None, len(TEXTS)]))],
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
        # Without a locale, onnxruntime's StringNormalizer asks for en_US.UTF-8,
        # which a bare Debian lacks ("Failed to construct locale"); C.UTF-8 is
        # built into glibc.
        options={id(tfidf): {"locale": "C.UTF-8"}, id(clf): {"zipmap": False}},
    )
    save(onx, os.path.join(out_dir, "text_clf.onnx"))
    sample = [
        "the striker scored twice in the final",
        "rain and wind tonight",
        "bake the cake in the oven",
        "the server returns an error",
        "",
    ]
    x = np.array(sample, dtype=object).reshape(-1, 1)
    want_label = pipe.predict(sample)
    want_proba = pipe.predict_proba(sample).astype(np.float32)
    write_expected(
        out_dir,
        "text_clf",
        {"text": x},
        1e-4,
        1e-5,
        {"label": want_label.astype(object), "probabilities": want_proba},
    )


def export_forest_zipmap(out_dir):
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 0.8).astype(np.int64)
    forest = RandomForestClassifier(n_estimators=10, max_depth=5, random_state=SEED).fit(x, y)
    onx = convert_sklearn(
        forest,
        "forest_zipmap",
        initial_types=[("input", FloatTensorType([None, 4]))],
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
    )
    save(onx, os.path.join(out_dir, "forest_zipmap.onnx"))
    # Two rows of each class the forest predicts.
    candidates = rng.standard_normal((200, 4)).astype(np.float32)
    predicted = forest.predict(candidates)
    sample = np.concatenate([candidates[predicted == c][:2] for c in forest.classes_])
    outputs = write_expected(
        out_dir, "forest_zipmap", {"input": sample}, 1e-5, 1e-5, {"output_label": forest.predict(sample)}
    )
    proba = np.array([[m[k] for k in sorted(m)] for m in outputs[1]])
    np.testing.assert_allclose(proba, forest.predict_proba(sample), rtol=1e-5, atol=1e-5)


def mlp(sizes):
    import torch

    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def export_mlp_fp16(out_dir):
    import torch

    seed_everything()
    model = mlp([16, 32, 4]).eval()
    half = mlp([16, 32, 4]).eval()
    half.load_state_dict(model.state_dict())
    half = half.half()
    path = os.path.join(out_dir, "mlp_fp16.onnx")
    torch_export(
        half,
        (torch.zeros(1, 16, dtype=torch.float16),),
        path,
        ["input"],
        ["output"],
        {"input": {0: "batch"}, "output": {0: "batch"}},
    )
    x = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float16)
    with torch.no_grad():
        want = model(torch.from_numpy(x.astype(np.float32))).numpy()  # float32 reference
    write_expected(out_dir, "mlp_fp16", {"input": x}, 1e-2, 1e-2, {"output": want}, ref_rtol=2e-2, ref_atol=2e-2)


def export_external(out_dir):
    import onnx
    import torch

    seed_everything()
    model = mlp([64, 32, 8]).eval()
    buffer = io.BytesIO()
    torch_export(
        model,
        (torch.zeros(1, 64),),
        buffer,
        ["input"],
        ["output"],
        {"input": {0: "batch"}, "output": {0: "batch"}},
    )
    proto = onnx.load_model_from_string(buffer.getvalue())
    os.makedirs(os.path.join(out_dir, "external"), exist_ok=True)
    onnx.save_model(
        proto,
        os.path.join(out_dir, "external", "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    onnx.checker.check_model(os.path.join(out_dir, "external", "model.onnx"))
    x = np.random.default_rng(6).standard_normal((3, 64)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    write_expected(out_dir, "external/model", {"input": x}, 1e-4, float_tolerance([want]), {"output": want})


def export_lstm(out_dir):
    import torch

    seed_everything()

    class Lstm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(input_size=8, hidden_size=16, batch_first=False)

        def forward(self, x):
            return self.lstm(x)[0]

    model = Lstm().eval()
    axes = {0: "time", 1: "batch"}
    path = os.path.join(out_dir, "lstm_time_major.onnx")
    torch_export(model, (torch.zeros(5, 2, 8),), path, ["input"], ["output"], {"input": axes, "output": axes})
    x = np.random.default_rng(7).standard_normal((7, 3, 8)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    write_expected(out_dir, "lstm_time_major", {"input": x}, 1e-4, 1e-5, {"output": want})


def export_axis0_norm(out_dir):
    import torch

    class Axis0Norm(torch.nn.Module):
        def forward(self, x):
            return x - x.mean(dim=0, keepdim=True)

    model = Axis0Norm()
    path = os.path.join(out_dir, "axis0_norm.onnx")
    axes = {0: "batch"}
    torch_export(model, (torch.zeros(2, 8),), path, ["input"], ["output"], {"input": axes, "output": axes})
    x = np.random.default_rng(8).standard_normal((4, 8)).astype(np.float32)
    want = x - x.mean(axis=0, keepdims=True)
    write_expected(out_dir, "axis0_norm", {"input": x}, 1e-5, 1e-6, {"output": want})


def save(proto, path):
    import onnx

    # skl2onnx lists the opset imports in set order, which varies from run to run.
    opsets = sorted(proto.opset_import, key=lambda o: o.domain)
    del proto.opset_import[:]
    proto.opset_import.extend(opsets)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, path)


def describe(args):
    return [{"name": a.name, "type": a.type, "shape": list(a.shape)} for a in args]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MODELS = [
    ("resnet18", export_resnet18),
    ("bert", export_bert),
    ("bert_seq64", lambda d: export_bert(d, 64)),
    ("text_clf", export_text_clf),
    ("forest_zipmap", export_forest_zipmap),
    ("mlp_fp16", export_mlp_fp16),
    ("external/model", export_external),
    ("lstm_time_major", export_lstm),
    ("axis0_norm", export_axis0_norm),
]

PACKAGES = ["torch", "torchvision", "transformers", "onnx", "onnxruntime", "scikit-learn", "skl2onnx", "numpy"]


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: export_models.py OUT_DIR")
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    import onnx
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.monotonic()
    models = {}
    for name, export in MODELS:
        t = time.monotonic()
        export(out_dir)
        path = os.path.join(out_dir, name + ".onnx")
        session = ort_session(path)
        proto = onnx.load_model(path, load_external_data=False)
        models[name] = {
            "file": name + ".onnx",
            "expected": name + ".expected.json",
            "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
            "inputs": describe(session.get_inputs()),
            "outputs": describe(session.get_outputs()),
        }
        log(f"{name}: {time.monotonic() - t:.1f}s")
    files = []
    for root, _, names in os.walk(out_dir):
        for n in sorted(names):
            p = os.path.join(root, n)
            files.append({"path": os.path.relpath(p, out_dir), "bytes": os.path.getsize(p), "sha256": sha256(p)})
    manifest = {
        "opset": OPSET,
        "seed": SEED,
        "versions": {p: metadata.version(p) for p in PACKAGES} | {"python": platform.python_version()},
        "models": models,
        "files": sorted(files, key=lambda f: f["path"]),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    log(f"all models in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()
