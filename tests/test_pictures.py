"""pictures.py and the reports that draw with it, read back from matplotlib's objects: one run's learning curves
(`qml.py report RUN.json`, torch-free), a sweep's curves by task count or value (means and one-std bands over
repeats), the prediction grid (wrong predictions in red) and the confusion matrix; chance lines at one over the
number of classes. Hand-made metrics and tiles, whose expected values are worked out here."""

import json
import statistics
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from matplotlib.collections import PolyCollection

import qml
from machinery import pictures, report

EPOCHS = [dict(epoch=1, train_loss=1.2, train_acc=0.40, val_loss=1.0, val_acc=0.50),
          dict(epoch=2, train_loss=0.9, train_acc=0.60, val_loss=0.8, val_acc=0.70),
          dict(epoch=3, train_loss=0.7, train_acc=0.80, val_loss=0.9, val_acc=0.60)]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    pictures.pyplot().close("all")


def line_labelled(axis, label):
    (line,) = [line for line in axis.get_lines() if line.get_label() == label]
    return line


def write_run(path, epochs=EPOCHS, n_classes=3, tasks=1, **fields):
    """A metrics JSON with what the curves read; fields: more top-level keys (selected_epoch, test_acc, ...)."""
    best = max(epoch["val_acc"] for epoch in epochs)
    path.write_text(json.dumps(dict(world_size=tasks, config=dict(batch_size=4, weights="none", n_classes=n_classes,
                                                                  head="quantum", seed=42 + fields.pop("repeat", 0)),
                                    training_seconds=10.0, best_val_acc=best, best_val_loss=0.8, epochs=epochs,
                                    **fields)))
    return path


# ----------------------------------------------------------------------------
# One run's learning curves


def test_one_runs_curves_draw_each_parts_loss_and_accuracy_per_epoch():
    fig = pictures.learning_curves_figure(EPOCHS, 3, "run", selected_epoch=2)
    ax_loss, ax_acc = fig.axes
    for axis, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
        for key, label in (("train", "train"), ("val", "validation")):
            line = line_labelled(axis, label)
            assert list(line.get_xdata()) == [1, 2, 3]
            assert list(line.get_ydata()) == [epoch[f"{key}_{metric}"] for epoch in EPOCHS]
    assert list(line_labelled(ax_acc, "kept head (epoch 2)").get_xdata()) == [2, 2]


def test_one_runs_curves_mark_the_kept_heads_test_accuracy_and_loss_at_its_epoch():
    fig = pictures.learning_curves_figure(EPOCHS, 3, "run", selected_epoch=2, test=dict(loss=0.85, acc=0.65))
    ax_loss, ax_acc = fig.axes
    star = line_labelled(ax_acc, "test, kept head (0.6500)")
    assert (list(star.get_xdata()), list(star.get_ydata()), star.get_marker()) == ([2], [0.65], "*")
    assert list(line_labelled(ax_loss, "test, kept head (0.8500)").get_ydata()) == [0.85]


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_the_chance_line_and_the_accuracy_axis_follow_the_number_of_classes(n_classes):
    _, ax_acc = pictures.learning_curves_figure(EPOCHS, n_classes, "run").axes
    chance = line_labelled(ax_acc, f"chance (1/{n_classes}: {n_classes} classes)")
    assert list(chance.get_ydata()) == [1 / n_classes] * 2
    low = min(1 / n_classes, 0.4) // 0.05 * 0.05  # the axis reaches chance or the lowest point (train: 0.40)
    assert ax_acc.get_ylim() == pytest.approx((low - pictures.ACCURACY_PAD, 1 + pictures.ACCURACY_PAD))


