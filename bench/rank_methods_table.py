"""Collect `jpeft demo --method lora|adalora|sora` runs into the RESULTS.md table.

usage: python bench/rank_methods_table.py RUN_DIR...   (each RUN_DIR/../RUN_DIR.log holds the demo's stdout)
Prints one row per run (method, seed, macro P/R/F1 from the demo's table, trainable parameters during
training, parameters of the exported adapter, final total rank) and a mean row per method.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path


def parse(run: Path) -> dict:
    log = Path(str(run) + ".log").read_text()
    m = re.search(r"^\+ (\w+)\s*\|\s*([\d.]+)%\s*\|\s*([\d.]+)%\s*\|\s*([\d.]+)%", log, re.M)
    if m is None:
        raise SystemExit(f"{run}.log: no '+ method | P | R | F1' row; did the demo finish?")
    cfg = json.loads((run / "run.json").read_text())
    ranks = json.loads((run / "ranks.json").read_text()) if (run / "ranks.json").exists() else None
    trained = int(cfg["trainable_parameters"])
    return {"method": m.group(1), "seed": cfg["seed"], "P": float(m.group(2)), "R": float(m.group(3)),
            "F1": float(m.group(4)), "trained": trained,
            "exported": ranks["exported_lora_parameters"] if ranks else trained,
            "rank": f"{ranks['total_rank']}/{ranks['initial_rank']}" if ranks else "-"}


def main(runs: list[str]) -> None:
    rows = [parse(Path(r)) for r in runs]
    print("| method | seed | macro P | macro R | macro F1 | trainable params | exported params (LoRA form) "
          "| total rank kept |")
    print("|---|---|---|---|---|---|---|---|")
    by = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
        print(f"| {r['method']} | {r['seed']} | {r['P']:.2f} | {r['R']:.2f} | {r['F1']:.2f} | {r['trained']:,} | "
              f"{r['exported']:,} | {r['rank']} |")
    for meth, rs in by.items():
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("P", "R", "F1")}
        print(f"| **{meth} mean** | {len(rs)} seeds | {mean['P']:.2f} | {mean['R']:.2f} | {mean['F1']:.2f} | | | |")


if __name__ == "__main__":
    main(sys.argv[1:])
