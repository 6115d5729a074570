"""The pictures of what a model learned, with matplotlib alone (no torch: `qml.py report` draws them before torch
could load): its predictions as a grid of images, each titled with the predicted and the true class (as the
PennyLane demo's visualize_model draws them), its confusion matrix, and learning curves (loss and accuracy per
epoch) of one run or of groups of repeats (mean and a band of one std). Every axis of accuracy runs from chance,
one over the number of classes, to 1."""

import math
import statistics

from .command_line import atomic_write

PARTS = (("train", "train"), ("val", "validation"), ("test", "test"))  # epoch records' key prefixes, their labels
PART_COLORS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
RIGHT, WRONG, UNKNOWN = "tab:green", "tab:red", "black"  # a prediction's colour: its true class known or not
ACCURACY_PAD = 0.02  # the accuracy axis' ends are padded so that a point at chance or at 1 stays in sight
GRID_COLUMNS = 4  # images per row of the prediction grid
TILE_INCHES = 2.6  # each image's width in the grid (at 100 dpi: 260 pixels)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """fig as a PNG at 100 dpi, written atomically, then closed."""
    atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=100))
    pyplot().close(fig)


def chance(n_classes):
    """(accuracy of guessing among n_classes, its legend label)."""
    return 1 / n_classes, f"chance (1/{n_classes}: {n_classes} classes)"


def accuracy_limits(n_classes, values):
    """The accuracy axis: from chance (lower when a value is) to 1, padded."""
    level, _ = chance(n_classes)
    lowest = min([level, *(value for value in values if value is not None)])
    return min(level, math.floor(lowest * 20) / 20) - ACCURACY_PAD, 1 + ACCURACY_PAD


# ----------------------------------------------------------------------------
# Predictions: the grid of images and the confusion matrix


def tile_color(predicted, true):
    return UNKNOWN if true is None else RIGHT if predicted == true else WRONG


