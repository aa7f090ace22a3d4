"""One table of every evaluation under a folder, to compare runs: a row per (run, mode) with the pre-training
settings eval_linear.py records in its JSON ('pretraining') beside the clean, PGD and AutoAttack accuracies.

    python results.py runs                      # Markdown, e.g. ACL, A-InfoNCE and AIR evaluated under runs/
    python results.py runs --csv > results.csv

An evaluation JSON from before the record (or of a released checkpoint) leaves the settings it lacks blank.
"""
import argparse
import csv
import json
import os
import sys

from common import UserError
from machinery import main_guard

SETTINGS = ["script", "method", "dataset", "epochs", "eps", "pgd_alpha", "pgd_steps", "seed", "width"]


def evaluations(folder):
    """(path, entry) for every mode entry of every eval_linear.py JSON under `folder`, in path order."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for path in [os.path.join(root, name) for name in sorted(files) if name.endswith(".json")]:
            try:
                with open(path) as f:
                    record = json.load(f)
            except (OSError, ValueError):  # unreadable, or not JSON: not an evaluation
                continue
            for entry in record.get("results", [record]) if isinstance(record, dict) else []:
                if isinstance(entry, dict) and {"checkpoint", "mode", "clean_acc", "pgd20_acc"} <= entry.keys():
                    yield path, entry


def results_table(folder, as_csv=False):
    """The rows (dicts) of every evaluation under `folder`, printed as a Markdown table or as CSV."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder; give the folder the runs are in, e.g. python results.py runs")
    pct = lambda v: None if v is None else round(100 * v, 2)  # noqa: E731
    rows = []
    for path, e in evaluations(folder):
        p = e.get("pretraining") or {"method": e.get("method")}
        # the run: the JSON's folder when the checkpoint is there (the default --out; the run may have moved since)
        beside = os.path.exists(os.path.join(os.path.dirname(path), os.path.basename(e["checkpoint"])))
        rows.append({"run": os.path.relpath(os.path.dirname(path if beside else e["checkpoint"]), folder),
                     **{k: p.get(k) for k in SETTINGS},
                     "method flags": " ".join(f"{k}={v}" for k, v in (p.get("flags") or {}).items()),
                     "mode": e["mode"], "test eps": e.get("eps"), "test step": e.get("pgd_alpha"), "test steps": e.get("pgd_steps"),
                     "clean %": pct(e["clean_acc"]), "PGD %": pct(e["pgd20_acc"]),
                     "AutoAttack %": pct(e.get("autoattack_acc")), "json": os.path.relpath(path, folder)})
    if not rows:
        raise UserError(f"no evaluation JSON under {folder}; run eval_linear.py on a checkpoint there first")
    cells = [list(rows[0])] + [["" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in row.values()]
                               for row in rows]
    if as_csv:
        csv.writer(sys.stdout, lineterminator="\n").writerows(cells)
    else:
        cells.insert(1, ["---"] * len(cells[0]))
        print(*("| " + " | ".join(row) + " |" for row in cells), sep="\n")
    sys.stdout.flush()
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where eval_linear.py's JSON files are searched for, at any depth, e.g. runs")
    parser.add_argument("--csv", action="store_true", help="CSV instead of a Markdown table")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return results_table(args.folder, args.csv)


if __name__ == "__main__":
    main_guard(main)
