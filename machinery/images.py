"""What the dressed head is fed: the images (the ants/bees download, the start-up checks of a data folder,
decoding, the decode-once cache --image-cache, the feature cache --cache-features) and the frozen ResNet18 that
turns them into features (its weights, ImageNet, none or a file, each checked, and its --precision)."""

import functools
import glob
import hashlib
import os
import pickle
import platform
import shutil
import tempfile
import urllib.request
import zipfile
import zlib

import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from .command_line import ImageUnreadable, UsageError
from .process_group import broadcast_error, gather_shards, reduce_sums

DATA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                                "hymenoptera_data")  # beside qml.py
DOWNLOAD_TIMEOUT = 60  # seconds a stalled download may wait for the server
# Image counts of the published ants/bees set, checked after a download.
HYMENOPTERA_COUNTS = {"train": {"ants": 124, "bees": 121}, "val": {"ants": 70, "bees": 83}}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IMAGE_CACHE_SHARE = 0.25  # --image-cache auto keeps decoded images in up to this share of the available memory


# ----------------------------------------------------------------------------
# The data folder: found, downloaded when allowed, checked before training


def prepare_data(args, ctx):
    """Rank 0 checks (and if allowed downloads) the data; every rank gets its verdict."""
    message = None
    if ctx.is_main:
        try:
            if not os.path.isdir(args.data_dir):
                if not (args.download or args.data_dir_is_default):
                    raise UsageError(f"data directory {args.data_dir} not found; pass --data-dir DIR, "
                                     f"set QML_DATA_DIR, or add --download to fetch it")
                download_dataset(args.data_dir, args.data_url)
            check_images_decode(check_layout(args.data_dir))
        except UsageError as err:
            message = str(err)
    broadcast_error(ctx, message)


def list_images(folder):
    """{class name: sorted image paths} of an ImageFolder split; stray non-image files are ignored.

    Found as ImageFolder finds them (os.walk, hidden files too: a macOS '._x.jpg' is named, not skipped).
    """
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    return {c: sorted(os.path.join(root, name)
                      for root, _, names in os.walk(os.path.join(folder, c), followlinks=True)
                      for name in names if name.lower().endswith(IMG_EXTENSIONS)) for c in classes}


def check_layout(data_dir, expected_counts=None):
    """Check train/ and val/ hold the same >= 2 classes, each with images; optionally exact counts."""
    layout = {}
    for split in ("train", "val"):
        folder = os.path.join(data_dir, split)
        if not os.path.isdir(folder):
            raise UsageError(f"data directory {data_dir} has no {split}/ folder; {layout_fix(data_dir)}")
        layout[split] = list_images(folder)
        for name, paths in layout[split].items():
            if not paths:
                raise UsageError(f"class folder {os.path.join(folder, name)} has no images; "
                                 f"add images or remove the folder")
    if list(layout["train"]) != list(layout["val"]):
        raise UsageError(f"train/ and val/ have different classes ({', '.join(layout['train'])} vs "
                         f"{', '.join(layout['val'])}); give both the same class folders")
    if os.path.isdir(os.path.join(data_dir, "test")):  # the test part (heldout.py): the same classes, checked alike
        layout["test"] = list_images(os.path.join(data_dir, "test"))
        if list(layout["test"]) != list(layout["train"]) or not all(layout["test"].values()):
            raise UsageError(f"{data_dir}: test/ must hold the class folders of train/ ({', '.join(layout['train'])}), "
                             f"each with images; fix it, or move test/ away")
    if len(layout["train"]) < 2:
        raise UsageError(f"{data_dir}: found {len(layout['train'])} class folder(s) in train/; "
                         f"classification needs at least 2")
    if expected_counts is not None:  # counts files: train/ants also holds a GIF that ImageFolder skips
        counts = {s: {c: len(os.listdir(os.path.join(data_dir, s, c))) for c in layout[s]} for s in layout}
        if counts != expected_counts:
            raise UsageError(f"{data_dir} has {counts} images, expected {expected_counts}; "
                             f"delete it and run again with --download")
    return layout


