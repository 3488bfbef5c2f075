"""All-reduce timing of torch.distributed's gloo backend on loopback, the peer of
`kiln bench allreduce`. Same sizes, world, warm-up and timing rule: each rank
times one all-reduce after a barrier; an iteration's time is the slowest rank's.

Usage: python3 bench_gloo.py WORLD SIZES_BYTES(comma) ITERS WARMUP PORT
Prints one CSV line per size: world,bytes,median_s,min_s,p90_s
"""
import os
import sys
import time


def rank_main(rank, world, sizes, iters, warmup, port):
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for size in sizes:
        buf = torch.full((size // 4,), float(rank + 1), dtype=torch.float32)
        dist.all_reduce(buf)
        expected = world * (world + 1) / 2
        if abs(buf[0].item() - expected) > 1e-3 or abs(buf[-1].item() - expected) > 1e-3:
            raise SystemExit(f"gloo summed {buf[0].item()}, expected {expected}")
        for _ in range(warmup):
            dist.all_reduce(buf)
        times = []
        for _ in range(iters):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - t0)
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            ts = sorted(slowest.tolist())
            median = ts[len(ts) // 2]
            p90 = ts[min(len(ts) - 1, int(len(ts) * 0.9))]
            print(f"{world},{size},{median:.6f},{ts[0]:.6f},{p90:.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    world = int(sys.argv[1])
    sizes = [int(s) for s in sys.argv[2].split(",")]
    iters, warmup, port = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    mp.spawn(rank_main, args=(world, sizes, iters, warmup, port), nprocs=world, join=True)
