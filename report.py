"""`python qml.py report RUNDIR`: the scaling table, CSV and plot of a submit_qml.sbatch sweep, and the answer to
the challenge's question (which task count trains fastest at the greatest best average accuracy)."""

import csv
import glob
import io
import json
import os
import statistics

import checkpoints
from errors import UsageError
from options import ArgumentParser

SIGNIFICANCE = 0.05  # Welch's t-test: a p-value below this tells a count's mean best accuracy from the top one's


def load_runs(rundir):
    """One dict per metrics JSON in rundir (tasks, global batch, training seconds, best val accuracy and loss,
    final-epoch val accuracy), sorted by task count."""
    runs = []
    for path in sorted(glob.glob(os.path.join(rundir, "*.json"))):
        try:
            with open(path) as file:
                metrics = json.load(file)
            tasks = metrics["world_size"]
            runs.append(dict(tasks=tasks, global_batch=metrics["config"]["batch_size"] * tasks,
                             seconds=metrics["training_seconds"], best_val_acc=metrics["best_val_acc"],
                             best_val_loss=metrics["best_val_loss"], final_val_acc=metrics["epochs"][-1]["val_acc"]))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            raise UsageError(f"{path} is not a metrics JSON written by qml.py --metrics-json; move it away") from None
    if not runs:
        raise UsageError(f"no metrics JSON files in {rundir}; run the sweep with submit_qml.sbatch 1,2,4,8")
    return sorted(runs, key=lambda run: run["tasks"])


def mean_and_std(runs, key, digits):
    """{key: mean, key_std: sample standard deviation} of runs[...][key]; the std is None for a single run."""
    values = [run[key] for run in runs]
    std = round(statistics.stdev(values), digits) if len(values) > 1 else None
    return {key: round(statistics.mean(values), digits), f"{key}_std": std}


def scaling_rows(runs):
    """One row per task count: its runs' means and spreads, and the speedup and parallel efficiency of its
    mean training time relative to the smallest task count's."""
    groups = {}
    for run in runs:
        groups.setdefault(run["tasks"], []).append(run)
    base_tasks = min(groups)
    base_seconds = statistics.mean(run["seconds"] for run in groups[base_tasks])
    rows = []
    for tasks, group in sorted(groups.items()):
        batches = sorted({run["global_batch"] for run in group})
        if len(batches) > 1:
            raise UsageError(f"the {tasks}-task runs have different global batches {batches}: they are different "
                             f"experiments; report each from its own folder")
        speedup = base_seconds / statistics.mean(run["seconds"] for run in group)
        rows.append(dict(tasks=tasks, runs=len(group), global_batch=batches[0], **mean_and_std(group, "seconds", 2),
                         speedup=round(speedup, 2), efficiency=round(speedup * base_tasks / tasks, 2),
                         **mean_and_std(group, "best_val_acc", 4), **mean_and_std(group, "final_val_acc", 4),
                         **mean_and_std(group, "best_val_loss", 4)))
    return rows


def welch_p_value(a, b, key):
    """Two-sided p-value of Welch's t-test (scipy's, from the rows' means, sample stds and run counts) that rows
    a and b, each of two runs or more, share the mean of key."""
    from scipy import stats  # about 0.3 s to import: only reports with repeats need it

    if a[f"{key}_std"] == 0 and b[f"{key}_std"] == 0:  # no spread at all: the means are equal or surely different
        return 1.0 if a[key] == b[key] else 0.0
    return float(stats.ttest_ind_from_stats(a[key], a[f"{key}_std"], a["runs"], b[key], b[f"{key}_std"], b["runs"],
                                            equal_var=False).pvalue)


def task_list(rows):
    return ", ".join(str(row["tasks"]) for row in rows)


def answer_line(rows):
    """The challenge's question: the fastest count at the greatest best accuracy. With repeats, "greatest" means
    not distinguishable from the top mean best accuracy by Welch's t-test at SIGNIFICANCE."""
    if all(row["runs"] == 1 for row in rows):  # the tutorial's single runs: today's reading, unchanged
        top = max(row["best_val_acc"] for row in rows)
        best = min((row for row in rows if row["best_val_acc"] == top), key=lambda row: row["seconds"])
        return (f"Answer: {best['tasks']} task(s) train fastest ({best['seconds']:.1f} s) at the greatest "
                f"best average accuracy ({top:.4f})")
    single = [row for row in rows if row["runs"] == 1]
    if single:
        return (f"Answer: none: {task_list(single)} task(s) have a single run, whose spread is unknown, beside "
                f"repeated counts; run every count at least twice (--repeats 2)")
    top = max(rows, key=lambda row: row["best_val_acc"])
    tied = [row for row in rows if welch_p_value(row, top, "best_val_acc") >= SIGNIFICANCE]
    worse = [row for row in rows if row not in tied]
    fastest = min(tied, key=lambda row: row["seconds"])
    verdict = (f"{task_list(worse)} task(s) are less accurate" if worse
               else "all accuracy differences between the task counts are within the noise")
    return (f"Answer: {fastest['tasks']} task(s) train fastest ({fastest['seconds']:.1f} s, mean of "
            f"{fastest['runs']} runs) among the counts whose mean best accuracy is within the noise of the top one "
            f"({top['tasks']} task(s): {top['best_val_acc']:.4f} ± {top['best_val_acc_std']:.4f} std) by Welch's "
            f"t-test at {SIGNIFICANCE:.0%}: {task_list(tied)} task(s); {verdict}")


def plot_scaling(rows, path):
    import matplotlib

    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    tasks = [row["tasks"] for row in rows]

    def errorbar(axes, key, style, color):
        axes.errorbar(tasks, [row[key] for row in rows], yerr=[row[f"{key}_std"] or 0 for row in rows],
                      fmt=style, color=color, capsize=4)

    fig, ax_time = plt.subplots(figsize=(6, 4))
    errorbar(ax_time, "seconds", "o-", "tab:blue")
    ax_time.set_xlabel("tasks")
    ax_time.set_ylabel("mean training time (s)", color="tab:blue")
    ax_acc = ax_time.twinx()
    errorbar(ax_acc, "best_val_acc", "s--", "tab:red")
    ax_acc.set_ylabel("mean best validation accuracy", color="tab:red")
    ax_time.set_xticks(tasks)
    ax_time.set_title("Python_QML_Basics scaling (error bars: one std over the runs)")
    fig.tight_layout()
    checkpoints.atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=100))
    plt.close(fig)


def cell_text(value):
    """A table or CSV cell: None (the spread of a single run) stays blank."""
    return "" if value is None else str(value)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell_text(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report_main(argv):
    parser = ArgumentParser(prog="qml.py report", description="Scaling table, CSV and plot of a sweep's "
                            "metrics JSON files (runs/<jobid>/tasks-N.json, or tasks-N-seed-S.json with repeats): "
                            "per task count the runs' means and sample standard deviations.")
    parser.add_argument("rundir", help="folder with the sweep's metrics JSON files")
    rundir = parser.parse_args(argv).rundir
    rows = scaling_rows(load_runs(rundir))
    header = list(rows[0])
    print(markdown_table(header, [row.values() for row in rows]))
    csv_path, png_path = os.path.join(rundir, "scaling.csv"), os.path.join(rundir, "scaling.png")

    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerows([header, *([cell_text(v) for v in row.values()] for row in rows)])
    checkpoints.atomic_write(csv_path, lambda file: file.write(table.getvalue().encode()))
    plot_scaling(rows, png_path)
    print(f"Scaling table: {csv_path}")
    print(f"Scaling plot: {png_path}")
    print(answer_line(rows))
    return 0
