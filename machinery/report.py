"""`python qml.py report RUNDIR [--by OPTION]`: the table, CSV and plots of a submit_qml.sbatch sweep (its learning
curves too), and the answer to its question, which never claims more than the runs show; `python qml.py report
RUN.json`: one run's learning curves. Without a varied option: which task count trains
fastest at the greatest best average accuracy (the challenge's). With one (submit_qml.sbatch --vary, recorded in
RUNDIR/sweep.args; in a folder of hand-made runs, the config key whose values differ; or --by): which value of it
reaches the greatest best accuracy, and whether Welch's t-test tells the others from it."""

import csv
import glob
import io
import json
import math
import os
import statistics
import sys

from . import pictures, sweep
from .pictures import pyplot, save_figure
from .command_line import ArgumentParser, RunFailed, UsageError, atomic_write

SIGNIFICANCE = 0.05  # Welch's t-test: a p-value below this tells a mean best accuracy from the top one's
# Times within 5% of the least are a tie: one setup timed twice on one machine differs by a few percent (docs/speed.md:
# 0.78x and 0.80x of the same setup in two runs of one day), far more than the clock's resolution
# (time.time(), microseconds), so a smaller gap between single runs is no measured difference.
TIME_TIE = 0.05
REPEATS_FOR_NOISE = 3  # the runs per count suggested when there are none to estimate the noise from
ACCURACY_PAD = 0.02  # the accuracy axis runs from chance to 1, each end padded so that a point there stays in sight
SERIES_SHIFT = 0.08  # on a plot against a varied value, each task count's points sit this far beside the others'
WHERE_METRICS_COME_FROM = ("submit_qml.sbatch 1,2,4,8 writes them to runs/<jobid>; without Slurm, run qml.py with "
                           "--metrics-json DIR/tasks-N.json at each task count N, then report DIR")
