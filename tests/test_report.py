"""`qml.py report`: load_runs, scaling_rows (means, sample std, speedup, efficiency), Welch's t-test, the
answer line and the plot (read from matplotlib's objects, fig._suptitle being the only one matplotlib 3.7 has no
getter for); the compared option (found in sweep.args, in the runs' configs, or named by --by), its rows, answer,
CSV and plot; on hand-made metrics files and rows whose expected values are worked out here by hand."""

import csv
import json
import math
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from matplotlib.container import ErrorbarContainer

from machinery import command_line
import qml
from machinery import report, sweep as sweep_driver


def write_metrics(folder, name, tasks, seconds, best_acc=0.5, best_loss=0.7, val_accs=(0.5,), batch_size=4,
                  weights="imagenet", parameters=None, **config):
    """The fields of a qml.py --metrics-json file that the report reads; config: more of its config (which holds
    every qml.py option); parameters: its trainable_parameters, absent when None (as in files from before it)."""
    metrics = dict(world_size=tasks, config=dict(batch_size=batch_size, weights=weights, **config),
                   training_seconds=seconds, best_val_acc=best_acc, best_val_loss=best_loss,
                   epochs=[dict(val_acc=acc) for acc in val_accs])
    if parameters is not None:
        metrics["trainable_parameters"] = parameters
    (folder / f"{name}.json").write_text(json.dumps(metrics))


def write_repeats(folder, stem, tasks, accs, seconds=10.0, **fields):
    """One metrics file per accuracy, stem-repeat-R.json, whose config differs from its repeats' as a sweep's
    does: seeds (--repeat R adds R), repeat, its own metrics and checkpoint paths; R more seconds each."""
    for repeat, acc in enumerate(accs):
        name = f"{stem}-repeat-{repeat}"
        write_metrics(folder, name, tasks, seconds + repeat, best_acc=acc, seed=42 + repeat, shuffle_seed=repeat,
                      repeat=repeat, metrics_json=[str(folder / f"{name}.json")],
                      checkpoint=str(folder / f"{name}.pt"), **fields)


def record_sweep(folder, *words):
    """folder/sweep.args as submit_qml.sbatch's driver writes it for these arguments."""
    sweep_driver.record_sweep(str(folder), sweep_driver.parse_sweep(list(words)))


def run(tasks, seconds, best_val_acc=0.5, best_val_loss=0.7, final_val_acc=0.5, global_batch=None):
    """One entry of load_runs' list."""
    return dict(tasks=tasks, global_batch=global_batch or 4 * tasks, seconds=seconds, best_val_acc=best_val_acc,
                best_val_loss=best_val_loss, final_val_acc=final_val_acc)


def row(tasks, seconds, acc, acc_std, runs, seconds_std=None):
    """A hand-made scaling row with what answer_line reads."""
    return dict(tasks=tasks, runs=runs, seconds=seconds, seconds_std=seconds_std, best_val_acc=acc,
                best_val_acc_std=acc_std)


def plot_row(tasks, runs, seconds, seconds_std, speedup, efficiency, acc, acc_std):
    """A hand-made scaling row with what the plot reads."""
    return dict(tasks=tasks, runs=runs, seconds=seconds, seconds_std=seconds_std, speedup=speedup,
                efficiency=efficiency, best_val_acc=acc, best_val_acc_std=acc_std)


# ----------------------------------------------------------------------------
# load_runs


def test_load_runs_reads_tasks_seconds_and_best_values(tmp_path):
    write_metrics(tmp_path, "tasks-2", 2, 14.5, best_acc=0.6013, best_loss=0.6874)
    (loaded,) = report.load_runs(str(tmp_path))
    assert (loaded["tasks"], loaded["seconds"], loaded["best_val_acc"], loaded["best_val_loss"]) == (
        2, 14.5, 0.6013, 0.6874)


def test_load_runs_takes_the_final_accuracy_from_the_last_epoch(tmp_path):
    write_metrics(tmp_path, "tasks-1", 1, 10.0, val_accs=(0.5, 0.7, 0.6))
    assert report.load_runs(str(tmp_path))[0]["final_val_acc"] == 0.6


def test_load_runs_global_batch_is_the_per_rank_batch_times_the_tasks(tmp_path):
    write_metrics(tmp_path, "tasks-4", 4, 10.0, batch_size=3)
    assert report.load_runs(str(tmp_path))[0]["global_batch"] == 12


def test_load_runs_sorts_by_task_count_not_by_file_name(tmp_path):
    for tasks in (10, 2, 1):
        write_metrics(tmp_path, f"tasks-{tasks}", tasks, 10.0)
    assert [loaded["tasks"] for loaded in report.load_runs(str(tmp_path))] == [1, 2, 10]


def test_load_runs_keeps_every_repeat_of_a_count(tmp_path):
    for seed in (42, 43, 44):
        write_metrics(tmp_path, f"tasks-2-seed-{seed}", 2, float(seed))
    assert [loaded["seconds"] for loaded in report.load_runs(str(tmp_path))] == [42.0, 43.0, 44.0]


def test_load_runs_refuses_a_json_that_is_not_metrics(tmp_path):
    write_metrics(tmp_path, "tasks-1", 1, 10.0)
    (tmp_path / "notes.json").write_text('{"world_size": 1}')
    with pytest.raises(command_line.UsageError, match="notes.json is not a metrics JSON"):
        report.load_runs(str(tmp_path))


def test_load_runs_refuses_a_folder_without_metrics(tmp_path):
    with pytest.raises(command_line.UsageError, match="no metrics JSON files"):
        report.load_runs(str(tmp_path))


def test_load_runs_reads_the_backbone_weights_from_the_config(tmp_path):
    write_metrics(tmp_path, "tasks-1", 1, 10.0, weights="none")
    assert report.load_runs(str(tmp_path))[0]["weights"] == "none"


