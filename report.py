"""`python qml.py report RUNDIR`: the scaling table, CSV and plot of a submit_qml.sbatch sweep, and the answer to
the challenge's question (which task count trains fastest at the greatest best average accuracy), which never
claims more than the runs show."""

import csv
import glob
import io
import json
import math
import os
import statistics

import checkpoints
from command_line import ArgumentParser, UsageError

SIGNIFICANCE = 0.05  # Welch's t-test: a p-value below this tells a count's mean best accuracy from the top one's
# Times within 5% of the least are a tie: one setup timed twice on one machine differs by a few percent (docs/speed.md:
# 0.78x and 0.80x of the same setup in two runs of one day), far more than the clock's resolution
# (time.time(), microseconds), so a smaller gap between single runs is no measured difference.
TIME_TIE = 0.05
REPEATS_FOR_NOISE = 3  # the runs per count suggested when there are none to estimate the noise from
CHANCE = 0.5  # accuracy of guessing between two classes (ants and bees): the accuracy axis starts here ...
ACCURACY_PAD = 0.02  # ... and ends at 1, each end padded so that a point or line there stays in sight
WHERE_METRICS_COME_FROM = ("submit_qml.sbatch 1,2,4,8 writes them to runs/<jobid>; without Slurm, run qml.py with "
                           "--metrics-json DIR/tasks-N.json at each task count N, then report DIR")


def check_rundir(rundir):
    """Refuse a RUNDIR that does not exist or is a file, saying which."""
    if not os.path.exists(rundir):
        raise UsageError(f"{rundir} does not exist; give the folder of a sweep's metrics JSON files "
                         f"({WHERE_METRICS_COME_FROM})")
    if not os.path.isdir(rundir):
        parent = os.path.dirname(rundir) or "."
        raise UsageError(f"{rundir} is a file, not a folder; give the folder that holds the metrics JSON files "
                         f"(this file's: {parent}); {WHERE_METRICS_COME_FROM}")


def load_runs(rundir):
    """One dict per metrics JSON in rundir (tasks, global batch, backbone weights, training seconds, best val
    accuracy and loss, final-epoch val accuracy), sorted by task count."""
    check_rundir(rundir)
    runs = []
    for path in sorted(glob.glob(os.path.join(rundir, "*.json"))):
        try:
            with open(path) as file:
                metrics = json.load(file)
            tasks, config = metrics["world_size"], metrics["config"]
            runs.append(dict(tasks=tasks, global_batch=config["batch_size"] * tasks, weights=config["weights"],
                             seconds=metrics["training_seconds"], best_val_acc=metrics["best_val_acc"],
                             best_val_loss=metrics["best_val_loss"], final_val_acc=metrics["epochs"][-1]["val_acc"]))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            raise UsageError(f"{path} is not a metrics JSON written by qml.py --metrics-json; move it away") from None
    if not runs:
        raise UsageError(f"no metrics JSON files (*.json) in {rundir}; {WHERE_METRICS_COME_FROM}")
    return sorted(runs, key=lambda run: run["tasks"])


def random_backbone_counts(runs):
    """The task counts with a run on a random backbone (--weights none), in order."""
    return sorted({run["tasks"] for run in runs if run["weights"] == "none"})


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


def fastest_rows(rows):
    """The row of the least (mean) time and every row within TIME_TIE of it: a tie, in task order."""
    least = min(row["seconds"] for row in rows)
    return [row for row in rows if row["seconds"] <= least * (1 + TIME_TIE)]


def single_run_answer(rows):
    """One run per count: what was measured, the fastest (or the tie), the most accurate, and that without
    repeats none of these differences is shown to be more than noise."""
    measured = "; ".join(f"{row['tasks']} task(s) {row['seconds']:.2f} s, best accuracy {row['best_val_acc']:.4f}"
                         for row in rows)
    fastest = fastest_rows(rows)
    speed = (f"{task_list(fastest)} task(s), a tie (times within {TIME_TIE:.0%})" if len(fastest) > 1
             else f"{fastest[0]['tasks']} task(s)")
    top = max(row["best_val_acc"] for row in rows)
    most_accurate = [row for row in rows if row["best_val_acc"] == top]
    counts = ",".join(str(row["tasks"]) for row in rows)
    return (f"Answer: one run per count: {measured}. Fastest: {speed}. Highest best accuracy: "
            f"{task_list(most_accurate)} task(s). Without repeats there is no noise estimate, so these differences "
            f"may be noise; to get one, run each count {REPEATS_FOR_NOISE} times: submit_qml.sbatch {counts} "
            f"--repeats {REPEATS_FOR_NOISE}")


