"""The run's test part, which neither training nor selection reads: --holdout F splits val/, per class, into a
selection part (what the validation phase scores and the kept head is chosen on) and a test part; without it, a
test/ folder beside train/ and val/ is the test part. Once the last epoch is done, the kept head is scored on it
once, every image once across ranks. docs/sweep.md says why, and how small a test part can tell heads apart."""

import math

import numpy as np
from torch.utils.data import Subset

from .command_line import UsageError


class Part(Subset):
    """Some images of an ImageFolder split, with the `targets` and `classes` that the loaders and the feature cache
    read."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, indices)
        self.targets = [dataset.targets[index] for index in indices]
        self.classes = dataset.classes


def split_indices(targets, fraction, seed, classes):
    """(selection indices, test indices), each sorted: of every class's images, round(fraction x their number) go to
    the test part, drawn by numpy's generator seeded with `seed` (class by class, in label order), so that each part
    has the classes in the proportions of the whole. A class left without an image in either part is refused."""
    rng, selection, test = np.random.default_rng(seed), [], []
    for label, name in enumerate(classes):
        members = [index for index, target in enumerate(targets) if target == label]
        held = math.floor(fraction * len(members) + 0.5)
        if not 0 < held < len(members):
            raise UsageError(f"--holdout {fraction}: class {name} has {len(members)} validation image(s), of which "
                             f"{held} would be test images, leaving a part without that class; give a --holdout "
                             f"that leaves at least one image of every class in each part (e.g. 0.5)")
        drawn = rng.permutation(members).tolist()
        test += drawn[:held]
        selection += drawn[held:]
    return sorted(selection), sorted(test)


def split_holdout(datasets_, args):
    """datasets_ ({"train", "val"} and, from a test/ folder, "test") with --holdout's split of val: val becomes the
    selection part and test the held-out part. Both a test/ folder and --holdout are refused: which is the test?"""
    if args.holdout is None:
        return datasets_
    if "test" in datasets_:
        raise UsageError(f"--holdout {args.holdout} splits val/, but {args.data_dir} has a test/ folder too; drop "
                         f"--holdout to test on test/, or move test/ away to test on part of val/")
    val = datasets_["val"]
    selection, test = split_indices(val.targets, args.holdout, args.holdout_seed, val.classes)
    return dict(datasets_, val=Part(val, selection), test=Part(val, test))


def score_kept_head(model, state, score):
    """{"acc", "loss", "count"} of score() (a pass over the test part) with the kept model in `model`: the kept head
    (state["best_head"]; None: the last) and the BatchNorm statistics of its epoch (--bn-mode train moves them), as
    --save writes it. The last head and statistics come back afterwards: a later --resume with more epochs goes on
    from them, as it would have."""
    last = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if state["best_head"] is not None:
        model.fc.load_state_dict(state["best_head"])
        model.load_state_dict(state.get("best_buffers", {}), strict=False)
    loss, acc, count = score()
    model.load_state_dict(last)
    return dict(acc=acc, loss=loss, count=count)


def selected_epoch(state):
    """The 1-based epoch whose head was kept: the first whose validation accuracy was the best (the tutorial keeps a
    head only when it beats the best so far, which starts at 0), or None when no epoch beat 0."""
    if state["best_acc"] <= 0:
        return None
    return next(record["epoch"] for record in state["history"] if record["val_acc"] == state["best_acc"])


def metrics_fields(state):
    """The metrics JSON's selected_epoch and the test part's test_acc, test_loss, test_count (None without one)."""
    test = state.get("test") or {}
    return dict(selected_epoch=selected_epoch(state), test_acc=test.get("acc"), test_loss=test.get("loss"),
                test_count=test.get("count"))


def test_line(state):
    """The line that follows the tutorial's two when the run has a test part."""
    test = state["test"]
    return (f"Test accuracy of the selected head: {test['acc']:.4f} ({test['count']} images; loss {test['loss']:.4f}; "
            f"head of epoch {selected_epoch(state) or state['epoch']})")
