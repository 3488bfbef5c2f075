"""No shard ran twice: checks a training job's shards from what the workers
logged (`docker logs -t`, each line prefixed with the worker's name) and Docker's
events (`die`, `pause`, `unpause` of the containers).

    shard_check.py JOB WORKER_LOGS EVENTS [--running]

With --running (while the job runs) a run that has not stopped yet is running
now: no error by itself, but no later attempt may have started beside it.

A shard run is (worker, attempt, rank), from its first "starting a training
shard" line to its last "a training shard ended" line, or to its container's
death when it has none (killed or restarted with the container); a worker that
restarts while the attempt still runs starts the same shard again, which stays
one run. A shard stopped on a lapsed lease
after a pause did nothing from the pause on (frozen, then stopped before its next
step could reach a peer), so it counts as stopped at the pause. The checks:
- no attempt and rank started on two workers;
- every run stopped;
- no shard of an attempt started before every shard of the earlier attempts had
  stopped.
Prints what failed and a summary line last; exits 1 when a check failed.
"""
import re
import sys
from datetime import datetime, timezone


def seconds(stamp):
    """Docker's RFC 3339 timestamp (UTC, nanoseconds) as epoch seconds."""
    whole, _, frac = stamp.rstrip("Z").partition(".")
    t = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return t.timestamp() + float("0." + (frac or "0"))


def main(job, logs, events, running_ok=False):
    pattern = re.compile(
        r"(starting a training shard|a training shard ended|stopping a training shard: no answer)"
        r".*? job=%s attempt=(\d+) rank=(\d+)" % re.escape(job)
    )
    runs = {}
    with open(logs) as f:
        for line in f:
            parts = line.split(" ", 2)
            if len(parts) < 3:
                continue
            worker, stamp, rest = parts
            m = pattern.search(rest)
            if not m:
                continue
            what, attempt, rank = m.group(1), int(m.group(2)), int(m.group(3))
            run = runs.setdefault((worker, attempt, rank), {})
            # A worker that restarts with its shard's attempt still running
            # starts the same shard again: one run from its first start to its
            # last end.
            t = seconds(stamp)
            if what.startswith("starting"):
                run.setdefault("start", t)
            elif what.startswith("stopping"):
                run.setdefault("lapse", t)
            else:
                run["end"] = t

    happened = {}
    with open(events) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 3:
                continue
            name, action, nanos = parts
            worker = re.search(r"worker-\d+", name)
            if worker:
                happened.setdefault(worker.group(0), []).append((int(nanos) / 1e9, action))

    problems = []
    for (worker, attempt, rank), run in sorted(runs.items()):
        if "start" not in run:
            problems.append("rank %d of attempt %d ended on %s without a start" % (rank, attempt, worker))
            continue
        acts = sorted(happened.get(worker, []))
        if "end" not in run:
            run["end"] = next((t for t, a in acts if a == "die" and t >= run["start"]), None)
        if "lapse" in run:
            paused = [t for t, a in acts if a == "pause" and run["start"] <= t <= run["lapse"]]
            if paused and run["end"] is not None:
                run["end"] = min(run["end"], paused[-1])
        if run["end"] is None and not running_ok:
            problems.append("rank %d of attempt %d on %s never stopped" % (rank, attempt, worker))

    placed = {}
    for worker, attempt, rank in runs:
        placed.setdefault((attempt, rank), []).append(worker)
    for (attempt, rank), workers in sorted(placed.items()):
        if len(workers) > 1:
            problems.append(
                "rank %d of attempt %d started on %s" % (rank, attempt, " and ".join(sorted(workers)))
            )

    gaps = []
    for (w1, a1, r1), early in sorted(runs.items()):
        for (w2, a2, r2), late in sorted(runs.items()):
            if a1 < a2 and "start" in early and "start" in late:
                end = early["end"] if early.get("end") is not None else float("inf")
                gap = late["start"] - end
                gaps.append(gap)
                if gap < 0:
                    problems.append(
                        "rank %d of attempt %d (%s) started %s rank %d of attempt %d (%s) stopped"
                        % (r2, a2, w2, "before" if gap == float("-inf") else "%.3f s before" % -gap,
                           r1, a1, w1)
                    )
    for p in problems:
        print(p)
    attempts = {a for (_, a, _) in runs}
    print(
        "%d shard runs over %d attempts; %d pairs across attempts, least gap %s%s"
        % (
            len(runs),
            len(attempts),
            len(gaps),
            "%.3f s" % min(gaps) if gaps and min(gaps) != float("-inf") else "-",
            "; FAILED" if problems else "",
        )
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4], running_ok="--running" in sys.argv[4:]))
