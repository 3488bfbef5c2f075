#!/usr/bin/env python3
"""PyTorch's side of the training-speed benchmark.

Runs the step that kiln's trainer benchmark (worker/src/train/bench.rs) times:
MLP 64-256-256-10 with ReLU, batches of 256 random examples cycling through 8
batches, softmax cross-entropy summed and scaled by 1/batch, AdamW (lr 1e-3,
weight decay 0.01), 20 untimed warm-up steps, then the timed ones. Prints
samples per second. With --device cuda:N the data, model and optimizer live on
that GPU; each step reads its loss back, which waits for the GPU, as kiln's
step does.

    python3 scripts/bench_train_torch.py --threads 1 --steps 2000
    python3 scripts/bench_train_torch.py --device cuda:0 --steps 2000
"""

import argparse
import time

import torch
from torch import nn

INPUTS, HIDDEN, CLASSES = 64, 256, 10
BATCH, BATCHES, WARMUP_STEPS = 256, 8, 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = (torch.rand(BATCH * BATCHES, INPUTS) * 2 - 1).to(device)
    y = torch.randint(0, CLASSES, (BATCH * BATCHES,)).to(device)
    model = nn.Sequential(
        nn.Linear(INPUTS, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    ).to(device)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def step(i: int) -> float:
        b = i % BATCHES
        xs = x[b * BATCH : (b + 1) * BATCH]
        ys = y[b * BATCH : (b + 1) * BATCH]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xs), ys) * (1.0 / BATCH)
        loss.backward()
        opt.step()
        return loss.item()

    for i in range(WARMUP_STEPS):
        step(i)
    start = time.perf_counter()
    first = last = float("nan")
    for i in range(args.steps):
        last = step(i)
        if i == 0:
            first = last
    seconds = time.perf_counter() - start
    print(
        f"torch {torch.__version__}: {device}, threads {torch.get_num_threads()}, "
        f"{args.steps} steps of {BATCH} in {seconds:.3f} s: "
        f"{args.steps * BATCH / seconds:.0f} samples/s "
        f"(loss {first:.4f} -> {last:.4f})"
    )


if __name__ == "__main__":
    main()