def repeated_answer(rows):
    """Every count repeated: the fastest (or the tie, by mean time) of the counts whose mean best accuracy
    Welch's t-test at SIGNIFICANCE cannot tell from the top mean."""
    top = max(rows, key=lambda row: row["best_val_acc"])
    tied = [row for row in rows if welch_p_value(row, top, "best_val_acc") >= SIGNIFICANCE]
    worse = [row for row in rows if row not in tied]
    fastest = fastest_rows(tied)
    if len(fastest) > 1:
        times = ", ".join(f"{row['seconds']:.1f}" for row in fastest)
        speed = f"{task_list(fastest)} task(s) tie for fastest (mean times {times} s, within {TIME_TIE:.0%})"
    else:
        speed = (f"{fastest[0]['tasks']} task(s) train fastest ({fastest[0]['seconds']:.1f} s, mean of "
                 f"{fastest[0]['runs']} runs)")
    verdict = (f"{task_list(worse)} task(s) are less accurate" if worse
               else "all accuracy differences between the task counts are within the noise")
    return (f"Answer: {speed} among the counts whose mean best accuracy is within the noise of the top one "
            f"({top['tasks']} task(s): {top['best_val_acc']:.4f} ± {top['best_val_acc_std']:.4f} std) by Welch's "
            f"t-test at {SIGNIFICANCE:.0%}: {task_list(tied)} task(s); {verdict}")


def answer_line(rows, random_counts=()):
    """The challenge's question (the fastest count at the greatest best accuracy), answered no further than the
    runs allow; random_counts: the task counts trained on a random backbone, whose accuracy is cautioned."""
    single = [row for row in rows if row["runs"] == 1]
    if len(single) == len(rows):
        line = single_run_answer(rows)
    elif single:
        line = (f"Answer: none: {task_list(single)} task(s) have a single run, whose spread is unknown, beside "
                f"repeated counts; run every count at least twice (--repeats 2)")
    else:
        line = repeated_answer(rows)
    if random_counts:
        line += (f". Caution: {', '.join(map(str, random_counts))} task(s) ran with --weights none (a random "
                 f"backbone): their accuracy says nothing about the method; rerun with --weights imagenet (the "
                 f"default) for that")
    return line


# ----------------------------------------------------------------------------
# The plot: speedup against the ideal, and accuracy, one panel each


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    return plt


def speedup_std(row, base):
    """First-order spread of row's speedup over base (both repeated): the relative stds of the two mean
    times, added in quadrature."""
    return row["speedup"] * math.hypot(row["seconds_std"] / row["seconds"], base["seconds_std"] / base["seconds"])


def draw_speedup(axes, rows):
    """Measured speedup against the ideal (linear) one, each point labelled with its parallel efficiency; error
    bars where the count and the smallest count both have repeats."""
    base, tasks = rows[0], [row["tasks"] for row in rows]
    axes.plot(tasks, [count / base["tasks"] for count in tasks], "--", color="gray", label="ideal (linear)")
    axes.plot(tasks, [row["speedup"] for row in rows], "o-", color="tab:blue", label="measured")
    bars = [row for row in rows[1:] if row["runs"] > 1 and base["runs"] > 1]
    if bars:
        axes.errorbar([row["tasks"] for row in bars], [row["speedup"] for row in bars],
                      yerr=[speedup_std(row, base) for row in bars], fmt="none", ecolor="tab:blue", capsize=4)
    for row in rows:
        axes.annotate(f"{row['efficiency']:.0%}", (row["tasks"], row["speedup"]), textcoords="offset points",
                      xytext=(6, -12), ha="left", fontsize=8)
    axes.set(title="Speedup (labels: parallel efficiency)", xlabel="tasks",
             ylabel=f"speedup over {base['tasks']} task(s)", xticks=tasks)
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper left")


