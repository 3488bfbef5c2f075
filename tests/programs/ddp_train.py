"""A PyTorch DistributedDataParallel training script as users write them, run by
kiln's command jobs in the tests: torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, ...), the gloo backend on CPUs, the dataset staged at
KILN_DATA_DIR, checkpoints renamed into KILN_CHECKPOINT_DIR, the model exported
to KILN_OUTPUT_DIR/model.onnx by rank 0.

It prints, for the test to check: its rank's torchrun variables, the step it
resumed from, and a digest of its final weights (every rank must print the same).
"""

import csv
import glob
import hashlib
import os
import shutil
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn


def load(data_dir):
    path = sorted(glob.glob(os.path.join(data_dir, "**", "*.csv"), recursive=True))[0]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    features = [k for k in rows[0] if k != "kind"]
    classes = sorted({r["kind"] for r in rows})
    x = torch.tensor([[float(r[k]) for k in features] for r in rows])
    y = torch.tensor([classes.index(r["kind"]) for r in rows])
    return x, y, features, classes


def newest_checkpoint(root):
    found = []
    for name in os.listdir(root):
        if name.startswith("step-"):
            found.append((int(name.split("-")[1]), os.path.join(root, name)))
    return max(found) if found else None


def main():
    epochs = int(sys.argv[sys.argv.index("--epochs") + 1]) if "--epochs" in sys.argv else 3
    pause = float(os.environ.get("STEP_PAUSE", "0"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    print(
        f"env rank={os.environ['RANK']} world={os.environ['WORLD_SIZE']} "
        f"local_rank={os.environ['LOCAL_RANK']} node_rank={os.environ.get('NODE_RANK', os.environ.get('GROUP_RANK'))} "
        f"master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        flush=True,
    )
    x, y, features, classes = load(os.environ["KILN_DATA_DIR"])
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(len(features), 16), nn.Tanh(), nn.Linear(16, len(classes)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = 0
    ckpt_dir = os.environ["KILN_CHECKPOINT_DIR"]
    newest = newest_checkpoint(ckpt_dir)
    if newest:
        state = torch.load(os.path.join(newest[1], "state.pt"))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    print(f"resumed from step {step}", flush=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    mine = torch.arange(rank, len(x), world)
    batch = 32
    steps_per_epoch = (len(mine) + batch - 1) // batch
    total = epochs * steps_per_epoch
    first_step = step
    steady_from = None
    while step < total:
        if step == first_step:
            # The benchmark reads when training began (wall clock, seconds).
            print(f"first step at {time.time():.3f}", flush=True)
        if steady_from is None and step - first_step == steps_per_epoch:
            steady_from = (time.perf_counter(), step)
        i = step % steps_per_epoch
        idx = mine[i * batch : (i + 1) * batch]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x[idx]), y[idx])
        loss.backward()
        opt.step()
        step += 1
        if pause:
            time.sleep(pause)
        if step % steps_per_epoch == 0:
            print(f"step {step}/{total} loss {loss.item():.4f}", flush=True)
            if rank == 0:
                tmp = os.path.join(ckpt_dir, f".tmp-step-{step}")
                os.makedirs(tmp, exist_ok=True)
                torch.save(
                    {"model": model.state_dict(), "opt": opt.state_dict(), "step": step},
                    os.path.join(tmp, "state.pt"),
                )
                os.rename(tmp, os.path.join(ckpt_dir, f"step-{step}"))
    if steady_from is not None and rank == 0:
        seconds = time.perf_counter() - steady_from[0]
        samples = (step - steady_from[1]) * batch * world
        print(f"samples/s {samples / max(seconds, 1e-9):.1f}", flush=True)
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    print(f"weights digest {hashlib.sha256(weights).hexdigest()}", flush=True)
    if rank == 0:
        out = os.path.join(os.environ["KILN_OUTPUT_DIR"], "model.onnx")
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x[:1],),
                out,
                input_names=["features"],
                output_names=["logits"],
                dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