def test_random_backbone_counts_are_the_counts_with_a_run_on_weights_none():
    runs = [dict(tasks=1, weights="imagenet"), dict(tasks=2, weights="none"), dict(tasks=2, weights="imagenet"),
            dict(tasks=4, weights="/ckpt/resnet18.pt"), dict(tasks=8, weights="none")]
    assert report.random_backbone_counts(runs) == [2, 8]


# ----------------------------------------------------------------------------
# scaling_rows


def test_rows_average_the_runs_of_each_count():
    (only,) = report.scaling_rows([run(1, 10.0, best_val_acc=0.5), run(1, 14.0, best_val_acc=0.7)])
    assert (only["runs"], only["seconds"], only["best_val_acc"]) == (2, 12.0, 0.6)


def test_rows_give_the_sample_standard_deviation():
    # seconds 10 and 14: mean 12, squared deviations 4 + 4 over n - 1 = 1, std sqrt(8) = 2.83
    (only,) = report.scaling_rows([run(1, 10.0, final_val_acc=0.5), run(1, 14.0, final_val_acc=0.6)])
    assert (only["seconds_std"], only["final_val_acc_std"]) == (2.83, 0.0707)  # sqrt(0.005) = 0.0707


def test_rows_leave_the_std_of_a_single_run_blank():
    (only,) = report.scaling_rows([run(1, 10.0)])
    assert [only[key] for key in only if key.endswith("_std")] == [None, None, None, None]


def test_rows_show_the_global_batch_of_each_count():
    rows = report.scaling_rows([run(1, 10.0, global_batch=16), run(2, 6.0, global_batch=16)])
    assert [r["global_batch"] for r in rows] == [16, 16]


def test_speedup_and_efficiency_come_from_the_mean_times():
    # 1 task: mean 12 s. 2 tasks: mean 6 s -> speedup 12/6 = 2, efficiency 2 * 1/2 = 1.
    # 4 tasks: mean 4 s -> speedup 3, efficiency 3 * 1/4 = 0.75.
    runs = [run(1, 10.0), run(1, 14.0), run(2, 5.0), run(2, 7.0), run(4, 4.0), run(4, 4.0)]
    rows = report.scaling_rows(runs)
    assert [(r["tasks"], r["speedup"], r["efficiency"]) for r in rows] == [(1, 1.0, 1.0), (2, 2.0, 1.0),
                                                                          (4, 3.0, 0.75)]


def test_speedup_is_relative_to_the_smallest_count_when_it_is_not_one():
    # 2 tasks 10 s, 8 tasks 5 s: speedup 2, efficiency 2 * 2/8 = 0.5
    rows = report.scaling_rows([run(2, 10.0), run(8, 5.0)])
    assert (rows[1]["speedup"], rows[1]["efficiency"]) == (2.0, 0.5)


def test_rows_refuse_runs_of_one_count_with_different_global_batches():
    with pytest.raises(command_line.UsageError, match=r"2-task runs have different global batches \[8, 16\]"):
        report.scaling_rows([run(2, 10.0, global_batch=8), run(2, 10.0, global_batch=16)])


# ----------------------------------------------------------------------------
# Welch's t-test (scipy's), checked against the t table


@pytest.mark.parametrize("runs, t", [(2, 4.303), (3, 2.776), (6, 2.228), (16, 2.042)])
def test_welch_p_value_is_5_percent_at_the_tables_critical_values(runs, t):
    # Equal spreads and run counts give 2 * runs - 2 degrees of freedom (2, 4, 10, 30), whose two-sided 5%
    # points the t table lists; means that far apart (t standard errors of the difference) give p = 0.05.
    std = 0.03
    a, b = row(1, 10.0, 0.6 + t * math.sqrt(2 * std**2 / runs), std, runs), row(2, 10.0, 0.6, std, runs)
    assert report.welch_p_value(a, b, "best_val_acc") == pytest.approx(0.05, abs=2e-4)


def test_welch_does_not_pool_unequal_spreads():
    # 0.7 +- 0.1 over 2 runs vs 0.6 +- 0.01 over 10: variances of the means 0.005 and 0.00001, t = 0.1 /
    # sqrt(0.00501) = 1.413 with Welch's df = 0.00501^2 / (0.005^2 / 1 + 0.00001^2 / 9) = 1.004, nearly the
    # Cauchy tail 1 - 2 atan(1.413) / pi = 0.392. A pooled t-test would say t = 3.9, p = 0.003.
    a, b = row(1, 10.0, 0.7, 0.1, 2), row(2, 10.0, 0.6, 0.01, 10)
    assert report.welch_p_value(a, b, "best_val_acc") == pytest.approx(0.392, abs=0.003)


def test_welch_p_value_of_no_difference_is_one():
    a, b = row(1, 10.0, 0.6, 0.02, 3), row(2, 10.0, 0.6, 0.05, 4)
    assert report.welch_p_value(a, b, "best_val_acc") == pytest.approx(1.0, abs=1e-9)


def test_welch_with_equal_spreads_and_runs_has_2n_minus_2_df():
    # std 0.03, 3 runs each: variances of the means 0.0003 + 0.0003, df = 0.0006^2 / (2 * 0.0003^2 / 2) = 4;
    # a difference of 0.068 gives t = 0.068 / sqrt(0.0006) = 2.776, the 5% point of t with 4 df.
    a, b = row(1, 10.0, 0.668, 0.03, 3), row(2, 10.0, 0.600, 0.03, 3)
    assert report.welch_p_value(a, b, "best_val_acc") == pytest.approx(0.05, abs=5e-4)


def test_welch_without_spread_tells_equal_means_from_different_ones():
    same, higher = row(1, 10.0, 0.6, 0.0, 2), row(2, 10.0, 0.7, 0.0, 2)
    assert (report.welch_p_value(same, same, "best_val_acc"), report.welch_p_value(same, higher, "best_val_acc")) == (
        1.0, 0.0)