def layout_fix(data_dir):
    """How to fix a data folder without train/ or val/: its single sub-folder that has both (the folder a zip
    was extracted into, e.g. hymenoptera_data), else what the layout needs."""
    entries = os.scandir(data_dir) if os.path.isdir(data_dir) else []  # bench.py checks a folder that may be missing
    inner = [entry.path for entry in entries
             if all(os.path.isdir(os.path.join(entry.path, split)) for split in ("train", "val"))]
    if len(inner) == 1:
        return f"its sub-folder {inner[0]} has train/ and val/: pass --data-dir {inner[0]}"
    return "it needs train/ and val/, each with one sub-folder of images per class"


UNREADABLE_NAMED = 10  # the start-up check names this many unreadable images, then counts the others


def check_images_decode(layout):
    """Decode every image once as training will, so that broken files are named now instead of crashing mid-epoch:
    all of them in one message (the first UNREADABLE_NAMED, then how many more), so that one run finds them all.

    (PIL's verify() passes a truncated JPEG: only a full decode finds it.)
    """
    unreadable = []
    for paths in (p for split in layout.values() for p in split.values()):
        for path in paths:
            try:
                load_rgb(path)
            except Exception:  # PIL raises many types for broken files
                unreadable.append(path)
    if len(unreadable) == 1:
        raise UsageError(f"{unreadable[0]} is not a readable image; delete or replace it")
    if unreadable:
        named = ", ".join(unreadable[:UNREADABLE_NAMED])
        more = len(unreadable) - UNREADABLE_NAMED
        raise UsageError(f"{len(unreadable)} files are not readable images: {named}"
                         f"{f' ... and {more} more' if more > 0 else ''}; delete or replace them")


def download_dataset(data_dir, url=DATA_URL):
    """Fetch the ants/bees zip, extract it safely, check it, and only then move it into place."""
    parent = os.path.dirname(os.path.abspath(data_dir))
    os.makedirs(parent, exist_ok=True)
    print(f"Downloading {url} to {data_dir}", flush=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".download-") as tmp:
        archive = os.path.join(tmp, "data.zip")
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(archive, "wb") as file:
                shutil.copyfileobj(response, file)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot download {url} ({err}); without network, copy hymenoptera_data "
                             f"somewhere and pass --data-dir DIR (or set QML_DATA_DIR)") from None
        extracted = extract_zip(archive, os.path.join(tmp, "extracted"))
        try:
            check_layout(extracted, HYMENOPTERA_COUNTS)
        except UsageError as err:
            raise UsageError(f"{url} is not the ants/bees data set ({err}); check --data-url") from None
        os.replace(extracted, data_dir)  # atomic: data_dir never holds a partial data set


def extract_zip(archive, target):
    """Extract `archive` into `target`, refusing entries that would land outside it; return the data root."""
    root = os.path.realpath(target)
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not os.path.realpath(os.path.join(root, name)).startswith(root + os.sep):
                    raise UsageError(f"the downloaded archive has an entry outside its folder ({name}); refusing it")
            zf.extractall(root)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # not a zip, truncated, or damaged inside
        raise UsageError(f"the downloaded file is not a complete zip archive ({err}); check --data-url") from None
    inner = [d for d in glob.glob(os.path.join(root, "*", "train")) if "__MACOSX" not in d]
    return os.path.dirname(inner[0]) if inner and not os.path.isdir(os.path.join(root, "train")) else root


# ----------------------------------------------------------------------------
# Decoding, and the tutorial's ToTensor and Normalize on the rank's device


def load_rgb(path):
    """Open an image of any mode (grayscale, RGBA, palette, CMYK, 16-bit) as 8-bit RGB."""
    with Image.open(path) as image:
        if image.mode.startswith("I"):  # 16-bit grey: scale to 8 bits first
            image = image.convert("I").point(lambda v: v / 256).convert("L")
        return image.convert("RGB")