def test_qml_py_report_of_a_run_json_draws_its_curves_beside_it_without_torch(tmp_path):
    run = write_run(tmp_path / "run.json", selected_epoch=2, test_acc=0.65, test_loss=0.85, test_count=20)
    probe = ("import atexit, runpy, sys; atexit.register(lambda: print('LOADED', 'torch' in sys.modules)); "
             f"sys.argv = ['qml.py', 'report', {str(run)!r}]; runpy.run_path('qml.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"Learning curves: {tmp_path / 'run-curves.png'}",
                                        "Kept head: epoch 2 of 3, validation accuracy 0.7000, test accuracy 0.6500",
                                        "LOADED False"]
    assert (tmp_path / "run-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_a_recorded_kept_epoch_keeps_the_first_with_the_best_accuracy(tmp_path, capsys):
    epochs = [dict(EPOCHS[0], val_acc=0.7), *EPOCHS[1:]]  # epochs 1 and 2 reach 0.7
    assert qml.main(["report", str(write_run(tmp_path / "old.json", epochs))]) == 0
    assert "Kept head: epoch 1 of 3, validation accuracy 0.7000" in capsys.readouterr().out


def test_report_of_a_json_that_is_no_metrics_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "other.json").write_text("[1, 2]")
    assert qml.main(["report", str(tmp_path / "other.json")]) == 2
    assert "is not a metrics JSON written by qml.py --metrics-json" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# A sweep's curves: means and one-std bands over repeats


def test_mean_band_is_the_mean_and_sample_std_at_each_epoch():
    runs = [[dict(epoch=1, val_acc=0.5), dict(epoch=2, val_acc=0.7)],
            [dict(epoch=1, val_acc=0.6), dict(epoch=2, val_acc=0.9)], [dict(epoch=1, val_acc=0.7)]]
    epochs, means, stds = pictures.mean_band(runs, "val_acc")
    assert epochs == [1, 2]
    assert means == pytest.approx([0.6, 0.8]) and stds == pytest.approx([0.1, statistics.stdev([0.7, 0.9])])


def test_sweep_report_draws_curves_per_task_count_with_their_mean_and_band(tmp_path, capsys):
    for repeat, shift in enumerate((-0.05, 0.05)):
        write_run(tmp_path / f"tasks-1-repeat-{repeat}.json", [dict(e, val_acc=e["val_acc"] + shift) for e in EPOCHS],
                  repeat=repeat)
    write_run(tmp_path / "tasks-2.json", tasks=2)
    assert qml.main(["report", str(tmp_path)]) == 0
    assert f"Learning curves: {tmp_path / 'curves.png'}" in capsys.readouterr().out
    groups = report.curve_groups(str(tmp_path), None)
    assert [(label, len(runs)) for label, runs, _ in groups] == [("1 task(s)", 2), ("2 task(s)", 1)]
    fig = pictures.curves_band_figure(groups, 3, "sweep")
    (val_acc,) = [axis for axis in fig.axes if axis.get_title() == "validation accuracy"]
    assert list(line_labelled(val_acc, "1 task(s)").get_ydata()) == pytest.approx([0.5, 0.7, 0.6])
    (band, _) = [c for c in val_acc.collections if isinstance(c, PolyCollection)]
    low, high = np.min(band.get_paths()[0].vertices[:, 1]), np.max(band.get_paths()[0].vertices[:, 1])
    assert (low, high) == pytest.approx((0.5 - statistics.stdev([0.45, 0.55]), 0.7 + statistics.stdev([0.65, 0.75])))


def test_sweep_curves_by_a_varied_option_are_one_line_per_value(tmp_path):
    for head in ("quantum", "linear"):
        path = write_run(tmp_path / f"{head}.json")
        metrics = json.loads(path.read_text())
        metrics["config"]["head"] = head
        path.write_text(json.dumps(metrics))
    assert [label for label, _, _ in report.curve_groups(str(tmp_path), "head", ("quantum", "linear"))] == [
        "head=quantum", "head=linear"]