def draw_accuracy(axes, rows, random_counts):
    """Best validation accuracy as points (separate experiments, no trend line) on an axis from chance (lower
    if a point or its error bar is) to 1, padded by ACCURACY_PAD; error bars where the count has repeats."""
    tasks = [row["tasks"] for row in rows]
    axes.plot(tasks, [row["best_val_acc"] for row in rows], "s", color="tab:red", label="best validation accuracy")
    bars = [row for row in rows if row["runs"] > 1]
    if bars:
        axes.errorbar([row["tasks"] for row in bars], [row["best_val_acc"] for row in bars],
                      yerr=[row["best_val_acc_std"] for row in bars], fmt="none", ecolor="tab:red", capsize=4)
    axes.axhline(CHANCE, linestyle=":", color="gray", label="chance (two classes)")
    lowest = min(row["best_val_acc"] - (row["best_val_acc_std"] or 0) for row in rows)
    axes.set_ylim(min(CHANCE, math.floor(lowest * 20) / 20) - ACCURACY_PAD, 1 + ACCURACY_PAD)
    backbone = "\non a random backbone (--weights none)" if random_counts else ""
    axes.set(title=f"Best validation accuracy{backbone}", xlabel="tasks", ylabel="best validation accuracy",
             xticks=tasks)
    axes.legend(loc="upper left")


def spread_note(rows):
    """What the error bars show, or that there are none."""
    repeated = [row for row in rows if row["runs"] > 1]
    if not repeated:
        return f"one run per count: no error bars, no noise estimate (--repeats {REPEATS_FOR_NOISE} gives one)"
    if len(repeated) < len(rows):
        return f"error bars: one std over the runs, only at {task_list(repeated)} task(s) (the repeated counts)"
    return "error bars: one std over each count's runs; points: means"


def plot_figure(rows, random_counts=()):
    fig, (ax_speed, ax_acc) = pyplot().subplots(1, 2, figsize=(11, 4.5))
    draw_speedup(ax_speed, rows)
    draw_accuracy(ax_acc, rows, random_counts)
    fig.suptitle(f"Python_QML_Basics scaling: {spread_note(rows)}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_scaling(rows, path, random_counts=()):
    fig = plot_figure(rows, random_counts)
    checkpoints.atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=100))
    pyplot().close(fig)


# ----------------------------------------------------------------------------
# The table and report_main


def cell_text(value):
    """A table or CSV cell: None (the spread of a single run) stays blank."""
    return "" if value is None else str(value)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell_text(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report_main(argv):
    parser = ArgumentParser(prog="qml.py report", description="Scaling table, CSV and plot of a sweep's "
                            "metrics JSON files (runs/<jobid>/tasks-N.json, or tasks-N-repeat-R.json with repeats): "
                            "per task count the runs' means and sample standard deviations, and the answer.")
    parser.add_argument("rundir", help="folder with the metrics JSON files: runs/<jobid> of submit_qml.sbatch, or "
                        "any folder the runs wrote with qml.py --metrics-json DIR/tasks-N.json")
    rundir = parser.parse_args(argv).rundir
    runs = load_runs(rundir)
    rows, random_counts = scaling_rows(runs), random_backbone_counts(runs)
    header = list(rows[0])
    print(markdown_table(header, [row.values() for row in rows]))
    csv_path, png_path = os.path.join(rundir, "scaling.csv"), os.path.join(rundir, "scaling.png")

    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerows([header, *([cell_text(v) for v in row.values()] for row in rows)])
    checkpoints.atomic_write(csv_path, lambda file: file.write(table.getvalue().encode()))
    plot_scaling(rows, png_path, random_counts)
    print(f"Scaling table: {csv_path}")
    print(f"Scaling plot: {png_path}")
    print(answer_line(rows, random_counts))
    return 0