def read_training_image(path):
    """load_rgb for training: an image deleted or damaged since the start-up check is named in one line."""
    try:
        return load_rgb(path)
    except Exception as err:  # PIL raises many types for broken files
        raise ImageUnreadable(f"{path} can no longer be read ({getattr(err, 'strerror', None) or err})") from None


@functools.lru_cache(maxsize=None)
def normalize_constants(device):
    """255, then the ImageNet channel means and deviations, as tensors on `device`."""
    channels = dict(dtype=torch.float32, device=device)
    return (torch.tensor(255.0, **channels), torch.tensor(IMAGENET_MEAN, **channels).view(-1, 1, 1),
            torch.tensor(IMAGENET_STD, **channels).view(-1, 1, 1))


def normalize_images(images):
    """ToTensor's scaling and Normalize of uint8 crops, bit for bit the tutorial's float pixels.

    The divisors are tensors on the images' device: a GPU multiplies by the reciprocal of a Python number,
    which can differ in the last bit from dividing by it.
    """
    scale, mean, std = normalize_constants(images.device)
    return images.float().div_(scale).sub_(mean).div_(std)


def prepare_images(images, device):
    """A batch of uint8 crops as the backbone's input on `device`: normalised, and channels_last on CPUs
    (as the backbone there; the uint8 batch is the cheapest to reorder)."""
    images = images.to(device, non_blocking=True)
    if device.type == "cpu":
        images = images.contiguous(memory_format=torch.channels_last)
    return normalize_images(images)


def default_workers(device):
    """Decoding workers per rank. On a GPU: one fewer than the CPUs this process may use, at most 3.
    On CPUs none: torch's and Kokkos' OpenMP threads already use every core, and a worker
    beside them stalls their barriers (an epoch measured 9 s without one, 12 s to 160 s with one).
    """
    if device.type == "cpu":
        return 0
    usable_cpus = len(os.sched_getaffinity(0))  # the task's CPUs under srun, not the node's
    return min(usable_cpus, 4) - 1


def resolve_workers(args, device):
    return args.workers if args.workers is not None else default_workers(device)


# ----------------------------------------------------------------------------
# --image-cache: each image decoded once, its crop kept on the rank's device


class KeptImages:
    """Decoded crops (uint8, on the rank's device) kept after their first use while they fit in `budget` bytes,
    keyed by (phase, index in its data set)."""

    def __init__(self, budget):
        self.free, self.images = budget, {}

    def keep(self, key, image):
        if image.nbytes <= self.free:
            # A decoding worker's image stays in shared memory, holding a file descriptor: keep a private copy.
            self.images[key] = image.clone() if image.device.type == "cpu" and image.is_shared() else image
            self.free -= image.nbytes


class ImageLoader:
    """The batches DataLoader(dataset, sampler, batch_size) would give, as normalised images on `device`.

    Each pass decodes (with `workers` processes) only the images that `kept` lacks, and offers them to it, so
    that a later pass over kept images reads no file. With several ranks a rank keeps what it has decoded:
    its shuffled share of each epoch, until `kept` is full.
    """

    def __init__(self, dataset, sampler, batch_size, device, workers, kept, phase):
        self.dataset, self.sampler, self.batch_size, self.device = dataset, sampler, batch_size, device
        self.kept, self.phase = kept, phase
        self.to_decode = []  # this pass's indices of images not kept, in the order the batches need them
        self.decoder = DataLoader(dataset, sampler=self.to_decode, batch_size=None, num_workers=workers,
                                  persistent_workers=workers > 0, pin_memory=device.type == "cuda")
        self.decoded = 0  # images the last pass decoded

    def __len__(self):
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        keys = [(self.phase, index) for index in self.sampler]
        # Decided before the pass: an index that comes twice is decoded twice, or taken twice from `kept`.
        from_files = [key not in self.kept.images for key in keys]
        self.to_decode[:] = [index for (_, index), decode in zip(keys, from_files, strict=True) if decode]
        self.decoded = len(self.to_decode)
        decoded = iter(self.decoder) if self.to_decode else None
        for start in range(0, len(keys), self.batch_size):
            batch = range(start, min(start + self.batch_size, len(keys)))
            images = [self.take_decoded(keys[i], decoded) if from_files[i] else self.kept.images[keys[i]]
                      for i in batch]
            labels = torch.tensor([self.dataset.targets[keys[i][1]] for i in batch])
            yield prepare_images(torch.stack(images), self.device), labels

    def take_decoded(self, key, decoded):
        """The decoder's next image (the one of `key`) on the device, offered to `kept`."""
        image = next(decoded)[0].to(self.device, non_blocking=True)
        self.kept.keep(key, image)
        return image


