"""`python qml.py predict MODEL IMAGE_OR_FOLDER...`: classify images with a trained model, a --save or a --checkpoint
file. The model is rebuilt from what the file records (head, circuit digest, qubits, depth, class names, backbone
weights and seed, precision), by qml.py's own build_model, on the CPU or a GPU, its circuit run by the simulators
training uses, one circuit call per batch. Every check runs before any image is read: a file that is no such model
(read without running any code it carries), a circuit edited since, a backbone that is not the one it trained on.
Then one line per image: its path, the predicted class and its probability; images in class folders are scored
against their folder (accuracy and confusion matrix). --out writes a CSV, --grid and --confusion pictures."""

import argparse
import csv
import io
import os
import sys

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from . import checkpoints, images, pictures
from .command_line import ArgumentParser, RunFailed, UsageError, atomic_write, positive
from .process_group import pick_device
from .simulators import available_qdevices, describe_qdevice

CHECKPOINT_KEYS = {"config", "state", "head", "buffers"}  # what every --checkpoint file holds
MAKE_ONE = "give a file written by qml.py --save or --checkpoint"


def get_args_parser():
    parser = ArgumentParser(prog="qml.py predict", description="Classify images with a model trained by qml.py: one "
                            "line per image (path, predicted class, its probability); images inside class folders "
                            "(named as the model's classes) are scored against their folder.")
    add = parser.add_argument
    add("model", metavar="MODEL", help="a file written by qml.py --save, or a --checkpoint file (its kept head)")
    add("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders searched for images as "
        "torchvision's ImageFolder finds them (e.g. a data set's val/)")
    add("--out", metavar="FILE.csv", help="write every prediction to this CSV file: path, predicted class, its "
        "probability, true class (its folder's, else empty), and the probability of each class")
    add("--grid", metavar="FILE.png", help="draw the images (evenly spaced among them, --grid-images at most) with "
        "their predicted and true class, wrong ones in red")
    add("--grid-images", type=positive(int), default=16, metavar="N", help="images in the --grid picture "
        "(default: %(default)s)")
    add("--confusion", metavar="FILE.png", help="draw the confusion matrix of the images in class folders")
    add("--batch-size", type=positive(int), default=32, metavar="N", help="images per forward pass, each one circuit "
        "call (default: %(default)s)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: a GPU when visible "
        "(default: %(default)s)")
    add("--qdevice", default=None, help="simulate the circuit on this PennyLane device, or 'torch' (default: the "
        "one it trained on)")
    add("--weights", metavar="PATH", default=None, help="where the backbone weights file it trained on (--weights "
        "PATH) is now, if it moved; checked against the digest the model recorded")
    return parser


# ----------------------------------------------------------------------------
# The model file: a --save file or a checkpoint, read without running code