# ----------------------------------------------------------------------------
# answer_line


def test_single_runs_give_every_counts_time_and_accuracy():
    rows = [row(1, 27.02, 0.6013, None, 1), row(2, 14.5, 0.6013, None, 1), row(4, 9.0, 0.55, None, 1)]
    line = report.answer_line(rows)
    assert line.startswith("Answer: one run per count: 1 task(s) 27.02 s, best accuracy 0.6013; 2 task(s) 14.50 s, "
                           "best accuracy 0.6013; 4 task(s) 9.00 s, best accuracy 0.5500. "), line


def test_single_runs_name_the_fastest_count_even_when_it_is_not_the_most_accurate():
    # 4 tasks: 9.0 s, more than 5% under 14.5 s (9.0 * 1.05 = 9.45); the old line named 2 tasks
    rows = [row(1, 27.02, 0.6013, None, 1), row(2, 14.5, 0.6013, None, 1), row(4, 9.0, 0.55, None, 1)]
    assert ". Fastest: 4 task(s). Highest best accuracy: 1, 2 task(s). " in report.answer_line(rows)


def test_single_runs_within_5_percent_of_the_fastest_are_a_tie():
    # the sweep: 5.22 s both (the 2-task run 1 ms slower); 4 tasks 5.45 s is 4.4% over 5.22
    rows = [row(1, 5.22, 0.5425, None, 1), row(2, 5.22, 0.6013, None, 1), row(4, 5.45, 0.55, None, 1)]
    assert ". Fastest: 1, 2, 4 task(s), a tie (times within 5%). " in report.answer_line(rows)


def test_single_runs_just_over_5_percent_slower_are_no_tie():
    # 5.53 s is 5.9% over 5.22 s
    rows = [row(1, 5.22, 0.5425, None, 1), row(2, 5.53, 0.6013, None, 1)]
    assert ". Fastest: 1 task(s). " in report.answer_line(rows)


def test_single_runs_say_there_is_no_noise_estimate_and_how_to_get_one():
    rows = [row(1, 5.22, 0.5425, None, 1), row(2, 5.22, 0.6013, None, 1), row(8, 2.0, 0.6, None, 1)]
    assert report.answer_line(rows).endswith(
        "Without repeats there is no noise estimate, so these differences may be noise; to get one, run each count "
        "3 times: submit_qml.sbatch 1,2,8 --repeats 3")


def test_random_backbone_runs_get_a_caution_about_their_accuracy():
    rows = [row(1, 5.22, 0.5425, None, 1), row(2, 5.22, 0.6013, None, 1)]
    assert report.answer_line(rows, [1, 2]).endswith(
        "--repeats 3. Caution: 1, 2 task(s) ran with --weights none (a random backbone): their accuracy says "
        "nothing about the method; rerun with --weights imagenet (the default) for that")


def test_imagenet_runs_get_no_caution():
    rows = [row(1, 5.22, 0.5425, None, 1), row(2, 5.22, 0.6013, None, 1)]
    assert "Caution" not in report.answer_line(rows, [])


def test_repeats_name_the_rule_in_the_answer():
    rows = [row(1, 20.0, 0.6, 0.01, 2), row(2, 10.0, 0.6, 0.01, 2)]
    assert "by Welch's t-test at 5%" in report.answer_line(rows)


def test_repeats_with_one_clear_winner_name_it_and_the_less_accurate_counts():
    # 0.80 vs 0.60 with std 0.01 over 3 runs: t = 0.2 / sqrt(2 * 0.0001 / 3) = 24.5, far beyond 2.776 (5%, 4 df)
    rows = [row(1, 30.0, 0.80, 0.01, 3), row(2, 15.0, 0.60, 0.01, 3), row(4, 10.0, 0.58, 0.01, 3)]
    line = report.answer_line(rows)
    assert line.startswith("Answer: 1 task(s) train fastest (30.0 s, mean of 3 runs)"), line
    assert line.endswith(": 1 task(s); 2, 4 task(s) are less accurate"), line


def test_repeats_with_tied_top_accuracy_pick_the_fastest_tied_count():
    # 1 and 2 tasks share the top mean (p = 1); 4 tasks is fastest but 0.20 below (t = 24.5): excluded
    rows = [row(1, 30.0, 0.70, 0.01, 3), row(2, 15.0, 0.70, 0.01, 3), row(4, 10.0, 0.50, 0.01, 3)]
    line = report.answer_line(rows)
    assert line.startswith("Answer: 2 task(s) train fastest (15.0 s, mean of 3 runs)"), line
    assert line.endswith(": 1, 2 task(s); 4 task(s) are less accurate"), line


def test_repeats_all_within_the_noise_say_so_and_pick_the_fastest_count():
    # std 0.05 over 2 runs: 0.62 vs 0.58 gives t = 0.04 / 0.05 = 0.8 with 2 df, p = 0.51
    rows = [row(1, 30.0, 0.62, 0.05, 2), row(2, 15.0, 0.60, 0.05, 2), row(4, 10.0, 0.58, 0.05, 2)]
    line = report.answer_line(rows)
    assert line.startswith("Answer: 4 task(s) train fastest (10.0 s, mean of 2 runs)"), line
    assert line.endswith("all accuracy differences between the task counts are within the noise"), line


def test_repeats_quote_the_top_count_with_its_std():
    rows = [row(1, 30.0, 0.62, 0.05, 2), row(2, 15.0, 0.60, 0.05, 2)]
    assert "(1 task(s): 0.6200 ± 0.0500 std)" in report.answer_line(rows)


