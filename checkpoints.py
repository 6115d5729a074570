"""The run's safety: every file written atomically, output paths tried before training, and checkpoints
(--checkpoint, --resume) that cannot silently change the experiment. Rank 0 writes them all."""

import contextlib
import io
import os
import tempfile
import time

import numpy as np
import torch

from errors import RunFailed, UsageError
from process_group import broadcast_error

# Options that must match for a checkpoint to be resumed.
RESUME_KEYS = ("n_qubits", "q_depth", "q_delta", "weights", "bn_mode", "cache_features", "batch_size",
               "lr", "gamma", "step_size", "seed", "shuffle_seed", "n_classes", "classes", "precision", "circuit")


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`.

    Whatever fails, `path` keeps its previous content and no temporary file stays; an OSError (a full
    disk, a read-only or vanished folder) becomes RunFailed, one line that names it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")  # open() keeps the umask
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # nothing to remove when open() failed
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise RunFailed(f"cannot write {path} ({err.strerror or err}); its previous version, if any, "
                            f"is unchanged; make room or choose another path") from err
        raise


def torch_bytes(obj):
    """torch.save into memory: written to a file, a failed write then keeps its OSError (torch.save
    writing to the file itself turns a full disk into 'RuntimeError: unexpected pos')."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def save_weights(path, module):
    """module's state_dict in `path` (--save: the best dressed head)."""
    atomic_write(path, lambda file: file.write(torch_bytes(module.state_dict())))


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