def read_model(path):
    """{config, head, buffers, backbone_sha256, selected_epoch, best_val_acc} of a --save or --checkpoint file."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file; {MAKE_ONE}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable files, and for code it refuses to run
        raise UsageError(f"{path} is not a qml.py model ({type(err).__name__} when read as weights only); "
                         f"{MAKE_ONE}") from None
    try:
        if isinstance(saved, dict) and saved.get("format") == checkpoints.MODEL_FORMAT:
            if saved["config"]["bn_mode"] == "train" and saved["buffers"] is None:
                raise UsageError(f"{path}: its run resumed from a checkpoint from before checkpoints kept the "
                                 f"BatchNorm statistics of the kept head (--bn-mode train changes them), so the model "
                                 f"it validated cannot be rebuilt; train again with --save")
            return {key: saved[key] for key in ("config", "head", "buffers", "backbone_sha256", "selected_epoch",
                                                "best_val_acc")}
        if isinstance(saved, dict) and CHECKPOINT_KEYS <= set(saved):
            return from_checkpoint(path, saved)
    except (KeyError, TypeError, StopIteration):
        pass
    if isinstance(saved, dict) and saved and all(isinstance(value, torch.Tensor) for value in saved.values()):
        raise UsageError(f"{path} holds only a head's weights (a --save file from before --save recorded the "
                         f"model): it says neither the classes nor the circuit nor the backbone, so the model cannot "
                         f"be rebuilt; predict from the run's --checkpoint file, or train again with --save")
    raise UsageError(f"{path} is not a qml.py model (it lacks what --save and --checkpoint record); {MAKE_ONE}")


def from_checkpoint(path, saved):
    """The kept head of a checkpoint (that of the best validation accuracy, else the last), with the BatchNorm
    statistics it was validated with: recorded with it, or, in a checkpoint from before they were, the last epoch's
    when that epoch is the kept one (--bn-mode eval never changes them)."""
    config, state = saved["config"], saved["state"]
    kept = state["best_head"] is not None
    epoch = checkpoints.kept_epoch(state)
    buffers = None
    if config.get("bn_mode", "train") == "train":
        if kept and "best_buffers" in state:
            buffers = state["best_buffers"]
        elif epoch == state["epoch"]:
            buffers = saved["buffers"]
        else:
            raise UsageError(f"{path}: a checkpoint from before checkpoints kept the BatchNorm statistics of the kept "
                             f"head (epoch {epoch} of {state['epoch']}; --bn-mode train changed them in every later "
                             f"epoch), so the model it validated cannot be rebuilt; train again with --save")
    return dict(config=config, head=state["best_head"] if kept else saved["head"], buffers=buffers,
                backbone_sha256=saved.get("backbone_sha256"), selected_epoch=epoch, best_val_acc=state["best_acc"])


# ----------------------------------------------------------------------------
# The model, rebuilt as it trained


def model_args(saved, args, defaults):
    """build_model's arguments: qml.py's defaults, overridden by what the run recorded (a file from before --head
    trained the quantum head), then by --qdevice and --weights; always one circuit call per batch."""
    margs = argparse.Namespace(**{**vars(defaults), "head": "quantum", **saved["config"]})
    margs.per_sample = False
    margs.qdevice = args.qdevice or margs.qdevice
    margs.weights = args.weights or margs.weights
    return margs


def check_before_building(path, saved, margs, device):
    """What can be refused before the model is built: the simulator, the precision, a backbone that cannot be
    checked or found."""
    if margs.head == "quantum" and margs.qdevice not in available_qdevices():
        raise UsageError(f"{path}: its circuit ran on {margs.qdevice}, which is not installed here; pass --qdevice "
                         f"with one of {', '.join(available_qdevices())} (the same circuit, simulated there)")
    try:
        images.check_precision(margs.precision, device)
    except UsageError as err:
        raise UsageError(f"{path} trained with {err}; predict with --device cuda") from None
    if saved["backbone_sha256"] is None and margs.weights != "imagenet":
        raise UsageError(f"{path}: a checkpoint from before checkpoints recorded the digest of their backbone, which "
                         f"was --weights {margs.weights}, so the one rebuilt here cannot be checked; train again with "
                         f"--save")
    if margs.weights not in ("imagenet", "none") and not os.path.isfile(margs.weights):
        raise UsageError(f"{path} trained on the backbone weights in {margs.weights}, which is not there; give where "
                         f"that file is now with --weights PATH")


def check_backbone(path, saved, margs, model):
    """Refuse a rebuilt backbone whose weights are not those the file records (digests differ)."""
    if saved["backbone_sha256"] in (None, images.backbone_digest(model)):
        return
    if margs.weights == "none":
        raise UsageError(f"{path}: the random backbone (--weights none) drawn here from seed {margs.seed} differs from "
                         f"the one it trained on (another torch than {torch.__version__}?); predict with the torch "
                         f"versions it trained with")
    if margs.weights == "imagenet":
        raise UsageError(f"{path}: the ImageNet weights loaded here differ from those it trained on; put the "
                         f"resnet18-f37072fd.pth it trained with into {torch.hub.get_dir()}/checkpoints")
    raise UsageError(f"{path}: the backbone weights in {margs.weights} are not the ones it trained on (their digest "
                     f"differs); give the file it trained on with --weights PATH")


def rebuild(path, saved, args, build_model, defaults, device):
    """The model as it trained, on `device`, in eval mode: built by build_model (qml.py's) with the run's options
    and seed (a --weights none backbone is drawn again), its circuit and backbone checked against the file's
    digests, then the kept head and, if recorded, the BatchNorm statistics loaded."""
    margs = model_args(saved, args, defaults)
    check_before_building(path, saved, margs, device)
    torch.manual_seed(margs.seed)  # the backbone's random init is the first draw, as in training
    np.random.seed(margs.seed)
    try:
        model = build_model(margs, len(margs.classes), device.index)
    except UsageError as err:
        raise UsageError(f"{path}: the backbone it trained on cannot be loaded here: {err}") from None
    circuit = getattr(model.fc, "circuit", None)
    if circuit is not None and circuit.digest() != margs.circuit:
        raise UsageError(f"{path}: its head trained another circuit than the one quantum_net records now (other gates, "
                         f"wires or parameters: the digests differ); restore that circuit in qml.py, or train again")
    images.cast_frozen_convolutions(model, margs.precision)
    check_backbone(path, saved, margs, model)
    try:
        model.fc.load_state_dict(saved["head"])
        own = dict(model.named_buffers())
        for name, value in (saved["buffers"] or {}).items():
            own[name].copy_(value)
    except (RuntimeError, KeyError) as err:
        raise UsageError(f"{path}: its weights do not fit the model its options describe ({type(err).__name__}); "
                         f"the file is damaged; {MAKE_ONE}") from None
    model = model.to(device).eval()
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)  # as trained: faster convolutions on CPUs
    return model, margs


def model_line(path, saved, margs, model, device):
    """What was rebuilt, in one line."""
    head = margs.head
    if head == "quantum":
        where = describe_qdevice(model.fc, margs.qdevice)["summary"]
        head += f" ({margs.n_qubits} qubits, depth {margs.q_depth}; {margs.qdevice}: {where})"
    backbone = f"none, seed {margs.seed}" if margs.weights == "none" else margs.weights
    return (f"Model: {path} | head: {head} | classes: {', '.join(margs.classes)} | backbone: {backbone} | kept head: "
            f"epoch {saved['selected_epoch']}, validation accuracy {saved['best_val_acc']:.4f} | device: {device}")


# ----------------------------------------------------------------------------
# The images


def list_inputs(paths, classes):
    """[(image path, true class or None)]: files as named; folders searched as ImageFolder searches a split
    (os.walk, sorted, image extensions only). An image's true class is its class folder's: under a named folder,
    the first folder below it that is named as a class, or the named folder itself; a named file, its folder."""
    items = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path, followlinks=True)
                           for name in names if name.lower().endswith(IMG_EXTENSIONS))
            if not found:
                raise UsageError(f"{path}: no images in this folder (extensions {', '.join(IMG_EXTENSIONS)})")
            top = os.path.basename(os.path.normpath(path))
            for image in found:
                first = os.path.relpath(image, path).split(os.sep)[0]
                label = first if first in classes and first != os.path.basename(image) else None
                items.append((image, label or (top if top in classes else None)))
        elif os.path.exists(path):
            folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
            items.append((path, folder if folder in classes else None))
        else:
            raise UsageError(f"{path}: no such file or folder; give image files or folders of them")
    return items


def split_tail(path):
    """The folder and the name of a file: what the grid writes under its image."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.basename(folder), name


def grid_picks(count, most):
    """Indices of at most `most` images evenly spaced among `count`."""
    if count <= most:
        return set(range(count))
    return {round(i * (count - 1) / (most - 1)) for i in range(most)} if most > 1 else {0}


def predict(model, margs, items, args, transform, device, picks):
    """Yield (path, true, probabilities or the reason it could not be read, crop kept for the grid or None) for
    every item, in order; a batch of images is one forward pass (and one circuit call)."""
    for start in range(0, len(items), args.batch_size):
        batch = list(enumerate(items[start:start + args.batch_size], start))
        crops, failed = {}, {}
        for index, (path, _) in batch:
            try:
                crops[index] = transform(images.load_rgb(path))
            except Exception as err:  # PIL raises many types for broken files
                failed[index] = getattr(err, "strerror", None) or str(err) or type(err).__name__
        probabilities = {}
        if crops:
            with torch.no_grad(), images.backbone_autocast(margs.precision, device):
                logits = model(images.prepare_images(torch.stack(list(crops.values())), device))
            probabilities = dict(zip(crops, torch.softmax(logits.float(), 1).cpu().tolist(), strict=True))
        for index, (path, true) in batch:
            crop = crops[index].permute(1, 2, 0).numpy() if index in picks and index in crops else None
            yield path, true, probabilities.get(index, failed.get(index)), crop


# ----------------------------------------------------------------------------
# What is printed, written and drawn


def prediction_line(path, predicted, probability, true):
    wrong = f"  wrong: {true}" if true is not None and true != predicted else ""
    return f"{path}  {predicted}  {probability:.4f}{wrong}"


def confusion_lines(matrix, classes):
    """The confusion matrix as text: a row per true class, a column per predicted class."""
    width = max(len(name) for name in classes) + 2
    lines = ["Confusion matrix (rows: true class, its folder; columns: predicted class):",
             " " * width + "".join(name.rjust(width) for name in classes)]
    lines += [name.ljust(width) + "".join(str(count).rjust(width) for count in row)
              for name, row in zip(classes, matrix, strict=True)]
    return lines


def csv_bytes(rows, classes):
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["path", "predicted", "probability", "true_class", *(f"p_{name}" for name in classes)])
    for path, predicted, probabilities, true in rows:
        writer.writerow([path, predicted, f"{max(probabilities):.6f}", true or "",
                         *(f"{p:.6f}" for p in probabilities)])
    return table.getvalue().encode()