def test_repeats_within_5_percent_of_the_fastest_mean_tie_for_fastest():
    # all within the noise (p = 1); 4 tasks 15.6 s is 4% over 2 tasks' 15.0 s, 1 task 30 s is not
    rows = [row(1, 30.0, 0.70, 0.01, 3), row(2, 15.0, 0.70, 0.01, 3), row(4, 15.6, 0.70, 0.01, 3)]
    line = report.answer_line(rows)
    assert line.startswith("Answer: 2, 4 task(s) tie for fastest (mean times 15.0, 15.6 s, within 5%) among the "
                           "counts whose mean best accuracy is within the noise"), line


def test_repeats_on_a_random_backbone_get_the_caution_too():
    rows = [row(1, 30.0, 0.62, 0.05, 2), row(2, 15.0, 0.60, 0.05, 2)]
    line = report.answer_line(rows, [2])
    assert "by Welch's t-test at 5%" in line and line.endswith(". Caution: 2 task(s) ran with --weights none (a "
                                                               "random backbone): their accuracy says nothing about "
                                                               "the method; rerun with --weights imagenet (the "
                                                               "default) for that"), line


def test_a_single_run_beside_repeated_counts_gives_no_answer():
    rows = [row(1, 30.0, 0.62, 0.05, 2), row(2, 15.0, 0.70, None, 1)]
    line = report.answer_line(rows)
    assert line.startswith("Answer: none: 2 task(s) have a single run"), line


def test_repeats_with_identical_accuracies_call_them_identical_not_noise():
    # every run of both counts reached 0.6: no spread, equal means
    rows = [row(1, 30.0, 0.60, 0.0, 3), row(2, 15.0, 0.60, 0.0, 3)]
    line = report.answer_line(rows)
    assert line == ("Answer: 2 task(s) train fastest (15.0 s, mean of 3 runs); the best accuracies are identical: "
                    "every run of every count reached 0.6000"), line


def test_repeats_with_equal_means_but_a_spread_are_within_the_noise_not_identical():
    rows = [row(1, 30.0, 0.60, 0.0, 3), row(2, 15.0, 0.60, 0.02, 3)]
    assert report.answer_line(rows).endswith("all accuracy differences between the task counts are within the noise")


def test_one_count_names_no_fastest_count_and_says_a_speed_comparison_needs_two():
    line = report.answer_line([row(2, 14.5, 0.6013, None, 1)])
    assert line == ("Answer: one task count, 2 task(s): 14.50 s, best accuracy 0.6013 (one run); a speed comparison "
                    "needs at least two task counts, e.g. submit_qml.sbatch 1,2,4,8 --repeats 3"), line


def test_one_repeated_count_gives_its_means_and_stds():
    line = report.answer_line([row(1, 60.27, 0.9413, 0.0065, 3, seconds_std=0.67)])
    assert line.startswith("Answer: one task count, 1 task(s): 60.27 ± 0.67 s, best accuracy 0.9413 ± 0.0065 (mean ± "
                           "std of 3 runs); "), line


def test_one_count_on_a_random_backbone_gets_the_caution():
    assert ". Caution: 1 task(s) ran with --weights none" in report.answer_line([row(1, 10.0, 0.6, None, 1)], [1])


# ----------------------------------------------------------------------------
# main: table, CSV and plot


@pytest.fixture
def sweep(tmp_path):
    """A 1,2 sweep folder with two repeats of 1 task and one run of 2 tasks."""
    write_metrics(tmp_path, "tasks-1-seed-42", 1, 10.0, best_acc=0.5)
    write_metrics(tmp_path, "tasks-1-seed-43", 1, 14.0, best_acc=0.7)
    write_metrics(tmp_path, "tasks-2", 2, 6.0, best_acc=0.6)
    return tmp_path