def test_sweep_curves_mark_the_kept_heads_mean_test_accuracy_with_a_one_std_bar(tmp_path):
    for repeat, (epoch, acc) in enumerate(((2, 0.6), (3, 0.7))):
        write_run(tmp_path / f"r{repeat}.json", selected_epoch=epoch, test_acc=acc, test_loss=0.9, repeat=repeat)
    groups = report.curve_groups(str(tmp_path), None)
    assert groups[0][2] == [(2, 0.6), (3, 0.7)]
    fig = pictures.curves_band_figure(groups, 3, "sweep")
    (val_acc,) = [axis for axis in fig.axes if axis.get_title() == "validation accuracy"]
    (bar,) = [container for container in val_acc.containers if container.get_label() == "1 task(s): test, kept head"]
    star, _, (spread,) = bar.lines
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([2.5], [pytest.approx(0.65)])
    bottom, top = spread.get_segments()[0][:, 1]
    assert (bottom, top) == pytest.approx((0.65 - statistics.stdev([0.6, 0.7]), 0.65 + statistics.stdev([0.6, 0.7])))


def test_sweep_plot_draws_chance_at_one_over_the_runs_number_of_classes():
    rows = [dict(tasks=1, runs=1, seconds=10.0, seconds_std=None, speedup=1.0, efficiency=1.0, best_val_acc=0.6,
                 best_val_acc_std=None)]
    fig = report.plot_figure(rows, n_classes=3)
    (accuracy,) = [axis for axis in fig.axes if axis.get_title().startswith("Best validation")]
    assert list(line_labelled(accuracy, "chance (1/3: 3 classes)").get_ydata()) == [1 / 3] * 2


# ----------------------------------------------------------------------------
# Predictions: the grid and the confusion matrix


def tile(predicted, true, color=(255, 0, 0)):
    return dict(image=np.full((8, 8, 3), color, dtype=np.uint8), name="ants/0.jpg", predicted=predicted,
                probability=0.75, true=true)


def test_grid_titles_each_image_with_its_prediction_and_true_class_wrong_ones_in_red():
    fig = pictures.prediction_grid_figure([tile("ants", "ants"), tile("bees", "ants"), tile("wasps", None)], "grid")
    shown = [axis for axis in fig.axes if axis.axison]
    assert len(shown) == 3 and len(fig.axes) == pictures.GRID_COLUMNS
    titles = [axis.title for axis in shown]
    assert [title.get_text() for title in titles] == ["ants (0.75)\ntrue: ants", "bees (0.75) ✗\ntrue: ants",
                                                      "wasps (0.75)\nin no class folder"]
    assert [title.get_color() for title in titles] == [pictures.RIGHT, pictures.WRONG, pictures.UNKNOWN]
    assert shown[1].spines["top"].get_linewidth() == 3  # the wrong one is framed
    assert np.array_equal(shown[0].images[0].get_array(), tile("ants", "ants")["image"])


def test_confusion_picture_writes_each_count_in_its_cell():
    matrix = [[3, 1, 0], [0, 2, 2], [1, 0, 4]]
    fig = pictures.confusion_figure(matrix, ["ants", "bees", "wasps"], "confusion")
    (axis,) = fig.axes
    cells = {(round(text.get_position()[1]), round(text.get_position()[0])): int(text.get_text())
             for text in axis.texts}
    assert cells == {(i, j): matrix[i][j] for i in range(3) for j in range(3)}
    assert [label.get_text() for label in axis.get_xticklabels()] == ["ants", "bees", "wasps"]
    assert (axis.get_xlabel(), axis.get_ylabel()) == ("predicted class", "true class (its folder)")


def test_sweep_report_of_three_class_runs_draws_chance_at_a_third(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(report, "save_figure", lambda fig, path: drawn.setdefault(path, fig))
    write_run(tmp_path / "tasks-1.json")
    assert report.main([str(tmp_path)]) == 0
    (accuracy,) = [axis for axis in drawn[str(tmp_path / "scaling.png")].axes
                   if axis.get_title().startswith("Best validation")]
    assert list(line_labelled(accuracy, "chance (1/3: 3 classes)").get_ydata()) == [1 / 3] * 2