def check_outputs(args):
    """Refuse, before any work, an output file that cannot be written."""
    for option in ("out", "grid", "confusion"):
        path = getattr(args, option)
        reason = path and checkpoints.unwritable(f"--{option}", path)
        if reason:
            raise UsageError(reason)


def run(args, build_model, transform, defaults):
    """Check and rebuild the model, predict every image, then report; the exit status (1 when an image could not
    be read)."""
    check_outputs(args)
    device = pick_device(args.device)
    saved = read_model(args.model)
    model, margs = rebuild(args.model, saved, args, build_model, defaults, device)
    classes = list(margs.classes)
    items = list_inputs(args.inputs, classes)
    print(model_line(args.model, saved, margs, model, device), flush=True)
    picks = grid_picks(len(items), args.grid_images) if args.grid else set()
    rows, tiles, unreadable = [], [], []
    matrix = [[0] * len(classes) for _ in classes]
    for path, true, result, crop in predict(model, margs, items, args, transform, device, picks):
        if isinstance(result, str):
            print(f"qml.py predict: {path}: not a readable image ({result}); skipped", file=sys.stderr, flush=True)
            unreadable.append(path)
            continue
        probability = max(result)
        predicted = classes[result.index(probability)]
        print(prediction_line(path, predicted, probability, true), flush=True)
        rows.append((path, predicted, result, true))
        if true is not None:
            matrix[classes.index(true)][classes.index(predicted)] += 1
        if crop is not None:
            tiles.append(dict(image=crop, name=os.path.join(*split_tail(path)), predicted=predicted,
                              probability=probability, true=true))
    scored = sum(map(sum, matrix))
    correct = sum(matrix[i][i] for i in range(len(classes)))
    summary = None
    if scored:
        summary = f"accuracy {correct / scored:.4f}\n({correct} of {scored} images in class folders)"
        print(f"Accuracy: {correct / scored:.4f} ({correct} of {scored} images in class folders, each scored "
              f"against its folder)")
        print("\n".join(confusion_lines(matrix, classes)))
    write_outputs(args, rows, classes, tiles, matrix, summary, len(items))
    if unreadable:
        print(f"qml.py predict: {len(unreadable)} of {len(items)} images could not be read (named above); the others "
              f"were predicted", file=sys.stderr)
        return 1
    return 0