def read_csv(folder):
    with open(folder / "scaling.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_report_csv_has_mean_and_std_columns(sweep, capsys):
    assert qml.main(["report", str(sweep)]) == 0
    assert list(read_csv(sweep)[0]) == [
        "tasks", "runs", "global_batch", "seconds", "seconds_std", "speedup", "efficiency", "best_val_acc",
        "best_val_acc_std", "final_val_acc", "final_val_acc_std", "best_val_loss", "best_val_loss_std"]


def test_report_csv_leaves_the_std_of_a_single_run_blank(sweep, capsys):
    qml.main(["report", str(sweep)])
    repeated, single = read_csv(sweep)
    assert (repeated["seconds_std"], single["seconds_std"]) == (str(round(math.sqrt(8), 2)), "")


def test_report_table_shows_a_blank_cell_for_the_std_of_a_single_run(sweep, capsys):
    qml.main(["report", str(sweep)])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |")]
    assert table == ["| 2 | 1 | 8 | 6.0 |  | 2.0 | 1.0 | 0.6 |  | 0.5 |  | 0.7 |  |"]


def test_report_writes_a_png_plot(sweep, capsys):
    qml.main(["report", str(sweep)])
    assert (sweep / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_qml_py_report_loads_neither_torch_nor_pennylane(sweep):
    """The sweep's last step: qml.py hands `report` over before its imports of torch and PennyLane (seconds each)."""
    probe = ("import atexit, runpy, sys; atexit.register(lambda: print('LOADED', 'torch' in sys.modules, "
             f"'pennylane' in sys.modules)); sys.argv = ['qml.py', 'report', {str(sweep)!r}]; "
             "runpy.run_path('qml.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Answer" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "LOADED False False", proc.stdout


def test_report_of_a_one_count_folder_names_no_fastest_count(tmp_path, capsys):
    write_repeats(tmp_path, "tasks-1", 1, (0.94, 0.95, 0.96))
    assert qml.main(["report", str(tmp_path)]) == 0
    (answer,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Answer:")]
    assert answer.startswith("Answer: one task count, 1 task(s): 11.00 ± 1.00 s, best accuracy 0.9500 ± 0.0100 (mean "
                             "± std of 3 runs)") and "Fastest" not in answer, answer


def test_report_cautions_when_a_metrics_file_records_weights_none(tmp_path, capsys):
    write_metrics(tmp_path, "tasks-1", 1, 10.0, weights="imagenet")
    write_metrics(tmp_path, "tasks-2", 2, 6.0, weights="none")
    qml.main(["report", str(tmp_path)])
    (answer,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Answer:")]
    assert ". Caution: 2 task(s) ran with --weights none" in answer, answer


# ----------------------------------------------------------------------------
# The plot, read from matplotlib's objects before it is saved


@pytest.fixture
def figure():
    """plot_figure(rows, random_counts), closed after the test."""
    made = []

    def make(rows, random_counts=()):
        made.append(report.plot_figure(rows, random_counts))
        return made[-1]

    yield make
    for fig in made:
        report.pyplot().close(fig)


SINGLE_RUNS = [plot_row(1, 1, 5.22, None, 1.0, 1.0, 0.5425, None), plot_row(2, 1, 5.22, None, 1.0, 0.5, 0.6013, None)]
# 1 task: 10 +- 1 s over 3 runs; 2 tasks: one run of 6 s; 4 tasks: 4 +- 0.4 s over 2 runs
MIXED_RUNS = [plot_row(1, 3, 10.0, 1.0, 1.0, 1.0, 0.70, 0.05), plot_row(2, 1, 6.0, None, 1.67, 0.83, 0.60, None),
              plot_row(4, 2, 4.0, 0.4, 2.5, 0.62, 0.65, 0.10)]


def error_bars(axes):
    """{x: (low, high)} of the error bars drawn on axes."""
    bars = {}
    for container in axes.containers:
        if isinstance(container, ErrorbarContainer):
            for (x, low), (_, high) in container.lines[2][0].get_segments():
                bars[float(x)] = (float(low), float(high))
    return bars


def panel(fig, title):
    (axes,) = [axes for axes in fig.axes if axes.get_title().startswith(title)]
    return axes


def test_plot_has_one_panel_each_for_time_speedup_and_accuracy(figure):
    fig = figure(SINGLE_RUNS)
    assert [axes.get_title() for axes in fig.axes] == ["Training time", "Speedup (labels: parallel efficiency)",
                                                       "Best validation accuracy"]


def test_plot_shows_the_mean_seconds_of_each_count(figure):
    lines = panel(figure(MIXED_RUNS), "Training time").get_lines()
    (measured,) = [line for line in lines if line.get_label() == "measured"]
    assert (list(measured.get_xdata()), list(measured.get_ydata())) == ([1, 2, 4], [10.0, 6.0, 4.0])


def test_plot_draws_time_error_bars_only_at_repeated_counts(figure):
    # 1 task: 10 +- 1 s; 2 tasks a single run: none; 4 tasks: 4 +- 0.4 s
    bars = error_bars(panel(figure(MIXED_RUNS), "Training time"))
    assert bars == {1.0: pytest.approx((9.0, 11.0)), 4.0: pytest.approx((3.6, 4.4))}


def test_plot_time_axis_starts_at_zero_and_shows_the_highest_error_bar(figure):
    # highest: 10 + 1 s at 1 task, and a tenth more
    assert panel(figure(MIXED_RUNS), "Training time").get_ylim() == pytest.approx((0, 12.1))


def test_plot_draws_the_ideal_speedup_from_the_smallest_count(figure):
    # smallest count 2: ideal speedups 2/2, 4/2, 8/2
    rows = [plot_row(2, 1, 8.0, None, 1.0, 1.0, 0.7, None), plot_row(4, 1, 5.0, None, 1.6, 0.8, 0.7, None),
            plot_row(8, 1, 4.0, None, 2.0, 0.5, 0.7, None)]
    (ideal,) = [line for line in panel(figure(rows), "Speedup").get_lines() if line.get_label() == "ideal (linear)"]
    assert (list(ideal.get_xdata()), list(ideal.get_ydata())) == ([2, 4, 8], [1.0, 2.0, 4.0])


def test_plot_labels_each_speedup_point_with_its_efficiency(figure):
    assert [text.get_text() for text in panel(figure(MIXED_RUNS), "Speedup").texts] == ["100%", "83%", "62%"]


def test_plot_accuracy_axis_runs_from_chance_to_one(figure):
    # accuracies 0.54 and 0.60 (the issue's): the axis still spans 0.5 to 1, padded by 0.02
    assert panel(figure(SINGLE_RUNS), "Best validation").get_ylim() == pytest.approx((0.48, 1.02))


def test_plot_accuracy_axis_reaches_below_chance_to_show_every_error_bar(figure):
    # 0.50 - 0.07 = 0.43, down to the next 0.05 (0.40), padded by 0.02
    rows = [plot_row(1, 2, 10.0, 1.0, 1.0, 1.0, 0.50, 0.07), plot_row(2, 2, 5.0, 0.5, 2.0, 1.0, 0.60, 0.01)]
    assert panel(figure(rows), "Best validation").get_ylim() == pytest.approx((0.38, 1.02))


def test_plot_of_single_runs_draws_no_error_bars(figure):
    fig = figure(SINGLE_RUNS)
    assert [error_bars(axes) for axes in fig.axes] == [{}, {}, {}]


def test_plot_of_single_runs_says_there_is_no_noise_estimate(figure):
    assert figure(SINGLE_RUNS)._suptitle.get_text() == (
        "Python_QML_Basics scaling: one run per count: no error bars, no noise estimate (--repeats 3 gives one)")


def test_plot_draws_accuracy_error_bars_only_at_repeated_counts(figure):
    # 1 task: 0.70 +- 0.05; 2 tasks a single run: none; 4 tasks: 0.65 +- 0.10
    bars = error_bars(panel(figure(MIXED_RUNS), "Best validation"))
    assert sorted(bars) == [1.0, 4.0]
    assert (bars[1.0], bars[4.0]) == (pytest.approx((0.65, 0.75)), pytest.approx((0.55, 0.75)))


def test_plot_draws_speedup_error_bars_where_the_count_and_the_smallest_one_are_repeated(figure):
    # 4 tasks: speedup 2.5, relative stds 0.4/4 and 1/10 -> 2.5 * sqrt(0.1^2 + 0.1^2) = 0.3536. 2 tasks: one run,
    # no bar; 1 task: the reference, no bar.
    bars = error_bars(panel(figure(MIXED_RUNS), "Speedup"))
    assert sorted(bars) == [4.0] and bars[4.0] == pytest.approx((2.5 - 0.3536, 2.5 + 0.3536), abs=1e-4)


def test_plot_title_names_the_counts_with_error_bars(figure):
    assert figure(MIXED_RUNS)._suptitle.get_text().endswith(
        "error bars: one std over the runs, only at 1, 4 task(s) (the repeated counts)")


def test_plot_of_repeats_at_every_count_says_what_its_error_bars_are(figure):
    rows = [plot_row(1, 2, 10.0, 1.0, 1.0, 1.0, 0.70, 0.05), plot_row(2, 3, 5.0, 0.5, 2.0, 1.0, 0.60, 0.01)]
    assert figure(rows)._suptitle.get_text().endswith("error bars: one std over each count's runs; points: means")


def test_plot_names_a_random_backbone_in_the_accuracy_title(figure):
    title = panel(figure(SINGLE_RUNS, [1, 2]), "Best validation").get_title()
    assert title == "Best validation accuracy\non a random backbone (--weights none)"


# ----------------------------------------------------------------------------
# The compared option: found in sweep.args, in the runs' configs or by --by


def value_row(value, acc, acc_std, runs, tasks=1, seconds=10.0, seconds_std=None):
    """A hand-made row of axis_rows by --head."""
    return dict(tasks=tasks, head=value, runs=runs, seconds=seconds, seconds_std=seconds_std, best_val_acc=acc,
                best_val_acc_std=acc_std)


RERUN = "submit_qml.sbatch 1 --vary head=quantum,classical --repeats 3"


def p_value(text, label):
    """The p-value the answer gives for label."""
    return float(re.search(rf"{label} [a-z ]+ \([^)]*, p = ([0-9.e+-]+)\)", text).group(1))


def test_axis_answer_tells_a_clear_difference_apart():
    # 0.95 vs 0.80, std 0.01 over 5 runs each: t = 0.15 / sqrt(2 * 0.0001 / 5) = 23.7 with 8 df, p ~ 1e-8
    rows = [value_row("quantum", 0.95, 0.01, 5), value_row("classical", 0.80, 0.01, 5)]
    line = report.axis_answer(rows, "head", RERUN)
    assert line.startswith("head=quantum has the highest mean best accuracy (0.9500 ± 0.0100 std, 5 runs); by "
                           "Welch's t-test at 5%: head=classical is less accurate (0.8000 ± 0.0100, p = "), line
    assert p_value(line, "head=classical") < 1e-6


def test_axis_answer_names_the_top_value_wherever_it_is_listed():
    rows = [value_row("quantum", 0.80, 0.01, 5), value_row("classical", 0.95, 0.01, 5)]
    assert report.axis_answer(rows, "head", RERUN).startswith("head=classical has the highest mean best accuracy")


def test_axis_answer_calls_a_difference_within_the_spread_within_the_noise():
    # 0.95 vs 0.94, std 0.03 over 3 runs: t = 0.01 / sqrt(2 * 0.0009 / 3) = 0.408 with 4 df, p = 0.70
    rows = [value_row("quantum", 0.95, 0.03, 3), value_row("classical", 0.94, 0.03, 3)]
    line = report.axis_answer(rows, "head", RERUN)
    assert line.endswith("head=classical is within the noise (0.9400 ± 0.0300, p = 0.7)"), line


def test_axis_answer_gives_each_other_value_its_own_verdict():
    rows = [value_row("quantum", 0.95, 0.03, 3), value_row("classical", 0.94, 0.03, 3),
            value_row("linear", 0.80, 0.01, 3)]
    line = report.axis_answer(rows, "head", RERUN)
    assert "head=classical is within the noise" in line and "; head=linear is less accurate (0.8000" in line, line


def test_axis_answer_calls_values_without_spread_identical():
    rows = [value_row("quantum", 0.95, 0.0, 3), value_row("classical", 0.95, 0.0, 3)]
    line = report.axis_answer(rows, "head", RERUN)
    assert line.endswith("head=classical is identical (0.9500 ± 0.0000: every run of both reached it)"), line


def test_axis_answer_of_one_run_per_value_runs_no_test_and_says_how_to_get_one():
    rows = [value_row("quantum", 0.95, None, 1), value_row("classical", 0.80, None, 1)]
    assert report.axis_answer(rows, "head", RERUN) == (
        "one run per value, best accuracy: head=quantum 0.9500; head=classical 0.8000; highest: head=quantum. "
        "Without repeats there is no noise estimate, so no test can tell these apart; to get one: " + RERUN)


def test_axis_answer_gives_none_for_a_single_run_beside_repeated_values():
    rows = [value_row("quantum", 0.95, 0.01, 3), value_row("classical", 0.80, None, 1)]
    assert report.axis_answer(rows, "head", RERUN).startswith("none: head=classical ran once, so the spread is unknown")


def test_axis_answer_of_a_single_value_has_nothing_to_compare():
    line = report.axis_answer([value_row("quantum", 0.95, 0.01, 3)], "head", RERUN)
    assert line == "every run has head=quantum: there is no other value to compare it with"


@pytest.fixture
def heads(tmp_path):
    """submit_qml.sbatch 1 --vary head=quantum,classical,linear --repeats 5 on ImageNet weights, hand-made:
    quantum 0.95 +- 0.0071 (2086 parameters), classical 0.80 +- 0.0071 (2082), linear 0.94 +- 0.01 (1026)."""
    record_sweep(tmp_path, "1", "--repeats", "5", "--vary", "head=quantum,classical,linear")
    write_repeats(tmp_path, "tasks-1-head-quantum", 1, (0.94, 0.96, 0.95, 0.95, 0.95), seconds=90.0,
                  head="quantum", parameters=2086)
    write_repeats(tmp_path, "tasks-1-head-classical", 1, (0.79, 0.81, 0.80, 0.80, 0.80), seconds=40.0,
                  head="classical", parameters=2082)
    write_repeats(tmp_path, "tasks-1-head-linear", 1, (0.93, 0.95, 0.94, 0.93, 0.95), seconds=38.0,
                  head="linear", parameters=1026)
    return tmp_path


def report_lines(folder, capsys, *options):
    """The report's output lines; it must succeed."""
    assert qml.main(["report", str(folder), *options]) == 0
    return capsys.readouterr().out.splitlines()


def answers(lines):
    return [line for line in lines if line.startswith("Answer")]


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_report_compares_the_values_that_sweep_args_varies(heads, capsys):
    # linear vs quantum: variances of the means 0.0001/5 and 0.00005/5, t = 0.01 / sqrt(0.00003) = 1.83, p = 0.11
    (answer,) = answers(report_lines(heads, capsys))
    assert answer.startswith("Answer: head=quantum has the highest mean best accuracy (0.9500 ± 0.0071 std, 5 runs); "
                             "by Welch's t-test at 5%: head=classical is less accurate (0.8000 ± 0.0071, p = "), answer
    assert answer.endswith("; head=linear is within the noise (0.9400 ± 0.0100, p = 0.11)"), answer


def test_report_by_value_writes_a_csv_row_per_value_in_the_sweeps_order(heads, capsys):
    report_lines(heads, capsys)
    rows = read_rows(heads / "by-head.csv")
    assert list(rows[0]) == ["tasks", "head", "runs", "trainable_parameters", "seconds", "seconds_std",
                             "best_val_acc", "best_val_acc_std", "best_val_loss", "best_val_loss_std"]
    assert [(r["head"], r["runs"], r["trainable_parameters"], r["seconds"], r["best_val_acc"]) for r in rows] == [
        ("quantum", "5", "2086", "92.0", "0.95"), ("classical", "5", "2082", "42.0", "0.8"),
        ("linear", "5", "1026", "40.0", "0.94")]


def test_report_by_value_prints_the_table_and_writes_the_plot(heads, capsys):
    lines = report_lines(heads, capsys)
    assert "| 1 | classical | 5 | 2082 | 42.0 | 1.58 | 0.8 | 0.0071 | 0.7 | 0.0 |" in lines
    assert (heads / "by-head.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (heads / "scaling.csv").exists()


def test_report_leaves_the_parameters_blank_in_files_without_them(tmp_path, capsys):
    write_repeats(tmp_path, "tasks-1-head-quantum", 1, (0.94, 0.96), head="quantum")
    write_repeats(tmp_path, "tasks-1-head-linear", 1, (0.80, 0.82), head="linear", parameters=1026)
    report_lines(tmp_path, capsys)
    assert [(r["head"], r["trainable_parameters"]) for r in read_rows(tmp_path / "by-head.csv")] == [
        ("linear", "1026"), ("quantum", "")]


def test_report_cautions_that_heads_on_a_random_backbone_compare_random_features(tmp_path, capsys):
    write_repeats(tmp_path, "tasks-1-head-quantum", 1, (0.55, 0.57), head="quantum", weights="none")
    write_repeats(tmp_path, "tasks-1-head-classical", 1, (0.56, 0.58), head="classical", weights="none")
    (answer,) = answers(report_lines(tmp_path, capsys))
    assert answer.endswith(
        ". Caution: these runs used --weights none (a random backbone): the comparison is between --head classical, "
        "quantum on random features, not ImageNet features, so it says nothing about them on real features; rerun "
        "with --weights imagenet (the default) for that"), answer


def test_report_of_imagenet_heads_gives_no_caution(heads, capsys):
    assert "Caution" not in answers(report_lines(heads, capsys))[0]


def test_report_finds_the_option_hand_made_runs_differ_in(tmp_path, capsys):
    # no sweep.args; the repeats differ in seeds and paths, the counts in the per-rank batch (--global-batch-size 8)
    for tasks in (1, 2):
        for head, accs in (("quantum", (0.94, 0.96)), ("linear", (0.80, 0.82))):
            write_repeats(tmp_path, f"tasks-{tasks}-head-{head}", tasks, accs, head=head, batch_size=8 // tasks,
                          global_batch_size=8)
    assert [line.partition(":")[0] for line in answers(report_lines(tmp_path, capsys))] == [
        "Answer at 1 task(s)", "Answer at 2 task(s)"]
    assert [(r["tasks"], r["head"]) for r in read_rows(tmp_path / "by-head.csv")] == [
        ("1", "linear"), ("1", "quantum"), ("2", "linear"), ("2", "quantum")]


def test_report_takes_files_without_a_head_for_the_quantum_head(tmp_path, capsys):
    write_repeats(tmp_path, "tasks-1", 1, (0.94, 0.96))  # written before --head
    write_repeats(tmp_path, "tasks-1-head-classical", 1, (0.80, 0.82), head="classical")
    report_lines(tmp_path, capsys)
    assert [r["head"] for r in read_rows(tmp_path / "by-head.csv")] == ["classical", "quantum"]


def test_report_of_a_sweep_without_vary_compares_the_task_counts(tmp_path, capsys):
    # the 2-task runs differ in --head, as hand-made runs of a head comparison would, but the sweep varied nothing
    record_sweep(tmp_path, "1,2", "--repeats", "2")
    write_repeats(tmp_path, "tasks-1", 1, (0.94, 0.96), head="quantum")
    write_metrics(tmp_path, "tasks-2-repeat-0", 2, 6.0, head="quantum")
    write_metrics(tmp_path, "tasks-2-repeat-1", 2, 6.0, head="linear")
    report_lines(tmp_path, capsys)
    assert (tmp_path / "scaling.csv").exists() and not (tmp_path / "by-head.csv").exists()


def test_varied_keys_ignore_seeds_paths_and_what_follows_the_task_count():
    runs = [dict(tasks=tasks, config=dict(batch_size=8 // tasks, seed=42 + repeat, repeat=repeat, head=head,
                                          checkpoint=f"{tasks}-{head}-{repeat}.pt", circuit=head))
            for tasks in (1, 2) for head in ("quantum", "linear") for repeat in (0, 1)]
    assert report.varied_keys(runs) == ["head"]


@pytest.fixture
def two_options(tmp_path):
    """Hand-made runs that differ in --head and in --n-qubits."""
    write_repeats(tmp_path, "tasks-1-a", 1, (0.94, 0.96), head="quantum", n_qubits=4)
    write_repeats(tmp_path, "tasks-1-b", 1, (0.80, 0.82), head="classical", n_qubits=2)
    return tmp_path


def test_report_refuses_runs_that_differ_in_two_options_asking_for_by(two_options, capsys):
    assert qml.main(["report", str(two_options)]) == 2
    assert capsys.readouterr().err == ("qml.py: error: the runs of one task count differ in head, n-qubits: name the "
                                       "option to compare them by with --by OPTION\n")


def test_report_by_compares_the_option_named(two_options, capsys):
    report_lines(two_options, capsys, "--by", "n-qubits")
    assert [r["n-qubits"] for r in read_rows(two_options / "by-n-qubits.csv")] == ["2", "4"]


def test_report_by_refuses_an_option_of_no_run_in_one_line(heads, capsys):
    assert qml.main(["report", str(heads), "--by", "q-depth"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("qml.py: error: --by q-depth: q-depth is not an option in every run's config; compare by "
                            "one that is with --by OPTION: batch-size, checkpoint, head, ") and error.count("\n") == 1


def test_report_refuses_a_sweep_args_option_no_run_holds_in_one_line(tmp_path, capsys):
    record_sweep(tmp_path, "1", "--vary", "n-qub=2,4")  # qml.py took it for --n-qubits: argparse allows a prefix
    write_repeats(tmp_path, "tasks-1-n-qub-2", 1, (0.94,), n_qubits=2)
    write_repeats(tmp_path, "tasks-1-n-qub-4", 1, (0.80,), n_qubits=4)
    assert qml.main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"qml.py: error: {tmp_path}/sweep.args varies --n-qub, which is not an option in every "
                            f"run's config") and error.count("\n") == 1


# ----------------------------------------------------------------------------
# The plot by value, read from matplotlib's objects


def test_value_plot_has_a_time_and_an_accuracy_panel_against_the_values(figure_by):
    fig = figure_by(AXIS_ROWS)
    assert [(axes.get_title(), axes.get_xlabel()) for axes in fig.axes] == [
        ("Training time", "--head"), ("Best validation accuracy", "--head")]
    assert [[label.get_text() for label in axes.get_xticklabels()] for axes in fig.axes] == [
        ["quantum", "linear"], ["quantum", "linear"]]


def test_value_plot_draws_one_series_per_task_count_side_by_side(figure_by):
    # two counts: each series shifted by half of SERIES_SHIFT (0.08) from the value's place
    series = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
              for line in panel(figure_by(AXIS_ROWS), "Training time").get_lines() if "task" in line.get_label()}
    assert series == {"1 task(s)": ([pytest.approx(-0.04), pytest.approx(0.96)], [90.0, 38.0]),
                      "2 task(s)": ([pytest.approx(0.04), pytest.approx(1.04)], [50.0, 20.0])}


def test_value_plot_draws_error_bars_only_at_repeated_values(figure_by):
    # quantum at 1 task: 0.95 +- 0.01; linear at 1 task: one run; 2 tasks: 0.94 +- 0.02 and 0.80 +- 0.01
    bars = sorted(error_bars(panel(figure_by(AXIS_ROWS), "Best validation")).items())
    assert [(x, *bar) for x, bar in bars] == [pytest.approx(bar) for bar in ((-0.04, 0.94, 0.96), (0.04, 0.92, 0.96),
                                                                             (1.04, 0.79, 0.81))]


def test_value_plot_title_names_where_the_error_bars_are(figure_by):
    assert figure_by(AXIS_ROWS)._suptitle.get_text() == (
        "Python_QML_Basics by --head: error bars: one std over the runs, only at head=quantum at 1 task(s), "
        "head=quantum at 2 task(s), head=linear at 2 task(s) (the repeated values)")


def test_value_plot_names_a_random_backbone_in_the_accuracy_title(figure_by):
    title = panel(figure_by(AXIS_ROWS, random_backbone=True), "Best validation").get_title()
    assert title == "Best validation accuracy\non a random backbone (--weights none)"


AXIS_ROWS = [value_row("quantum", 0.95, 0.01, 3, seconds=90.0, seconds_std=1.0),
             value_row("linear", 0.80, None, 1, seconds=38.0),
             value_row("quantum", 0.94, 0.02, 3, tasks=2, seconds=50.0, seconds_std=1.0),
             value_row("linear", 0.80, 0.01, 3, tasks=2, seconds=20.0, seconds_std=0.5)]


@pytest.fixture
def figure_by():
    """axis_figure(rows, "head", random_backbone), closed after the test."""
    made = []

    def make(rows, random_backbone=False):
        made.append(report.axis_figure(rows, "head", random_backbone))
        return made[-1]

    yield make
    for fig in made:
        report.pyplot().close(fig)