def prediction_grid_figure(tiles, title):
    """tiles: dicts of image (H x W x 3 uint8, the crop the model saw), name (the file's), predicted, probability
    and true (None when the image is in no class folder). Each image is titled with its predicted class and
    probability over its true class; a wrong prediction is titled and framed in red, a right one in green."""
    rows = max(1, math.ceil(len(tiles) / GRID_COLUMNS))
    fig, axes = pyplot().subplots(rows, GRID_COLUMNS, squeeze=False,
                                  figsize=(GRID_COLUMNS * TILE_INCHES, rows * (TILE_INCHES + 0.55) + 0.5))
    for axis in axes.flat:
        axis.set_axis_off()
    for axis, tile in zip(axes.flat, tiles, strict=False):  # the last row may have empty places
        color = tile_color(tile["predicted"], tile["true"])
        axis.set_axis_on()
        axis.imshow(tile["image"])
        axis.set(xticks=[], yticks=[])
        truth = "in no class folder" if tile["true"] is None else f"true: {tile['true']}"
        mark = " ✗" if color == WRONG else ""
        axis.set_title(f"{tile['predicted']} ({tile['probability']:.2f}){mark}\n{truth}", color=color, fontsize=10)
        axis.set_xlabel(shorten(tile["name"]), fontsize=8)
        for spine in axis.spines.values():
            spine.set(color=color, linewidth=1 if color == UNKNOWN else 3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def shorten(name, most=30):
    """A file name cut in the middle to fit under its image."""
    return name if len(name) <= most else f"{name[:most // 2 - 1]}…{name[-(most // 2):]}"


def confusion_figure(matrix, classes, title):
    """The confusion matrix (matrix[true][predicted] image counts) as a picture: rows the true class, columns the
    predicted one (the diagonal holds the right predictions), each cell's count written in it and shaded by it."""
    size = max(4.0, 1.0 * len(classes) + 2.5)
    fig, axis = pyplot().subplots(figsize=(size, size - 0.3))
    most = max(max(row) for row in matrix) or 1
    axis.imshow(matrix, cmap="Blues", vmin=0, vmax=most)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axis.text(j, i, str(count), ha="center", va="center", fontsize=12,
                      color="white" if count > most / 2 else "black")
    ticks = range(len(classes))
    axis.set(xticks=ticks, yticks=ticks, xlabel="predicted class", ylabel="true class (its folder)")
    axis.set_xticklabels(classes, rotation=30 if len(classes) > 4 else 0)
    axis.set_yticklabels(classes)
    axis.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------
# Learning curves


def epoch_numbers(records):
    """The 1-based epoch of each record (files written by hand may lack the field)."""
    return [record.get("epoch", index) for index, record in enumerate(records, 1)]


def parts_in(records_of_runs):
    """The (key, label) of PARTS whose loss or accuracy some epoch record holds."""
    return [(key, label) for key, label in PARTS
            if any(f"{key}_{metric}" in record for records in records_of_runs for record in records
                   for metric in ("loss", "acc"))]


def finish_axes(ax_loss, ax_acc, n_classes, accuracies, stacked=False):
    """Both panels' labels (stacked: the loss above the accuracy, which alone names the epochs), integer epochs,
    the loss from 0 and the accuracy from chance to 1."""
    for axis, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        axis.set(xlabel="" if stacked and axis is ax_loss else "epoch", ylabel=name)
        axis.xaxis.get_major_locator().set_params(integer=True)
    level, label = chance(n_classes)
    ax_acc.axhline(level, linestyle=":", color="gray", label=label)
    ax_acc.set_ylim(*accuracy_limits(n_classes, accuracies))
    highest = ax_loss.dataLim.y1  # the highest loss drawn, whose line must not run along the top edge
    ax_loss.set_ylim(0, 1.08 * highest if math.isfinite(highest) and highest > 0 else None)
    for axis in (ax_loss, ax_acc):
        axis.legend(loc="best", fontsize=8)


def learning_curves_figure(records, n_classes, title, selected_epoch=None, test=None):
    """One run's loss and accuracy per epoch (records: the metrics JSON's "epochs") for train, validation and
    test where the records hold it; the epoch whose head the run kept as a dotted line, and the kept head's test
    loss and accuracy (test: {"loss", "acc"}, or None) as stars on it."""
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    xs, accuracies = epoch_numbers(records), []
    for key, label in parts_in([records]):
        for axis, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            values = [record.get(f"{key}_{metric}") for record in records]
            axis.plot(xs, [math.nan if value is None else value for value in values], "o-", markersize=3,
                      color=PART_COLORS[key], label=label)
            accuracies += values if metric == "acc" else []
    if selected_epoch is not None:
        for axis in (ax_loss, ax_acc):
            axis.axvline(selected_epoch, linestyle="--", color="gray", linewidth=1,
                         label=f"kept head (epoch {selected_epoch})")
        for axis, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            if test and test.get(metric) is not None:
                axis.plot([selected_epoch], [test[metric]], "*", markersize=14, color=PART_COLORS["test"],
                          label=f"test, kept head ({test[metric]:.4f})")
                accuracies += [test[metric]] if metric == "acc" else []
    ax_loss.set_title("Loss per epoch")
    ax_acc.set_title("Accuracy per epoch")
    finish_axes(ax_loss, ax_acc, n_classes, accuracies)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def mean_band(records_of_runs, key):
    """(epochs, means, stds) of `key` over the runs, at each epoch that some run recorded it; the std is 0 where
    only one run did."""
    by_epoch = {}
    for records in records_of_runs:
        for epoch, record in zip(epoch_numbers(records), records, strict=True):
            if record.get(key) is not None:
                by_epoch.setdefault(epoch, []).append(record[key])
    epochs = sorted(by_epoch)
    means = [statistics.mean(by_epoch[epoch]) for epoch in epochs]
    stds = [statistics.stdev(by_epoch[epoch]) if len(by_epoch[epoch]) > 1 else 0.0 for epoch in epochs]
    return epochs, means, stds


def curves_band_figure(groups, n_classes, title):
    """Learning curves of groups of runs (a sweep's task counts or values of its varied option), one colour each:
    a column per part (train, validation, test), loss above accuracy; each line the mean over the group's runs,
    its band one std. groups: (label, [each run's epoch records], [each run's (kept epoch, test accuracy) or
    None]); the kept heads' test accuracies, where recorded, are a star at their mean epoch with a one-std bar (in
    the test column when the epochs recorded a test part, else in the validation one)."""
    records_of_runs = [records for _, runs, _ in groups for records in runs]
    parts = parts_in(records_of_runs)
    keys = [key for key, _ in parts]
    stars = keys.index("test") if "test" in keys else keys.index("val")  # the kept heads' test accuracies go there
    fig, axes = pyplot().subplots(2, len(parts), squeeze=False, figsize=(4.6 * len(parts), 7.4), sharex=True)
    accuracies = []
    for index, (label, runs, tests) in enumerate(groups):
        color = f"C{index}"
        for column, (key, part) in enumerate(parts):
            for row, metric in enumerate(("loss", "acc")):
                epochs, means, stds = mean_band(runs, f"{key}_{metric}")
                axis = axes[row][column]
                axis.plot(epochs, means, "-", color=color, label=label)
                lows = [mean - std for mean, std in zip(means, stds, strict=True)]
                highs = [mean + std for mean, std in zip(means, stds, strict=True)]
                axis.fill_between(epochs, lows, highs, color=color, alpha=0.2, linewidth=0)
                accuracies += lows if metric == "acc" else []
                axis.set_title(f"{part} {'loss' if metric == 'loss' else 'accuracy'}")
        kept = [test for test in tests if test]
        if kept:
            column = stars
            at = statistics.mean(epoch for epoch, _ in kept)
            values = [acc for _, acc in kept]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            axes[1][column].errorbar([at], [statistics.mean(values)], yerr=[spread], fmt="*", markersize=12,
                                     color=color, capsize=4, label=f"{label}: test, kept head")
            accuracies.append(statistics.mean(values) - spread)
    for column in range(len(parts)):
        finish_axes(axes[0][column], axes[1][column], n_classes, accuracies, stacked=True)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