# Config keys that differ between the repeats of one experiment, or between its runs' files, so none is a varied
# option: the seeds (--repeat R adds R to both), each run's own files, and the digest of the circuit, which follows
# the circuit's options (--n-qubits, --q-depth).
NOT_VARIED = {"seed", "shuffle_seed", "repeat", "metrics_json", "checkpoint", "resume", "save", "circuit"}
PLAIN_VALUES = (str, int, float, bool, type(None))  # config values a run can be grouped by (not lists)


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
    accuracy and loss, final-epoch val accuracy, the head's trainable parameters or None, and the run's config,
    whose head is "quantum" in files from before --head), sorted by task count."""
    check_rundir(rundir)
    runs = []
    for path in sorted(glob.glob(os.path.join(rundir, "*.json"))):
        try:
            with open(path) as file:
                metrics = json.load(file)
            tasks, config = metrics["world_size"], {"head": "quantum", **metrics["config"]}
            runs.append(dict(tasks=tasks, global_batch=config["batch_size"] * tasks, weights=config["weights"],
                             seconds=metrics["training_seconds"], best_val_acc=metrics["best_val_acc"],
                             best_val_loss=metrics["best_val_loss"], final_val_acc=metrics["epochs"][-1]["val_acc"],
                             trainable_parameters=metrics.get("trainable_parameters"), config=config,
                             test_acc=metrics.get("test_acc"), test_count=metrics.get("test_count"),
                             executed=executed_totals(metrics["epochs"])))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            raise UsageError(f"{path} is not a metrics JSON written by qml.py --metrics-json; move it away") from None
    if not runs:
        raise UsageError(f"no metrics JSON files (*.json) in {rundir}; {WHERE_METRICS_COME_FROM}")
    return sorted(runs, key=lambda run: run["tasks"])


def executed_totals(epochs):
    """{"circuits": n, "shots": n}: what a run's epochs executed on its circuit (qml.py's per-epoch circuits_forward,
    circuits_gradient, shots_forward, shots_gradient), summed; None when an epoch did not record them (no circuit, or
    an old file)."""
    parts = ("forward", "gradient")
    if not all(f"{key}_{part}" in epoch for epoch in epochs for key in ("circuits", "shots") for part in parts):
        return None
    return {key: sum(epoch[f"{key}_{part}"] for epoch in epochs for part in parts) for key in ("circuits", "shots")}


def executed_lines(runs, key=None):
    """What the runs executed, summed per run: one line per task count (and value of the compared option, `key`)
    whose runs recorded it, with the mean over its runs. docs/qpu.md prices them on a QPU."""
    groups = {}
    for run in runs:
        if run["executed"] is not None:
            label = f"{run['tasks']} task(s)" + (f", {key.replace('_', '-')}={run['config'][key]}" if key else "")
            groups.setdefault(label, []).append(run["executed"])
    lines = [f"  {label}: {statistics.mean(e['circuits'] for e in group):,.0f} circuits, "
             f"{statistics.mean(e['shots'] for e in group):,.0f} shots ({len(group)} run(s))"
             for label, group in groups.items()]
    return ["Executed per run (circuits and shots, forward and gradient, summed over its epochs; mean of its runs):",
            *lines] if lines else []


def print_executed(runs, key=None):
    for line in executed_lines(runs, key):
        print(line)


def random_backbone_counts(runs):
    """The task counts with a run on a random backbone (--weights none), in order."""
    return sorted({run["tasks"] for run in runs if run["weights"] == "none"})


# ----------------------------------------------------------------------------
# The compared option: --by, else sweep.args' --vary, else the one config key the runs of a count differ in


def read_sweep(rundir):
    """The sweep recorded in RUNDIR/sweep.args (sweep.Sweep, read back with sweep.py's own parser), or None for a
    folder without one: hand-made runs."""
    path = os.path.join(rundir, "sweep.args")
    try:
        with open(path, "rb") as file:
            words = file.read().decode(errors="replace").split("\0")[:-1]  # as sweep.record_sweep writes them
    except FileNotFoundError:
        return None
    try:
        return sweep.parse_sweep(words)
    except UsageError as err:
        raise UsageError(f"{path} is not the record of a submit_qml.sbatch sweep ({err}); move it away") from None


def plain_keys(runs):
    """The config keys that every run has, each with a plain value (no list)."""
    return set.intersection(*({key for key, value in run["config"].items() if isinstance(value, PLAIN_VALUES)}
                              for run in runs))


def varied_keys(runs):
    """The config keys, NOT_VARIED aside, whose values differ between runs of one task count. Only there: values
    derived from the task count (the per-rank batch of --global-batch-size, the learning rate of --lr-scaling
    linear) differ between counts, whereas a varied option takes each of its values at every count."""
    keys = plain_keys(runs) - NOT_VARIED
    return sorted(key for key in keys
                  if any(len({run["config"][key] for run in runs if run["tasks"] == tasks}) > 1
                         for tasks in {run["tasks"] for run in runs}))


def hand_made_axis(runs):
    """(the one key varied_keys finds, ()), or None when it finds none; several are refused: name one with --by."""
    keys = varied_keys(runs)
    if len(keys) > 1:
        raise UsageError(f"the runs of one task count differ in {', '.join(key.replace('_', '-') for key in keys)}: "
                         f"name the option to compare them by with --by OPTION")
    return (keys[0], ()) if keys else None


def find_axis(runs, rundir, by):
    """(config key, its values in submit_qml.sbatch --vary's order, or ()) of the compared option, or None when the
    runs compare task counts only: --by OPTION, else sweep.args' --vary, else for hand-made runs hand_made_axis."""
    swept = read_sweep(rundir)
    if by:
        key, named = by.replace("-", "_"), f"--by {by}: {by} is"
    elif swept and swept.varied:  # the first --vary is compared, the others are tuned (tuned_keys)
        key = swept.varied[0][0].replace("-", "_")
        named = f"{os.path.join(rundir, 'sweep.args')} varies --{swept.varied[0][0]}, which is"
    else:
        return None if swept else hand_made_axis(runs)
    if key not in plain_keys(runs):
        raise UsageError(f"{named} not an option in every run's config; compare by one that is with --by OPTION: "
                         f"{', '.join(sorted(name.replace('_', '-') for name in plain_keys(runs)))}")
    listed = dict((option.replace("-", "_"), values) for option, values in swept.varied).get(key, ()) if swept else ()
    return key, listed


# ----------------------------------------------------------------------------
# The rows: one per task count, or per task count and value of the compared option


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


def value_order(listed):
    """Sort key of a compared option's values: first those submit_qml.sbatch --vary listed, in its order, then
    numbers by size, then the rest by their text."""
    def key(value):
        text = str(value)
        if text in listed:
            return 0, listed.index(text), text
        return 1, value if isinstance(value, (int, float)) else math.inf, text
    return key


def axis_rows(runs, key, option, listed=()):
    """One row per task count and value of config[key], named `option` in the row, in task then value_order: its
    runs' means and spreads of the training time, best accuracy and loss, and the head's trainable parameters
    (None where a run did not record them)."""
    groups = {}
    order = value_order(listed)
    for run in sorted(runs, key=lambda run: (run["tasks"], order(run["config"][key]))):
        groups.setdefault((run["tasks"], run["config"][key]), []).append(run)
    rows = []
    for (tasks, value), group in groups.items():
        parameters = {run["trainable_parameters"] for run in group}
        rows.append({"tasks": tasks, option: value, "runs": len(group),
                     "trainable_parameters": parameters.pop() if len(parameters) == 1 else None,
                     **mean_and_std(group, "seconds", 2), **mean_and_std(group, "best_val_acc", 4),
                     **mean_and_std(group, "best_val_loss", 4)})
    return rows


# ----------------------------------------------------------------------------
# The task counts' answer


def welch_p_value(a, b, key):
    """Two-sided p-value of Welch's t-test (scipy's, from the rows' means, sample stds and run counts) that rows
    a and b, each of two runs or more, share the mean of key."""
    from scipy import stats  # about 0.3 s to import: only reports with repeats need it

    if a[f"{key}_std"] == 0 and b[f"{key}_std"] == 0:  # no spread at all: the means are equal or surely different
        return 1.0 if a[key] == b[key] else 0.0
    return float(stats.ttest_ind_from_stats(a[key], a[f"{key}_std"], a["runs"], b[key], b[f"{key}_std"], b["runs"],
                                            equal_var=False).pvalue)


def identical(a, b, key):
    """Every run of rows a and b (repeated) gave the same value of key: no spread, equal means."""
    return a[f"{key}_std"] == 0 and b[f"{key}_std"] == 0 and a[key] == b[key]


def mean_text(row, key, digits=4):
    """'mean ± std' of key, or the value alone for a single run."""
    std = row[f"{key}_std"]
    return f"{row[key]:.{digits}f}" if std is None else f"{row[key]:.{digits}f} ± {std:.{digits}f}"


def task_list(rows):
    return ", ".join(str(row["tasks"]) for row in rows)


def fastest_rows(rows):
    """The row of the least (mean) time and every row within TIME_TIE of it: a tie, in task order."""
    least = min(row["seconds"] for row in rows)
    return [row for row in rows if row["seconds"] <= least * (1 + TIME_TIE)]


def one_count_answer(row):
    """A single task count: its time and best accuracy; no count is the fastest, with none to compare it with."""
    runs = "one run" if row["runs"] == 1 else f"mean ± std of {row['runs']} runs"
    return (f"Answer: one task count, {row['tasks']} task(s): {mean_text(row, 'seconds', 2)} s, best accuracy "
            f"{mean_text(row, 'best_val_acc')} ({runs}); a speed comparison needs at least two task counts, e.g. "
            f"submit_qml.sbatch 1,2,4,8 --repeats {REPEATS_FOR_NOISE}")


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


def fastest_text(fastest):
    """The fastest count by mean time, or the counts that tie for it."""
    if len(fastest) > 1:
        times = ", ".join(f"{row['seconds']:.1f}" for row in fastest)
        return f"{task_list(fastest)} task(s) tie for fastest (mean times {times} s, within {TIME_TIE:.0%})"
    (row,) = fastest
    return f"{row['tasks']} task(s) train fastest ({row['seconds']:.1f} s, mean of {row['runs']} runs)"


def repeated_answer(rows):
    """Every count repeated: the fastest (or the tie, by mean time) of the counts whose mean best accuracy
    Welch's t-test at SIGNIFICANCE cannot tell from the top mean; the accuracies are identical when every run
    of every count gave the same one."""
    top = max(rows, key=lambda row: row["best_val_acc"])
    if all(identical(row, top, "best_val_acc") for row in rows):
        return (f"Answer: {fastest_text(fastest_rows(rows))}; the best accuracies are identical: every run of every "
                f"count reached {top['best_val_acc']:.4f}")
    tied = [row for row in rows if welch_p_value(row, top, "best_val_acc") >= SIGNIFICANCE]
    worse = [row for row in rows if row not in tied]
    verdict = (f"{task_list(worse)} task(s) are less accurate" if worse
               else "all accuracy differences between the task counts are within the noise")
    return (f"Answer: {fastest_text(fastest_rows(tied))} among the counts whose mean best accuracy is within the "
            f"noise of the top one ({top['tasks']} task(s): {top['best_val_acc']:.4f} ± {top['best_val_acc_std']:.4f} "
            f"std) by Welch's t-test at {SIGNIFICANCE:.0%}: {task_list(tied)} task(s); {verdict}")


def answer_line(rows, random_counts=()):
    """The challenge's question (the fastest count at the greatest best accuracy), answered no further than the
    runs allow; random_counts: the task counts trained on a random backbone, whose accuracy is cautioned."""
    single = [row for row in rows if row["runs"] == 1]
    if len(rows) == 1:
        line = one_count_answer(rows[0])
    elif len(single) == len(rows):
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
# The compared option's answer, at one task count


def value_label(row, option):
    return f"{option}={row[option]}"


def compared_with(row, top, option):
    """Row's mean best accuracy beside the top one's: identical, or as Welch's t-test at SIGNIFICANCE sees it."""
    label, accuracy = value_label(row, option), mean_text(row, "best_val_acc")
    if identical(row, top, "best_val_acc"):
        return f"{label} is identical ({accuracy}: every run of both reached it)"
    p_value = welch_p_value(row, top, "best_val_acc")
    verdict = "is less accurate" if p_value < SIGNIFICANCE else "is within the noise"
    return f"{label} {verdict} ({accuracy}, p = {p_value:.2g})"


def axis_answer(rows, option, rerun):
    """Which value of option reaches the greatest mean best accuracy at one task count (rows: that count's), and
    whether Welch's t-test tells each other value from it; rerun: the sweep that gives every value repeats. The
    answer's text after 'Answer:'."""
    top = max(rows, key=lambda row: row["best_val_acc"])
    single = [row for row in rows if row["runs"] == 1]
    if len(rows) == 1:
        return f"every run has {value_label(top, option)}: there is no other value to compare it with"
    if len(single) == len(rows):
        measured = "; ".join(f"{value_label(row, option)} {row['best_val_acc']:.4f}" for row in rows)
        highest = [value_label(row, option) for row in rows if row["best_val_acc"] == top["best_val_acc"]]
        return (f"one run per value, best accuracy: {measured}; highest: {', '.join(highest)}. Without repeats there "
                f"is no noise estimate, so no test can tell these apart; to get one: {rerun}")
    if single:
        return (f"none: {', '.join(value_label(row, option) for row in single)} ran once, so the spread is unknown, "
                f"beside repeated values; run every value at least twice (--repeats 2)")
    others = "; ".join(compared_with(row, top, option) for row in rows if row is not top)
    return (f"{value_label(top, option)} has the highest mean best accuracy ({mean_text(top, 'best_val_acc')} std, "
            f"{top['runs']} runs); by Welch's t-test at {SIGNIFICANCE:.0%}: {others}")


def axis_caution(option, rows):
    """What runs on a random backbone (--weights none) can and cannot say about the values compared."""
    values = ", ".join(str(row[option]) for row in rows)
    return (f". Caution: these runs used --weights none (a random backbone): the comparison is between --{option} "
            f"{values} on random features, not ImageNet features, so it says nothing about them on real features; "
            f"rerun with --weights imagenet (the default) for that")


# ----------------------------------------------------------------------------
# Tuned alike, answered on test: each compared value at the setting of the tuned options that selection picks, the
# values then compared on the test part (Bowles, Ahmed and Schuld's protocol; docs/sweep.md)

OPTIMISM = ("Caution: without a test part these are best-of-epochs validation accuracies, scored on the very images "
            "that chose the epoch (and the tuned setting), so they are optimistic, the noisiest runs most; hold out a "
            "test part with --holdout 0.5 (or give the data a test/ folder) for an unbiased answer")


def option_name(key):
    return key.replace("_", "-")


def tuned_keys(runs, rundir, key, tune):
    """The config keys tuned for each value of key: --tune's (names or comma lists), else every other varied option:
    the sweep's other --vary options, or for hand-made runs every other key their configs differ in. One that is not
    in every run's config is refused."""
    swept = read_sweep(rundir)
    if tune:
        named, given = [name.replace("-", "_") for text in tune for name in text.split(",") if name], "--tune"
    elif swept and swept.varied:
        named, given = [option.replace("-", "_") for option, _ in swept.varied], "sweep.args' --vary"
    else:
        named, given = varied_keys(runs), ""
    named = list(dict.fromkeys(name for name in named if not (name == key and given != "--tune")))
    missing = [name for name in named if name not in plain_keys(runs) or name == key]
    if missing:
        others = ", ".join(sorted(map(option_name, plain_keys(runs) - {key})))
        raise UsageError(f"{given} {option_name(missing[0])}: not an option of every run's config other than the "
                         f"compared one (--by); tune one of: {others}")
    return named


def refuse_pooling(runs, key, tuned):
    """Runs that differ in an option neither compared nor tuned would be pooled as repeats of one setting: refused in
    one line naming it."""
    stray = [name for name in varied_keys(runs) if name != key and name not in tuned]
    if stray:
        raise UsageError(f"the runs differ in {option_name(stray[0])}, which is neither compared (--by "
                         f"{option_name(key)}) nor tuned (--tune), so its runs would be pooled as repeats; add --tune "
                         f"{option_name(stray[0])}, or report each {option_name(stray[0])} from its own folder")


def setting_label(setting, tuned):
    return ", ".join(f"{option_name(name)}={value}" for name, value in zip(tuned, setting, strict=True))


def tuned_rows(runs, key, tuned, listed):
    """One row per task count and value of key, at its pick: of the settings of the tuned keys, the one with the
    greatest mean selection accuracy (best_val_acc: the best validation accuracy, on the selection part where there
    is a test part); ties go to the first setting in value order. The row: the pick, its runs' means and spreads of
    seconds, selection accuracy and test accuracy (None where a run has no test part), the test images, and how many
    settings were tried."""
    option, order = option_name(key), value_order(listed)
    groups = {}
    for run in sorted(runs, key=lambda run: (run["tasks"], order(run["config"][key]),
                                             *(value_order(())(run["config"][name]) for name in tuned))):
        at = (run["tasks"], run["config"][key])
        groups.setdefault(at, {}).setdefault(tuple(run["config"][name] for name in tuned), []).append(run)
    rows = []
    for (tasks, value), settings in groups.items():
        means = {setting: statistics.mean(run["best_val_acc"] for run in group) for setting, group in settings.items()}
        pick = max(settings, key=lambda setting: means[setting])  # max keeps the first of equal means
        group = settings[pick]
        tested = all(run["test_acc"] is not None for run in group)
        parameters = {run["trainable_parameters"] for run in group}
        counts = {run["test_count"] for run in group}
        rows.append({"tasks": tasks, option: value, **({"pick": setting_label(pick, tuned)} if tuned else {}),
                     "settings": len(settings), "runs": len(group),
                     "trainable_parameters": parameters.pop() if len(parameters) == 1 else None,
                     **mean_and_std(group, "seconds", 2), **mean_and_std(group, "best_val_acc", 4),
                     **(mean_and_std(group, "test_acc", 4) if tested else {"test_acc": None, "test_acc_std": None}),
                     "test_count": counts.pop() if tested and len(counts) == 1 else None})
    return rows


def tuned_answer(rows, option, key, rerun):
    """Which value's pick reaches the greatest mean accuracy of key (test_acc, or best_val_acc without a test part),
    and whether Welch's t-test tells each other value's pick from it. The text after 'Answer:'."""
    what = "test accuracy" if key == "test_acc" else "best validation accuracy"
    top = max(rows, key=lambda row: row[key])
    single = [row for row in rows if row["runs"] == 1]
    if len(rows) == 1:
        return f"every run has {value_label(top, option)}: there is no other value to compare it with"
    if len(single) == len(rows):
        measured = "; ".join(f"{value_label(row, option)} {row[key]:.4f}" for row in rows)
        return (f"one run per value and setting, {what} at the picks: {measured}. Without repeats there is no noise "
                f"estimate, so no test can tell these apart; to get one: {rerun}")
    if single:
        return (f"none: {', '.join(value_label(row, option) for row in single)} ran once at its pick, so the spread "
                f"is unknown; run every setting at least twice (--repeats 2)")
    verdicts = []
    for row in rows:
        if row is top:
            continue
        label, accuracy = value_label(row, option), mean_text(row, key)
        if identical(row, top, key):
            verdicts.append(f"{label} is identical ({accuracy}: every run of both reached it)")
            continue
        p_value = welch_p_value(row, top, key)
        verdicts.append(f"{label} {'is less accurate' if p_value < SIGNIFICANCE else 'is within the noise'} "
                        f"({accuracy}, p = {p_value:.2g})")
    images = f", {top['test_count']} test images" if key == "test_acc" and top["test_count"] else ""
    return (f"at each value's pick, {value_label(top, option)} has the highest mean {what} "
            f"({mean_text(top, key)} std, {top['runs']} runs{images}); by Welch's t-test at {SIGNIFICANCE:.0%}: "
            f"{'; '.join(verdicts)}")


TEST_SHIFT = 0.2  # on the accuracy panel, each pick's test accuracy sits this far right of its selection accuracy


def draw_test_accuracy(fig, rows, option):
    """On axis_figure's accuracy panel, beside each pick's selection accuracy: its mean test accuracy (diamonds, one
    std error bars where repeated), the panel retitled and its axis widened to show them."""
    axes = fig.axes[1]
    values = list(dict.fromkeys(row[option] for row in rows))
    counts = sorted({row["tasks"] for row in rows})
    for index, tasks in enumerate(counts):
        series = [row for row in rows if row["tasks"] == tasks]
        xs = [values.index(row[option]) + SERIES_SHIFT * (index - (len(counts) - 1) / 2) + TEST_SHIFT for row in series]
        draw_means(axes, xs, series, "test_acc", "D", f"C{index}", f"{tasks} task(s), test")
    lowest = min(row["test_acc"] - (row["test_acc_std"] or 0) for row in rows)
    axes.set_ylim(min(axes.get_ylim()[0], math.floor(lowest * 20) / 20 - ACCURACY_PAD), 1 + ACCURACY_PAD)
    axes.set(title=axes.get_title().replace("Best validation accuracy", "At each pick: selection (squares), test "
                                             "(diamonds)"), ylabel="accuracy")
    axes.legend(loc="best")


def rerun_command(rows, option, more):
    """The sweep that repeats these rows' task counts and values of `option`, with `more` options."""
    counts = ",".join(map(str, sorted({row["tasks"] for row in rows})))
    values = ",".join(str(value) for value in dict.fromkeys(row[option] for row in rows))
    return f"submit_qml.sbatch {counts} --vary {option}={values} {more}"


def print_answers(rows, option, random_counts, answer):
    """One line per task count of the rows by `option`: answer(its rows), cautioned on a random backbone."""
    counts = sorted({row["tasks"] for row in rows})
    for tasks in counts:
        at_count = [row for row in rows if row["tasks"] == tasks]
        caution = axis_caution(option, at_count) if tasks in random_counts else ""
        prefix = "Answer" if len(counts) == 1 else f"Answer at {tasks} task(s)"
        print(f"{prefix}: {answer(at_count)}{caution}")


def report_tuned(runs, rundir, key, listed, tuned):
    """The table (a row per task count and value, at its pick), CSV and plot by the compared option, and its answer
    at each task count: on test accuracy where every pick has a test part, else on validation accuracy, cautioned."""
    option = option_name(key)
    rows, random_counts = tuned_rows(runs, key, tuned, listed), random_backbone_counts(runs)
    csv_path, png_path = os.path.join(rundir, f"by-{option}.csv"), os.path.join(rundir, f"by-{option}.png")
    write_table(rows, csv_path)
    on_test = all(row["test_acc"] is not None for row in rows)
    fig = axis_figure(rows, option, bool(random_counts), class_count(runs))
    if on_test:
        draw_test_accuracy(fig, rows, option)
    save_figure(fig, png_path)
    tuning = f", each at the setting of {', '.join(map(option_name, tuned))} with the best mean selection " \
             f"accuracy (column pick)" if tuned else ""
    print(f"Table by --{option}{tuning}: {csv_path}\nPlot by --{option}: {png_path}")
    report_curves(runs, rundir, (key, listed))
    print_executed(runs, key)
    tuned_vary = "".join(f"--vary {option_name(name)}=... " for name in tuned)
    rerun = rerun_command(rows, option, f"{tuned_vary}--repeats {REPEATS_FOR_NOISE} --holdout 0.5")
    accuracy = "test_acc" if on_test else "best_val_acc"
    print_answers(rows, option, random_counts, lambda at_count: tuned_answer(at_count, option, accuracy, rerun))
    if not on_test:
        print(OPTIMISM)


# ----------------------------------------------------------------------------
# The plots: against the task count (time, speedup against the ideal, accuracy) or the compared value (time, accuracy)


def draw_means(axes, xs, rows, key, style, color, label):
    """The rows' means of key at xs, with a one-std error bar at each row of several runs."""
    axes.plot(xs, [row[key] for row in rows], style, color=color, label=label)
    bars = [(x, row) for x, row in zip(xs, rows, strict=True) if row["runs"] > 1]
    if bars:
        axes.errorbar([x for x, _ in bars], [row[key] for _, row in bars], yerr=[row[f"{key}_std"] for _, row in bars],
                      fmt="none", ecolor=color, capsize=4)


def speedup_std(row, base):
    """First-order spread of row's speedup over base (both repeated): the relative stds of the two mean
    times, added in quadrature."""
    return row["speedup"] * math.hypot(row["seconds_std"] / row["seconds"], base["seconds_std"] / base["seconds"])


def seconds_axis(axes, rows):
    """The time panel's title and axis: from 0 to a tenth above the highest point or error bar."""
    highest = max(row["seconds"] + (row["seconds_std"] or 0) for row in rows)
    axes.set(title="Training time", ylabel="training seconds", ylim=(0, 1.1 * highest))
    axes.legend(loc="best")


def draw_time(axes, rows):
    """Mean training seconds against the task count, error bars where the count has repeats."""
    tasks = [row["tasks"] for row in rows]
    draw_means(axes, tasks, rows, "seconds", "o-", "tab:green", "measured")
    axes.set(xlabel="tasks", xticks=tasks)
    seconds_axis(axes, rows)


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


def accuracy_axis(axes, rows, random_backbone, n_classes=2):
    """The accuracy panel's chance line (one over the number of classes), title and axis: from chance (lower if a
    point or its error bar is) to 1, padded by ACCURACY_PAD."""
    level, label = pictures.chance(n_classes)
    axes.axhline(level, linestyle=":", color="gray", label=label)
    lowest = min(row["best_val_acc"] - (row["best_val_acc_std"] or 0) for row in rows)
    axes.set_ylim(min(level, math.floor(lowest * 20) / 20) - ACCURACY_PAD, 1 + ACCURACY_PAD)
    backbone = "\non a random backbone (--weights none)" if random_backbone else ""
    axes.set(title=f"Best validation accuracy{backbone}", ylabel="best validation accuracy")
    axes.legend(loc="best")  # where it hides no point


def draw_accuracy(axes, rows, random_counts, n_classes=2):
    """Best validation accuracy against the task count as points (separate experiments, no trend line)."""
    tasks = [row["tasks"] for row in rows]
    draw_means(axes, tasks, rows, "best_val_acc", "s", "tab:red", "best validation accuracy")
    axes.set(xlabel="tasks", xticks=tasks)
    accuracy_axis(axes, rows, random_counts, n_classes)


def spread_note(rows, what="count", where=lambda rows: f"{task_list(rows)} task(s)"):
    """What the error bars show, or that there are none; what: a row's kind; where(rows) names rows."""
    repeated = [row for row in rows if row["runs"] > 1]
    if not repeated:
        return f"one run per {what}: no error bars, no noise estimate (--repeats {REPEATS_FOR_NOISE} gives one)"
    if len(repeated) < len(rows):
        return f"error bars: one std over the runs, only at {where(repeated)} (the repeated {what}s)"
    return f"error bars: one std over each {what}'s runs; points: means"


def plot_figure(rows, random_counts=(), n_classes=2):
    fig, (ax_time, ax_speed, ax_acc) = pyplot().subplots(1, 3, figsize=(15, 4.5))
    draw_time(ax_time, rows)
    draw_speedup(ax_speed, rows)
    draw_accuracy(ax_acc, rows, random_counts, n_classes)
    fig.suptitle(f"Python_QML_Basics scaling: {spread_note(rows)}", fontsize=10)
    fig.tight_layout()
    return fig


def axis_figure(rows, option, random_backbone=False, n_classes=2):
    """Training time and best accuracy against the compared option's values (in the rows' order), one series of
    points per task count, each shifted by SERIES_SHIFT so that their error bars stay apart."""
    values = list(dict.fromkeys(row[option] for row in rows))
    counts = sorted({row["tasks"] for row in rows})
    fig, (ax_time, ax_acc) = pyplot().subplots(1, 2, figsize=(11, 4.5))
    for index, tasks in enumerate(counts):
        series = [row for row in rows if row["tasks"] == tasks]
        xs = [values.index(row[option]) + SERIES_SHIFT * (index - (len(counts) - 1) / 2) for row in series]
        draw_means(ax_time, xs, series, "seconds", "o", f"C{index}", f"{tasks} task(s)")
        draw_means(ax_acc, xs, series, "best_val_acc", "s", f"C{index}", f"{tasks} task(s)")
    for axes in (ax_time, ax_acc):
        axes.set(xlabel=f"--{option}", xticks=range(len(values)), xticklabels=[str(value) for value in values],
                 xlim=(-0.5, len(values) - 0.5))
    seconds_axis(ax_time, rows)
    accuracy_axis(ax_acc, rows, random_backbone, n_classes)
    note = spread_note(rows, "value", lambda rows: ", ".join(f"{value_label(row, option)} at {row['tasks']} task(s)"
                                                             for row in rows))
    fig.suptitle(f"Python_QML_Basics by --{option}: {note}", fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------
# The table, CSV and main


def cell_text(value):
    """A table or CSV cell: None (the spread of a single run) stays blank."""
    return "" if value is None else str(value)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell_text(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(rows, csv_path):
    """Print the rows as a markdown table and write them to csv_path."""
    header = list(rows[0])
    print(markdown_table(header, [row.values() for row in rows]))
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows([header, *([cell_text(v) for v in row.values()] for row in rows)])
    atomic_write(csv_path, lambda file: file.write(table.getvalue().encode()))


def report_task_counts(runs, rundir):
    rows, random_counts = scaling_rows(runs), random_backbone_counts(runs)
    csv_path, png_path = os.path.join(rundir, "scaling.csv"), os.path.join(rundir, "scaling.png")
    write_table(rows, csv_path)
    save_figure(plot_figure(rows, random_counts, class_count(runs)), png_path)
    print(f"Scaling table: {csv_path}\nScaling plot: {png_path}")
    report_curves(runs, rundir, None)
    print_executed(runs)
    print(answer_line(rows, random_counts))


def report_axis(runs, rundir, key, listed):
    """The table, CSV and plot by the compared option, and its answer at each task count."""
    option = key.replace("_", "-")
    rows, random_counts = axis_rows(runs, key, option, listed), random_backbone_counts(runs)
    csv_path, png_path = os.path.join(rundir, f"by-{option}.csv"), os.path.join(rundir, f"by-{option}.png")
    write_table(rows, csv_path)
    save_figure(axis_figure(rows, option, bool(random_counts), class_count(runs)), png_path)
    print(f"Table by --{option}: {csv_path}\nPlot by --{option}: {png_path}")
    report_curves(runs, rundir, (key, listed))
    print_executed(runs, key)
    rerun = rerun_command(rows, option, f"--repeats {REPEATS_FOR_NOISE}")
    print_answers(rows, option, random_counts, lambda at_count: axis_answer(at_count, option, rerun))
    print(OPTIMISM)


# ----------------------------------------------------------------------------
# Learning curves: of one run (RUN.json), and of a sweep's task counts or values (mean and one std over repeats)


def class_count(runs):
    """The most classes any run trained on (files from before the count was recorded had two): the plots' chance
    is one over it."""
    return max(run["config"].get("n_classes", 2) for run in runs)


def kept_epoch(metrics):
    """The 1-based epoch whose head the run kept: recorded (selected_epoch), else the first that reached the best
    validation accuracy (the tutorial keeps a head only when the accuracy rises), else the last."""
    if metrics.get("selected_epoch"):
        return metrics["selected_epoch"]
    records = metrics["epochs"]
    best = [index for index, record in enumerate(records, 1) if record.get("val_acc") == metrics.get("best_val_acc")]
    return best[0] if best else len(records)


def kept_test(metrics):
    """The kept head's test loss and accuracy ({"loss", "acc"}), or None for a run without a test part."""
    if metrics.get("test_acc") is None:
        return None
    return dict(loss=metrics.get("test_loss"), acc=metrics["test_acc"])


def report_run(path, by=None):
    """`qml.py report RUN.json`: one run's learning curves, drawn beside it as RUN-curves.png."""
    if by:
        raise UsageError(f"--by compares the runs of a folder; {path} is one run's file: give its folder")
    try:
        with open(path) as file:
            metrics = json.load(file)
        records, config, best = metrics["epochs"], {"head": "quantum", **metrics["config"]}, metrics["best_val_acc"]
        selected, tasks = kept_epoch(metrics), metrics["world_size"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is not a metrics JSON written by qml.py --metrics-json; give one (its learning "
                         f"curves are drawn), or a sweep's folder of them ({WHERE_METRICS_COME_FROM})") from None
    test = kept_test(metrics)
    tested = f", test accuracy {test['acc']:.4f}" if test else ""
    kept = f"epoch {selected} of {len(records)}, validation accuracy {best:.4f}{tested}"
    title = (f"{os.path.basename(path)}: {config['head']} head, --weights {config.get('weights')}, {tasks} task(s); "
             f"kept head: {kept}")
    png_path = os.path.splitext(path)[0] + "-curves.png"
    pictures.save_figure(pictures.learning_curves_figure(records, config.get("n_classes", 2), title, selected, test),
                         png_path)
    print(f"Learning curves: {png_path}\nKept head: {kept}")


def curve_groups(rundir, key, listed=()):
    """[(label, [each run's epoch records], [each run's (kept epoch, test accuracy), or None])] of the metrics
    files in rundir (load_runs has checked them), one group per task count, or per task count and value of
    config[key], in task then value_order."""
    groups, order = {}, value_order(listed)
    for path in sorted(glob.glob(os.path.join(rundir, "*.json"))):
        with open(path) as file:
            metrics = json.load(file)
        value = metrics["config"].get(key) if key else None
        test = kept_test(metrics)
        runs, tests = groups.setdefault((metrics["world_size"], order(value) if key else (), value), ([], []))
        runs.append(metrics["epochs"])
        tests.append((kept_epoch(metrics), test["acc"]) if test else None)
    counts = {tasks for tasks, _, _ in groups}
    labels = {}
    for tasks, _, value in groups:
        at = f" at {tasks} task(s)" if len(counts) > 1 else ""
        labels[tasks, value] = f"{tasks} task(s)" if not key else f"{key.replace('_', '-')}={value}{at}"
    return [(labels[tasks, value], *groups[tasks, rank, value]) for tasks, rank, value in sorted(groups)]


def report_curves(runs, rundir, axis):
    """The sweep's learning curves: one line per task count or varied value (axis: find_axis'), the mean over
    its repeats, in a band of one std."""
    key, listed = axis or (None, ())
    groups = curve_groups(rundir, key, listed)
    name = f"curves-by-{key.replace('_', '-')}.png" if key else "curves.png"
    repeats = max(len(runs_) for _, runs_, _ in groups)
    band = "lines: means over each one's runs, bands: one std" if repeats > 1 else "one run each: no band"
    by = f"--{key.replace('_', '-')}" if key else "task count"
    figure = pictures.curves_band_figure(groups, class_count(runs), f"Learning curves by {by} ({band})")
    pictures.save_figure(figure, os.path.join(rundir, name))
    print(f"Learning curves: {os.path.join(rundir, name)}")


def get_args_parser():
    parser = ArgumentParser(prog="qml.py report", description="Table, CSV and plot of a sweep's metrics JSON files "
                            "and the answer: per task count, or per task count and value of the option the runs "
                            "vary, the runs' means and sample standard deviations.")
    parser.add_argument("rundir", help="folder with the metrics JSON files: runs/<jobid> of submit_qml.sbatch, or "
                        "any folder the runs wrote with qml.py --metrics-json DIR/tasks-N.json; or one run's metrics "
                        "JSON file, whose learning curves are drawn beside it (RUN-curves.png)")
    parser.add_argument("--by", metavar="OPTION", help="compare the runs by this qml.py option (its config key, "
                        "e.g. head or n-qubits) (default: the sweep's --vary, read from RUNDIR/sweep.args; without "
                        "that file, the one option whose value differs between runs of one task count; else none: "
                        "the task counts)")
    parser.add_argument("--tune", metavar="OPTION", action="append", default=[], help="pick for each compared value "
                        "the setting of this option (repeat it, or give a comma list, for several) with the best mean "
                        "selection accuracy, then compare the values at their picks on test accuracy (default: every "
                        "other option the sweep varies, or the hand-made runs differ in)")
    return parser


def main(argv):
    """`qml.py report ARGS` (qml.py hands them over before it loads torch, which no report needs): the exit status;
    a refusal or a failed write is one line on stderr, as qml.py's own."""
    try:
        args = get_args_parser().parse_args(argv)
        if os.path.isfile(args.rundir):
            report_run(args.rundir, args.by)
            return 0
        runs = load_runs(args.rundir)
        axis = find_axis(runs, args.rundir, args.by)
        if args.tune and not axis:
            raise UsageError("--tune picks a setting for each value of a compared option, but these runs compare task "
                             "counts only; name the option to compare with --by OPTION")
        tuned = tuned_keys(runs, args.rundir, axis[0], args.tune) if axis else []
        if axis:
            refuse_pooling(runs, axis[0], tuned)
        if axis and (tuned or any(run["test_acc"] is not None for run in runs)):
            report_tuned(runs, args.rundir, *axis, tuned)
        elif axis:
            report_axis(runs, args.rundir, *axis)
        else:
            report_task_counts(runs, args.rundir)
        return 0
    except (UsageError, RunFailed) as err:
        print("qml.py: error:", " ".join(str(err).split()), file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