def image_cache_budget(setting, ctx):
    """Bytes of decoded images this rank may keep (--image-cache): off 0, a number of MiB, or auto:
    IMAGE_CACHE_SHARE of what the rank has (rank_memory)."""
    if setting == "off":
        return 0
    if setting != "auto":
        return int(setting * 2**20)
    return int(rank_memory(ctx, ctx.device.type == "cuda")[0] * IMAGE_CACHE_SHARE)


def rank_memory(ctx, on_gpu):
    """(bytes, where they are) this rank may still use: what its GPU has free, or the host's available memory
    shared by the host's ranks."""
    if on_gpu:
        return torch.cuda.mem_get_info(ctx.device)[0], f"GPU {ctx.device.index} (free memory)"
    host = ctx.rank_facts[ctx.rank]["host"]
    ranks_here = sum(fact["host"] == host for fact in ctx.rank_facts)
    shared = f", shared by its {ranks_here} ranks" if ranks_here > 1 else ""
    return available_host_memory() // ranks_here, f"this rank (the host's available memory{shared})"


def available_host_memory():
    """Bytes this host can still give: MemAvailable, or less under a cgroup v2 memory limit (a Slurm job's);
    0 where /proc/meminfo cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as file:
            available = next(int(line.split()[1]) * 1024 for line in file if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0
    try:
        with open("/proc/self/cgroup") as file:
            group = next(line.split(":", 2)[2].strip() for line in file if line.startswith("0::"))
        folder = os.path.join("/sys/fs/cgroup", group.lstrip("/"))
        with open(os.path.join(folder, "memory.max")) as limit, open(os.path.join(folder, "memory.current")) as used:
            return min(available, int(limit.read()) - int(used.read()))
    except (OSError, StopIteration, ValueError):  # no cgroup v2, or no limit ("max")
        return available


def decoding_counts(ctx, loaders):
    """Images decoded in this epoch and images kept decoded after it, summed over the ranks."""
    kept = loaders["train"].kept  # the phases share it
    counts = torch.tensor([sum(loader.decoded for loader in loaders.values()), len(kept.images)],
                          dtype=torch.float64, device=ctx.device)
    decoded, kept = reduce_sums(ctx, counts)
    return dict(images_decoded=int(decoded), images_kept=int(kept))


# ----------------------------------------------------------------------------
# --cache-features: the backbone once, then the head trains on its features


def cached_features(model, datasets_, args, ctx):
    """Run the frozen backbone once (BatchNorm in eval mode) and return TensorDatasets of features.

    Each rank embeds its share of the images; an all_gather gives every rank the whole set, so
    the training sampler draws exactly the batches it would draw from the images.
    """
    head, model.fc = model.fc, torch.nn.Identity()
    model.eval()
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    features = {}
    for split, data in datasets_.items():
        shard = range(rank, len(data), world)
        loader = DataLoader(data, batch_size=32, sampler=shard, num_workers=resolve_workers(args, device))
        with torch.no_grad(), backbone_autocast(args.precision, device):
            chunks = [model(prepare_images(images, device)).float() for images, _ in loader]
        local = torch.cat(chunks) if chunks else torch.empty(0, head.pre_net.in_features, device=device)
        feats = gather_shards(local, len(data), world, rank)
        labels = torch.tensor(data.targets)
        features[split] = TensorDataset(feats.cpu(), labels)
    model.fc = head
    return features


# ----------------------------------------------------------------------------
# The frozen ResNet18: its weights and --precision

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resnet18_weights_error():
    return (f"cannot load ImageNet ResNet18 weights (offline?): put resnet18-f37072fd.pth into "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} (or set TORCH_HOME), "
            f"pass --weights PATH to a ResNet18 state_dict, or use --weights none")


def load_backbone(weights):
    """ResNet18 with `weights` (imagenet | none | PATH). Every choice draws the same random init first."""
    if weights == "imagenet":
        try:
            return torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:  # offline, or a bad cached file
            raise UsageError(f"{resnet18_weights_error()} [{err}]") from None
    model = torchvision.models.resnet18(weights=None)
    if weights != "none":
        model.load_state_dict(read_resnet18_state_dict(weights, model.state_dict()))
    return model


def backbone_digest(model):
    """SHA-256 of the frozen backbone's weights (every parameter but the head's, in name order, as stored after
    --precision's cast): a model file records it, so that predict rebuilds the backbone it trained on or refuses."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters(), key=lambda pair: pair[0]):
        if not name.startswith("fc."):
            digest.update(name.encode() + tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_resnet18_state_dict(path, expected):
    """The state_dict in `path`, checked to have the keys and shapes of `expected` (a fresh ResNet18's)."""
    if not os.path.isfile(path):
        raise UsageError(f"--weights {path}: no such file; give a ResNet18 state_dict file, 'imagenet' or 'none'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable files
        raise UsageError(f"--weights {path}: cannot read it ({type(err).__name__}); "
                         f"save one with torch.save(model.state_dict(), PATH)") from None
    if not isinstance(state, dict) or tensor_shapes(state) != tensor_shapes(expected):
        raise UsageError(f"--weights {path}: not a ResNet18 state_dict (keys or shapes differ); "
                         f"save one with torch.save(torchvision.models.resnet18().state_dict(), PATH)")
    return state


def tensor_shapes(state):
    """{name: shape} of a state_dict; a value that is no tensor has the shape ()."""
    return {name: tuple(getattr(value, "shape", ())) for name, value in state.items()}


def fetch_weights_once(args, ctx):
    """With several ranks, rank 0 downloads the ImageNet weights into the torch hub cache before the others
    read them (one process simply loads them in build_model)."""
    message = None
    if args.weights == "imagenet" and ctx.world_size > 1 and ctx.is_main:
        try:
            load_backbone("imagenet")
        except UsageError as err:
            message = str(err)
    broadcast_error(ctx, message)


def cpu_name():
    """The CPU's model as the kernel names it, for the messages and tables that say which CPU a number is for."""
    try:
        with open("/proc/cpuinfo") as file:
            names = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def cpu_computes_bf16():
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), as torch's own kernels ask; None where
    torch cannot tell (not x86, or a torch without the query). oneDNN's "supported" is no answer: it counts
    emulation, which makes a bf16 backbone about 2.7x slower than fp32."""
    queries = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() not in ("x86_64", "amd64") or None in queries:
        return None
    return any(query() for query in queries)


def check_precision(precision, device):
    """Refuse a --precision that this rank's device cannot compute in."""
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs a GPU: CPUs have no fast float16 convolutions; "
                         "use --precision fp32 (or --precision bf16 on a CPU with bfloat16 instructions)")
    if precision == "bf16" and device.type == "cpu" and cpu_computes_bf16() is False:
        raise UsageError(f"--precision bf16: this CPU ({cpu_name()}) has no bfloat16 instructions (AVX512-BF16 or "
                         f"AMX), so torch would emulate them, slower than fp32; use --precision fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         f"use --precision fp16 (or fp32)")


def backbone_autocast(precision, device):
    """The context of the backbone's forward: autocast to --precision (none for fp32)."""
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def cast_frozen_convolutions(model, precision):
    """Store the backbone's convolution weights in --precision once. Autocast rounds them the same way, but at
    every batch: it keeps its casts only of weights that train."""
    if precision != "fp32":
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.to(PRECISIONS[precision])
