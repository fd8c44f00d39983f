"""Protocol metrics recomputed from dumped CSVs, written independently of recsys.metrics.

Plain Python over ``recommendations.csv`` (user_id,item_id,rank,score) and ``test.csv``
(user_id,item_id,...): every user in test counts, with whatever recommendations they got.

    python tests/independent_metrics.py DUMP_DIR [K]
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path


def recompute(directory: Path, k: int = 10) -> dict[str, float]:
    relevant: dict[str, set[str]] = defaultdict(set)
    with open(directory / "test.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            relevant[row["user_id"]].add(row["item_id"])

    ranked: dict[str, list[tuple[int, str]]] = defaultdict(list)
    with open(directory / "recommendations.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            ranked[row["user_id"]].append((int(row["rank"]), row["item_id"]))

    totals = {"map": 0.0, f"ndcg_at_{k}": 0.0, f"precision_at_{k}": 0.0, f"recall_at_{k}": 0.0}
    for user, items in relevant.items():
        top = [item for _, item in sorted(ranked.get(user, []))[:k]]
        hits = 0
        precision_sum = 0.0
        dcg = 0.0
        for position, item in enumerate(top, start=1):
            if item in items:
                hits += 1
                precision_sum += hits / position
                dcg += 1.0 / math.log2(position + 1)
        ideal = sum(1.0 / math.log2(position + 1) for position in range(1, min(k, len(items)) + 1))
        totals["map"] += precision_sum / len(items)
        totals[f"ndcg_at_{k}"] += dcg / ideal
        totals[f"precision_at_{k}"] += hits / k
        totals[f"recall_at_{k}"] += hits / len(items)
    return {name: total / len(relevant) for name, total in totals.items()}


if __name__ == "__main__":
    print(json.dumps(recompute(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 10)))
