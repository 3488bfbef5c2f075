"""The peer of `kiln bench drift`: Evidently's DataDriftPreset on the same tables.

Usage: python bench_drift_evidently.py DIR ROWS FEATURES

DIR holds ref.f32 and cur.f32, ROWS x FEATURES little-endian float32 values each,
row-major, as `kiln bench drift` writes them. Prints JSON: the seconds
Report.run took (the tables already in pandas), Evidently's version, and the
indices of the columns it flags, by each ValueDrift's own method and threshold
(p-value tests drift below the threshold, distances at or above it).

Needs `pip install evidently "pandas<3"` (tested with evidently 0.7.23).
"""

import json
import sys
import time

import numpy as np
import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset
import evidently


def table(path, rows, features):
    values = np.fromfile(path, dtype="<f4").reshape(rows, features)
    return pd.DataFrame(values, columns=[f"f{j}" for j in range(features)])


def main():
    folder, rows, features = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    reference = table(f"{folder}/ref.f32", rows, features)
    current = table(f"{folder}/cur.f32", rows, features)
    started = time.perf_counter()
    snapshot = Report([DataDriftPreset()]).run(
        current_data=current, reference_data=reference
    )
    seconds = time.perf_counter() - started
    drifted = []
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if not config["type"].endswith("ValueDrift"):
            continue
        value, threshold = metric["value"], config["threshold"]
        if "p_value" in config["method"]:
            flagged = value < threshold
        else:
            flagged = value >= threshold
        if flagged:
            drifted.append(int(config["column"][1:]))
    print(
        json.dumps(
            {
                "seconds": seconds,
                "version": evidently.__version__,
                "drifted": sorted(drifted),
            }
        )
    )


if __name__ == "__main__":
    main()
