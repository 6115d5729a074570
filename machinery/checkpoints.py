"""The run's safety: every file written atomically, output paths tried before training, checkpoints (--checkpoint,
--resume) that cannot silently change the experiment (rank 0 writes them all), and the stop between batches on
Slurm's wall-time warning, which keeps the last complete epoch."""

import io
import os
import shlex
import signal
import tempfile
import time
import weakref

import numpy as np
import torch

from . import images
from .command_line import UsageError, atomic_write, raise_interrupt
from .process_group import broadcast_error, reduce_sums

# Options that must match for a checkpoint to be resumed.
RESUME_KEYS = ("head", "n_qubits", "q_depth", "q_delta", "weights", "bn_mode", "cache_features", "batch_size",
                "lr", "gamma", "step_size", "seed", "shuffle_seed", "n_classes", "classes", "precision", "circuit",
                "holdout", "holdout_seed", "shots", "noise")
MODEL_FORMAT = "qml.py model"  # what --save writes: all that `qml.py predict` needs to rebuild the trained model


def torch_bytes(obj):
    """torch.save into memory: written to a file, a failed write then keeps its OSError (torch.save
    writing to the file itself turns a full disk into 'RuntimeError: unexpected pos')."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


BACKBONE_DIGESTS = weakref.WeakKeyDictionary()  # model: its backbone's digest, taken once (the backbone is frozen)


def backbone_digest(model):
    """images.backbone_digest of a training model, computed at its first checkpoint only (0.1 s to 0.5 s each)."""
    if model not in BACKBONE_DIGESTS:
        BACKBONE_DIGESTS[model] = images.backbone_digest(model)
    return BACKBONE_DIGESTS[model]


def on_cpu(tensors):
    """{name: tensor} moved to the CPU (None stays None): a file saved on a GPU loads anywhere."""
    return None if tensors is None else {name: tensor.detach().cpu() for name, tensor in tensors.items()}


def kept_epoch(state):
    """The 1-based epoch whose head the run keeps: the first to reach the best validation accuracy (the tutorial
    keeps a head only when the accuracy rises), else the last."""
    if state["best_head"] is None:
        return len(state["history"])
    return next(record["epoch"] for record in state["history"] if record["val_acc"] == state["best_acc"])


def save_model(path, model, state, config):
    """--save: all that `qml.py predict` needs to rebuild the model that trained, and no more: the run's config
    (head, qubits, depth, the circuit's digest, classes, backbone weights and seed, precision), the kept head, the
    digest of the frozen backbone (rebuilt from its weights or seed, not copied), and under --bn-mode train the
    BatchNorm statistics that the kept head was validated with (training changes them; None when a run resumed from
    a checkpoint that predates them did not record them: predict then refuses the file). model: the model holding
    the kept head (train_model's)."""
    kept = state["best_head"] is not None
    buffers = None
    if config["bn_mode"] == "train":
        buffers = state.get("best_buffers") if kept else dict(model.named_buffers())
    payload = dict(format=MODEL_FORMAT, config=config, head=on_cpu(model.fc.state_dict()), buffers=on_cpu(buffers),
                   backbone_sha256=backbone_digest(model), selected_epoch=kept_epoch(state),
                   best_val_acc=state["best_acc"], torch=str(torch.__version__))
    atomic_write(path, lambda file: file.write(torch_bytes(payload)))


def output_paths(args):
    """(option, path) of every file rank 0 will write."""
    named = [("--save", args.save), *(("--metrics-json", path) for path in args.metrics_json),
             ("--checkpoint", args.checkpoint)]
    return [(option, path) for option, path in named if path]


def unwritable(option, path):
    """Why rank 0 could not write `path` (its folder cannot be made or takes no file), else None."""
    if os.path.isdir(path):
        return f"{option} {path} is a folder; give a file path"
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{os.path.basename(path)}.") as probe:
            probe.write(b"\0")  # a full disk may still take an empty file
            probe.flush()
    except OSError as err:
        in_the_way = isinstance(err, (FileExistsError, NotADirectoryError))
        reason = "a file is in the way" if in_the_way else err.strerror or err
        return f"{option} {path}: cannot write in {folder} ({reason}); choose a writable folder"
    return None


def check_outputs(ctx, args):
    """Rank 0 tries the folder of every file it will write before training, so a bad path fails now, not
    after the last epoch; every rank gets its verdict."""
    message = None
    if ctx.is_main:
        message = next(filter(None, (unwritable(option, path) for option, path in output_paths(args))), None)
    broadcast_error(ctx, message)


def run_config(args, classes, circuit):
    """The options that define a run, as stored in checkpoints and the metrics JSON; `circuit`: the digest of
    what quantum_net records (simulators.CircuitTrace), so that an edited circuit is not resumed."""
    config = {k: v for k, v in vars(args).items() if not k.startswith("data_dir_is")}
    return dict(config, n_classes=len(classes), classes=list(classes), circuit=circuit)


def save_checkpoint(path, run):
    """Everything --resume needs to go on as if never stopped, from qml.py's Training `run`: the head, the
    BatchNorm statistics, optimizer, scheduler, random states, and the state with the seconds trained so far."""
    numpy_rng = np.random.get_state()
    state = dict(run.state, seconds=run.state["seconds"] + time.time() - run.started)
    payload = dict(
        config=run.config, state=state, head=run.model.fc.state_dict(),
        buffers=dict(run.model.named_buffers()),  # BatchNorm statistics move in --bn-mode train
        optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
        backbone_sha256=backbone_digest(run.model),  # `qml.py predict` checks the backbone it rebuilds
        rng=dict(torch=torch.get_rng_state(), numpy=[numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]]),
    )
    atomic_write(path, lambda file: file.write(torch_bytes(payload)))


def load_checkpoint(path, config):
    """Read a checkpoint for --resume and check it was made by the same configuration."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume {path}: no such file; give a file written by --checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint["config"]
    except Exception as err:  # torch raises many types for unreadable files
        raise UsageError(f"--resume {path}: not a readable qml.py checkpoint ({type(err).__name__}); "
                         f"give a file written by --checkpoint") from None
    for key in RESUME_KEYS:
        if key == "circuit" and saved.get(key) != config.get(key):
            raise UsageError(f"--resume {path}: the checkpoint trained another circuit (quantum_net, or a gate it "
                             f"calls, records other gates, wires or parameters than when it was saved); restore "
                             f"that circuit, or drop --resume to train this one")
        if saved.get(key) != config.get(key):
            raise UsageError(f"--resume {path}: the checkpoint has {key}={saved.get(key)!r} but this run "
                             f"{key}={config.get(key)!r}; use the checkpoint's options or drop --resume")
    return checkpoint


def finished(args, ctx, checkpoint):
    """Whether the --resume checkpoint already holds --epochs epochs; rank 0 then says so. Its --metrics-json files
    are then written from it (the run may have stopped after its last checkpoint, before its JSON), which record
    this run's ranks: so they must be as many as the checkpoint's, unless --resume-any-world-size."""
    done = checkpoint["state"]["epoch"]
    if done < args.epochs:
        return False
    if args.metrics_json:
        check_world_size(args, checkpoint, ctx.world_size)
    if ctx.is_main:
        written = "; its --metrics-json is written from the checkpoint" if args.metrics_json else ""
        print(f"--resume {args.resume}: this run is finished ({done} epochs trained, --epochs {args.epochs}); "
              f"nothing to train (give a larger --epochs to train on){written}", flush=True)
    return True


def check_world_size(args, checkpoint, world_size):
    """Refuse to continue on another number of ranks (another global batch and shuffle) unless asked to."""
    saved = checkpoint["state"]["history"][-1].get("world_size")
    if saved != world_size and not args.resume_any_world_size:
        raise UsageError(f"--resume {args.resume}: the checkpoint's run had {saved} rank(s), this one has "
                         f"{world_size}, so the global batch and the shuffle would differ; start {saved} ranks, or "
                         f"add --resume-any-world-size to go on anyway (the metrics JSON records each epoch's ranks)")


def restore_checkpoint(checkpoint, model, optimizer, scheduler):
    model.fc.load_state_dict(checkpoint["head"])
    buffers = dict(model.named_buffers())
    for name, value in checkpoint["buffers"].items():
        buffers[name].copy_(value)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    kind, keys, pos, has_gauss, cached = checkpoint["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return dict(checkpoint["state"], resumed=checkpoint["state"].get("resumed", 0) + 1)


# ----------------------------------------------------------------------------
# Stopping before the wall-time limit without losing work
#
# Slurm's wall-time warning (`sbatch --signal=B:USR1@120`, which sweep.py forwards to its step as SIGUSR1) asks
# every rank to stop at the next boundary between batches, all ranks together, so that none is left waiting in
# a collective. The epoch under way is dropped: the checkpoint of the last complete epoch stays as it is (it is
# written only between epochs, atomically), and the exit status command_line.RESUMABLE tells the launcher to
# requeue the job or to say how to continue it. A second SIGUSR1 stops at once, as SIGTERM and Ctrl-C do
# (command_line.raise_interrupt).

STOP_SIGNAL = signal.SIGUSR1

requested = None  # the name of the signal that asked this rank to stop, once one has


class Interrupted(Exception):
    """The run stopped between batches when asked to; main() prints its line and exits with command_line.RESUMABLE."""


def request_stop(signum, frame):
    """The stop signal's handler: the first asks for a stop at the next batch boundary, a second stops now."""
    global requested
    if requested is not None:
        raise_interrupt(signum, frame)
    requested = signal.Signals(signum).name


def catch_wall_time_warning():
    """From now on the stop signal asks this process to stop between batches (no request yet)."""
    global requested
    requested = None
    signal.signal(STOP_SIGNAL, request_stop)


def stop_between_batches(ctx, epoch, checkpoint):
    """Raise Interrupted on every rank when any rank was asked to stop: one all-reduce of the ranks' requests (on
    the CPU, so gloo carries it beside NCCL). Every rank must call this at the same points: after each training
    batch, which DistributedSampler makes equal in number on every rank (validation's shards may differ by one)."""
    (asked,) = reduce_sums(ctx, torch.tensor([requested is not None], dtype=torch.int32))
    if asked:
        kept = (f"--checkpoint {checkpoint} holds every complete epoch: continue with --resume {checkpoint}"
                if checkpoint else "nothing was saved: give --checkpoint PATH to make a run resumable")
        raise Interrupted(f"stopped by {requested or 'another rank'}'s request in epoch {epoch + 1}, between "
                          f"batches (Slurm's wall-time warning); {kept}")


def stopped_line(err, argv, checkpoint):
    """The one line of a run stopped by Ctrl-C (err has no message) or a signal (raise_interrupt names it): what
    stopped it and how_to_continue. Ctrl-C reaches torchrun too, which then prints a traceback of its own that no
    rank can prevent: the line says so."""
    torchrun = " (torchrun's traceback below is its own report of this Ctrl-C)" if not str(err) and \
        "TORCHELASTIC_RUN_ID" in os.environ else ""
    return f"stopped by {str(err) or 'Ctrl-C'}; {how_to_continue(argv, checkpoint)}{torchrun}"


def how_to_continue(argv, checkpoint):
    """What to run after a stop of `qml.py ARGV`: the same command resuming from its --checkpoint, or that nothing
    was kept."""
    if not checkpoint:
        return "no --checkpoint was given, so nothing was kept: run again (--checkpoint PATH keeps every epoch)"
    kept = [word for i, word in enumerate(argv) if not (word.startswith("--resume=") or word == "--resume" or
                                                       (i and argv[i - 1] == "--resume"))]
    command = shlex.join(["qml.py", *kept, "--resume", checkpoint])
    return f"{checkpoint} holds the last complete epoch, if one was: continue with {command} (under the same launcher)"
