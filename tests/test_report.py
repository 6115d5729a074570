"""`qml.py report`: load_runs, scaling_rows (means, sample std, speedup, efficiency), Welch's t-test, the
answer line and the plot (read from matplotlib's objects, fig._suptitle being the only one matplotlib 3.7 has no
getter for), on hand-made metrics files and rows whose expected values are worked out here by hand."""

import csv
import json
import math

import pytest
from matplotlib.container import ErrorbarContainer

import command_line
import qml
import report


def write_metrics(folder, name, tasks, seconds, best_acc=0.5, best_loss=0.7, val_accs=(0.5,), batch_size=4,
                  weights="imagenet"):
    """The fields of a qml.py --metrics-json file that the report reads."""
    metrics = dict(world_size=tasks, config=dict(batch_size=batch_size, weights=weights), training_seconds=seconds,
                   best_val_acc=best_acc, best_val_loss=best_loss, epochs=[dict(val_acc=acc) for acc in val_accs])
    (folder / f"{name}.json").write_text(json.dumps(metrics))


def run(tasks, seconds, best_val_acc=0.5, best_val_loss=0.7, final_val_acc=0.5, global_batch=None):
    """One entry of load_runs' list."""
    return dict(tasks=tasks, global_batch=global_batch or 4 * tasks, seconds=seconds, best_val_acc=best_val_acc,
                best_val_loss=best_val_loss, final_val_acc=final_val_acc)


def row(tasks, seconds, acc, acc_std, runs):
    """A hand-made scaling row with what answer_line reads."""
    return dict(tasks=tasks, runs=runs, seconds=seconds, best_val_acc=acc, best_val_acc_std=acc_std)


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


# ----------------------------------------------------------------------------
# report_main: table, CSV and plot


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


def test_plot_has_one_panel_for_speedup_and_one_for_accuracy(figure):
    fig = figure(SINGLE_RUNS)
    assert [axes.get_title() for axes in fig.axes] == ["Speedup (labels: parallel efficiency)",
                                                       "Best validation accuracy"]


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
    assert [error_bars(axes) for axes in fig.axes] == [{}, {}]


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