def write_outputs(args, rows, classes, tiles, matrix, summary, count):
    """--out, --grid and --confusion, each named once written."""
    name = os.path.basename(args.model)
    if args.out:
        atomic_write(args.out, lambda file: file.write(csv_bytes(rows, classes)))
        print(f"Predictions: {args.out}")
    if args.grid:
        wrong = sum(tile["true"] is not None and tile["true"] != tile["predicted"] for tile in tiles)
        shown = f"{len(tiles)} of {count} images" + (" (evenly spaced)" if len(tiles) < count else "")
        all_scored = " ".join(summary.split()) if summary else ""
        title = f"{name}: {shown}, {wrong} wrong (red)" + (f"; all scored: {all_scored}" if summary else "")
        pictures.save_figure(pictures.prediction_grid_figure(tiles, title), args.grid)
        print(f"Prediction grid: {args.grid}")
    if args.confusion:
        if summary is None:
            print(f"qml.py predict: --confusion {args.confusion}: no image is in a class folder "
                  f"({', '.join(classes)}), so there is no confusion matrix to draw", file=sys.stderr)
            return
        pictures.save_figure(pictures.confusion_figure(matrix, classes, f"{name}: {summary}"), args.confusion)
        print(f"Confusion matrix: {args.confusion}")


def main(argv, build_model, transform, defaults):
    """`qml.py predict ARGS`. build_model(args, n_classes, device_id), transform (image to uint8 crop) and defaults
    (qml.py's options, parsed from nothing) come from qml.py, which this module does not import. The exit status;
    a refusal is one line on stderr, status 2."""
    try:
        return run(get_args_parser().parse_args(argv), build_model, transform, defaults)
    except (UsageError, RunFailed) as err:
        print("qml.py predict: error:", " ".join(str(err).split()), file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
