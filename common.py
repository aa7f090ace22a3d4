"""What ACL, A-InfoNCE, AIR and supervised training share: network, attacks, data, optimisation, run
utilities.

Nothing in this file is specific to one method; each method file (acl.py, a_infonce.py, air.py,
supervised.py) imports it and keeps its own loss and training loop in view. Each function's
docstring states what it computes (with the equation where there is one); README.md explains the
methods and protocols.
"""
import argparse
import atexit
import contextlib
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import sys
import time
import warnings
import weakref

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets


class UserError(Exception):
    """A problem with the user's input: reported as one sentence, exit status 2 (a subclass's `status`), no
    traceback."""
    status = 2


def fail(message, status=2, everywhere=False):
    """One sentence on stderr, then exit. everywhere=True: every torchrun process fails here together
    and they wait for each other, so none exits (and has torchrun stop the rest) before it is said."""
    if os.environ.get("LOCAL_RANK", "0") == "0":  # under torchrun: one message per node, not one per process
        print(f"error: {message}", file=sys.stderr, flush=True)
    if everywhere:
        barrier()
    sys.exit(status)


# =============================================================================================
# Network: dual-BN ResNet-18 with ACL's projection head
# =============================================================================================
# Module and key names follow the released ACL / DynACL / AIR checkpoints, so their state dicts
# load into this network as they are (bn_list.0 = clean BN, bn_list.1 = adversarial BN).

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DualBN(nn.Module):
    """Two independent batch norms; `adv` picks the copy, the other one is left untouched."""

    def __init__(self, channels, bn=nn.BatchNorm2d):
        super().__init__()
        self.bn_list = nn.ModuleList([bn(channels), bn(channels)])

    def forward(self, x, adv=False):
        return self.bn_list[1 if adv else 0](x)


class Normalize(nn.Module):
    """Mean/std normalisation inside the model, so attacks and eps live in [0, 1] pixel space."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x):
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


class Downsample(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.bn = DualBN(cout)

    def forward(self, x, adv):
        return self.bn(self.conv(x), adv)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = DualBN(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = DualBN(cout)
        self.downsample = Downsample(cin, cout, stride) if stride != 1 or cin != cout else None

    def forward(self, x, adv):
        out = F.relu(self.bn1(self.conv1(x), adv))
        out = self.bn2(self.conv2(out), adv)
        shortcut = x if self.downsample is None else self.downsample(x, adv)
        return F.relu(out + shortcut)


class ProjectionHead(nn.Module):
    """ACL's head: Linear(bias)-BN-ReLU-Linear-BN-ReLU-Linear-BN, every BN dual."""

    def __init__(self, d):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(d, d), DualBN(d, nn.BatchNorm1d)
        self.fc2, self.bn2 = nn.Linear(d, d, bias=False), DualBN(d, nn.BatchNorm1d)
        self.fc3, self.bn3 = nn.Linear(d, d, bias=False), DualBN(d, nn.BatchNorm1d)

    def forward(self, h, adv=False):
        h = F.relu(self.bn1(self.fc1(h), adv))
        h = F.relu(self.bn2(self.fc2(h), adv))
        return self.bn3(self.fc3(h), adv)


class ResNet18(nn.Module):
    """Dual-BN ResNet-18. `width` scales every stage (64 -> width); `stem` is 'cifar' (3x3, stride 1,
    no max-pool; 32 px) or 'imagenet' (7x7 stride 2 + max-pool; 96 px STL-10). `model(x, adv)` gives
    the projection; `model.features(x, adv)` the pooled feature; `stages=True` every stage output."""

    def __init__(self, width=64, stem="cifar", head=True):
        super().__init__()
        self.normalize = Normalize()
        self.stem = stem
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        else:
            raise ValueError(f"unknown stem {stem!r}")
        self.bn1 = DualBN(width)
        channels = [width, 2 * width, 4 * width, 8 * width]
        cin = width
        for i, (c, stride) in enumerate(zip(channels, [1, 2, 2, 2])):
            setattr(self, f"layer{i + 1}", nn.ModuleList([BasicBlock(cin, c, stride), BasicBlock(c, c, 1)]))
            cin = c
        self.feature_dim = cin
        self.fc = ProjectionHead(cin) if head else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x, adv=False, stages=False):
        out = F.relu(self.bn1(self.conv1(self.normalize(x)), adv))
        if self.stem == "imagenet":
            out = F.max_pool2d(out, 3, 2, 1)
        outs = [out]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                out = block(out, adv)
            outs.append(out)
        pooled = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return outs + [pooled] if stages else pooled

    def forward(self, x, adv=False):
        return self.fc(self.features(x, adv), adv)


STAGE_NAMES = ["stem", "layer1", "layer2", "layer3", "layer4", "pooled"]


def stem_for(image_size):
    """ACL uses the CIFAR stem for 32 px inputs and the ImageNet stem for 96 px STL-10."""
    return "cifar" if image_size < 64 else "imagenet"


# =============================================================================================
# Contrastive loss and attacks
# =============================================================================================

def autocast(amp):
    """bf16 autocast for the network on CUDA; a no-op when amp is False (always on the CPU)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp)


def nt_xent(za, zb, temperature=0.5, labels=None):
    """SimCLR NT-Xent over the 2B rows Z = [za; zb] (raw head outputs; L2-normalised here, in fp32).
    With S = Z Z^T / t, anchor k's positive is its partner k +/- B:
    loss = mean_k [ -S[k, partner] + log sum_{j != k} exp(S[k, j]) ].
    With `labels` y (one per image; both views share it), SupCon's L_out (Khosla et al., NeurIPS 2020):
    anchor k's positives are P(k) = {j != k : y_j = y_k} among the 2B rows, and
    loss = mean_k [ -(1/|P(k)|) sum_{p in P(k)} S[k, p] + log sum_{j != k} exp(S[k, j]) ],
    which is NT-Xent when every image is its own class."""
    z = F.normalize(torch.cat([za, zb]).float(), dim=1)
    n = z.shape[0]
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))  # j != k in the denominator
    if labels is None:
        partner = torch.arange(n, device=z.device).roll(n // 2)  # k's positive is k +/- B
        return F.cross_entropy(logits, partner)
    y = torch.cat([labels, labels])
    positive = (y[:, None] == y[None, :]).fill_diagonal_(False)  # P(k); the partner is always in it
    log_prob = torch.where(positive, logits.log_softmax(1), 0.0)  # S[k, p] - log sum_{j != k} exp(S[k, j])
    mean_over_positives = (log_prob.sum(1) / positive.sum(1))[:, None]
    # -mean_k, reduced the way cross_entropy reduces: with one class per image, NT-Xent bit for bit
    return F.nll_loss(mean_over_positives, torch.zeros(n, dtype=torch.long, device=z.device))


def step_and_project(x_adv, grad, x, eps, alpha):
    """One sign-gradient ascent step, projected to the L-inf eps-ball around x and to [0, 1]."""
    x_adv = x_adv.detach() + alpha * grad.sign()
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)


def _random_start(x, eps, rank=0, world=1, views=1):
    """x + U(-eps, eps) per pixel, clipped to [0, 1]. Under torchrun x holds this process's slice of
    each of `views` views (x = [x1; x2] for the contrastive attack), and the noise is that slice of the
    draw one process makes for the global batch (every process draws it from the same random state),
    so the attack starts where the one-process attack starts."""
    if world == 1:
        return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0, 1)
    noise = torch.empty_like(torch.cat([x] * world)).uniform_(-eps, eps)  # rows: [x1 of ranks 0..N-1; x2 of ranks 0..N-1]
    return (x + noise.unflatten(0, (views, world, -1))[:, rank].flatten(0, 1)).clamp_(0, 1)


@contextlib.contextmanager
def attack_mode(model):
    """The attacks' setting: eval mode (batch norms on their running statistics) and input gradients
    only, with the parameters' requires_grad off so that no parameter gradient is built, also by a
    torch.compile'd model whose backward is traced. Both are restored afterwards."""
    was_training = model.training
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def contrastive_pgd(model, x1, x2, eps=8 / 255, alpha=2 / 255, steps=5, temperature=0.5, amp=False, labels=None):
    """Joint L-inf PGD on both views, ascending nt_xent(z1_adv, z2_adv, labels) through the adversarial
    BN in eval mode (`labels`: the global batch's, for --supcon). Only input gradients are computed
    (torch.autograd.grad with the images as the only inputs; see attack_mode), so no parameter
    gradient is built or accumulated. The mode is restored.
    eps = 0 returns the views as they are, with no forward or backward (so --eps 0 is standard,
    non-adversarial contrastive learning at no attack cost); steps = 0 leaves the random start only.
    Under torchrun, `model` is the unwrapped module (never DDP's forward) and the loss is the global
    batch's: the embeddings of every process's slice are gathered (see gather)."""
    if eps == 0:
        return x1, x2
    x = torch.cat([x1, x2])
    x_adv = _random_start(x, eps, *rank_and_world(), views=2)
    with attack_mode(model):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                with autocast(amp):
                    z = model(x_adv, adv=True)
                loss = nt_xent(*gather(*z.float().chunk(2)), temperature, labels)
                (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = step_and_project(x_adv, grad, x, eps, alpha)
    return [t.detach() for t in x_adv.chunk(2)]


def pgd_attack(forward, x, y, eps=8 / 255, alpha=2 / 255, steps=20, amp=False):
    """Cross-entropy L-inf PGD with a random start against `forward` (images -> logits), as used for
    evaluation (PGD-20), adversarial linear fine-tuning (PGD-10) and supervised.py's adversarial
    training. Input gradients only. Under torchrun (supervised.py) x is this process's slice and the
    random start is that slice of the one-process draw (_random_start)."""
    x_adv = _random_start(x, eps, *rank_and_world())
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            with autocast(amp):
                logits = forward(x_adv)
            loss = F.cross_entropy(logits.float(), y)
            (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = step_and_project(x_adv, grad, x, eps, alpha)
    return x_adv.detach()


# =============================================================================================
# Data
# =============================================================================================

DATASETS = ["cifar10", "cifar100", "stl10", "imagefolder", "digits", "synthetic"]
# None: the images come in any size (imagefolder) or are made at --image-size (digits), see _resize.
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "imagefolder": None, "digits": None, "synthetic": 32}
DEFAULT_IMAGE_SIZE = {"imagefolder": 32, "digits": 16}  # --image-size of the datasets without a native size
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10, "digits": 10, "synthetic": 10}
DIGITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
DIGITS_SHA256 = "d577edce67e5aa5721ae9ac6507a964154781e521d15152b6107afb2d759c41b"  # README.md prints it too


class _ExtractedCopy:
    """torchvision checks the md5 of every file before reading a dataset. These variants read a copy
    that is already extracted in place as it is (our departure: no md5 check on extracted files, so
    re-packed and test copies load); a missing copy still goes through torchvision's download.
    They are module-level classes so that data-loader workers started by 'spawn' can pickle them."""

    def _check_integrity(self):
        files = self.train_list + self.test_list
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f, _ in files)


class CIFAR10(_ExtractedCopy, datasets.CIFAR10):
    meta = dict(datasets.CIFAR10.meta, md5=None)  # the label-names file: md5 None = it exists


class CIFAR100(_ExtractedCopy, datasets.CIFAR100):
    meta = dict(datasets.CIFAR100.meta, md5=None)


class STL10(_ExtractedCopy, datasets.STL10):
    pass


class _ArrayImages(Dataset):
    """(PIL image, label) of images held as a uint8 (N, H, W, 3) array `data` with their `targets`."""

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image
        return Image.fromarray(self.data[i]), self.targets[i]


class SyntheticImages(_ArrayImages):
    """CIFAR-10-sized random uint8 images and labels made from the seed: for tests and benchmarks."""

    def __init__(self, train=True, seed=0, size=None):
        n = size or (50000 if train else 10000)
        rng = np.random.default_rng(seed * 2 + (0 if train else 1))
        self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, 10, size=n).tolist()


class DigitsImages(_ArrayImages):
    """The built-in real dataset: UCI "Optical Recognition of Handwritten Digits" (Alpaydin & Kaynak; the
    1,797 8x8 grey scans, values 0..16, that scikit-learn ships; CC BY 4.0), stored in digits.npz beside
    this file with a fixed stratified split (`train`: 2/3 of each class, 1,198 images; the rest, 599, is
    the test split). Pixels are scaled to 0..255, resized bilinearly to `size` once, here, and made RGB,
    so every later transform sees `size` px images as it sees CIFAR's 32 px ones. Labels are the digits."""

    def __init__(self, train=True, size=16):
        check_digits_file()
        with np.load(DIGITS_FILE) as f:
            keep = f["train"] if train else ~f["train"]
            scans, self.targets = f["images"][keep], f["labels"][keep].tolist()
        from PIL import Image
        grey = [Image.fromarray(np.round(x * (255 / 16)).astype(np.uint8)) for x in scans]
        self.data = np.stack([np.asarray(g.resize((size, size), Image.BILINEAR).convert("RGB")) for g in grey])


def check_digits_file():
    """digits.npz must be the file this project ships, byte for byte (its SHA-256; 46 KB, read in
    milliseconds): a missing, unreadable, cut or changed file ends with one sentence saying how to get
    it back, never with numpy's or zipfile's traceback and never by training on other data."""
    how = ("get it back with 'git checkout digits.npz' in the repository, or copy digits.npz from the repository "
           "next to common.py")
    if not os.path.isfile(DIGITS_FILE):
        raise UserError(f"the built-in digits data file {DIGITS_FILE} is missing; {how}")
    try:
        with open(DIGITS_FILE, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise UserError(f"the built-in digits data file {DIGITS_FILE} cannot be read ({e.strerror}); {how}") from None
    if digest != DIGITS_SHA256:
        raise UserError(f"the built-in digits data file {DIGITS_FILE} is damaged or changed (SHA-256 {digest[:12]}..., "
                        f"not {DIGITS_SHA256[:12]}...); {how}")


def check_data_dir_is_read(dataset):
    """--data-dir given with a dataset that reads no folder (digits is built in, synthetic is generated) could only
    be a mistake (a mistyped --dataset, or a folder the user believes is read): refused in one sentence."""
    if dataset in ("digits", "synthetic"):
        where = "built in (digits.npz next to common.py)" if dataset == "digits" else "generated, for tests"
        raise UserError(f"--data-dir is not read with --dataset {dataset}, whose images are {where}; drop --data-dir "
                        "or choose the dataset that folder holds")


def load_dataset(name, data_dir, split, seed=0, size=None):
    """The raw dataset (PIL image, label) for split 'pretrain', 'train' or 'test'; `size` is the image size
    of datasets made at --image-size (digits). Missing data ends with one sentence naming the folder and
    what to put there."""
    if name == "synthetic":
        return SyntheticImages(train=split != "test", seed=seed)
    if name == "digits":
        return DigitsImages(train=split != "test", size=size or DEFAULT_IMAGE_SIZE["digits"])
    if name == "imagefolder":
        folder = os.path.join(data_dir, "test" if split == "test" else "train")
        if not os.path.isdir(folder):  # pre-training reads only train/; evaluation reads train/ and test/
            raise UserError(f"no folder {folder}: --dataset imagefolder needs {folder}{os.sep} with one subfolder "
                            "of images per class")
        try:
            return datasets.ImageFolder(folder)
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"{folder} holds no images in class subfolders ({e}); "
                            "put one folder of images per class there") from None
    if name in ("cifar10", "cifar100"):
        cls = CIFAR10 if name == "cifar10" else CIFAR100
        kwargs = {"train": split != "test"}
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
    elif name == "stl10":
        cls = STL10
        kwargs = {"split": {"pretrain": "unlabeled", "train": "train", "test": "test"}[split]}
        archive = "stl10_binary.tar.gz"
    else:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    created = _first_missing_folder(data_dir)  # torchvision creates the folder before it downloads
    try:
        return cls(data_dir, download=True, **kwargs)
    except Exception as e:  # no network, a broken archive, a full disk: say where the data must go
        if created:  # a failed load leaves nothing behind, e.g. after a mistyped --data-dir
            shutil.rmtree(created, ignore_errors=True)
        folder = os.path.join(os.path.abspath(data_dir), cls.base_folder)
        why = _why_unreadable(cls, folder) if os.path.isdir(folder) else None
        if why:  # the extracted copy is there (so torchvision did not say why it failed): name the file
            raise UserError(f"the {name} folder {folder} is there but cannot be read: {why}; extract {archive} "
                            f"into {os.path.abspath(data_dir)} again (or remove the folder to download it again)") from None
        reason = str(e).strip() or type(e).__name__
        raise UserError(f"could not find or download {name} in {os.path.abspath(data_dir)} ({reason}); "
                        f"download {archive} elsewhere and put it (or its extracted folder) there, or point "
                        "--data-dir at a folder that has it") from None


def _why_unreadable(cls, folder):
    """What is wrong with an extracted CIFAR folder, naming the file (None if nothing is found): a file
    missing, not a pickle, or not a dict of 3x32x32 uint8 rows and their labels as torchvision reads it."""
    if cls not in (CIFAR10, CIFAR100):
        return None
    labels = "labels" if cls is CIFAR10 else "fine_labels"
    for filename, keys in [(f, ("data", labels)) for f, _ in cls.train_list + cls.test_list] + [
            (cls.meta["filename"], (cls.meta["key"],))]:
        path = os.path.join(folder, filename)
        if not os.path.isfile(path):
            return f"{filename} is missing"
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
        except Exception as e:
            return f"{filename} is not a readable pickle ({type(e).__name__}: {str(e).strip() or 'no detail'})"
        missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
        if missing:
            return f"{filename} has no {' or '.join(repr(k) for k in missing)} entry"
        if "data" in keys:
            try:
                rows = np.asarray(entry["data"]).size == 3072 * len(entry[labels])
            except TypeError:
                rows = False
            if not rows:
                return f"{filename}'s 'data' is not one row of 3x32x32 pixels per label"
    return None


def _first_missing_folder(path):
    """The outermost folder of `path` that does not exist yet (None if it all exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def pretrain_transform(size, strength=1.0):
    """ACL's augmentation at strength s in [0, 1] (s = 1 is ACL's; DynACL lowers it):
    RandomResizedCrop(scale 1 - 0.9 s .. 1, bicubic), flip, ColorJitter(0.4 s, 0.4 s, 0.4 s, 0.1 s) with
    p = 0.8 s, RandomGrayscale p = 0.2 s; no blur."""
    s = strength
    return T.Compose([
        T.RandomResizedCrop(size, scale=(1 - 0.9 * s, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s)], p=0.8 * s),
        T.RandomGrayscale(p=0.2 * s),
        T.ToTensor(),
    ])


def _resize(size, native):
    return [] if native == size else [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]


def eval_transform(size, native, train):
    """Evaluation: train split RandomCrop(size, padding=4) + flip; test split unaugmented."""
    aug = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose(_resize(size, native) + aug + [T.ToTensor()])


def _sample_seed(seed, epoch, index):
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63)


class PretrainViews(Dataset):
    """Yields (x1, x2, x0, y): two augmented views, the un-augmented image and its label (--supcon; -1 in STL-10's
    unlabelled split). The key is (index, epoch, strength) from PretrainSampler; the augmentation of each image is
    seeded by (seed, epoch, index), so a resumed run sees exactly the views the interrupted one would have, whatever
    the number of workers. supervised=True (supervised.py) yields (x, y) instead: one view with the evaluation's
    training augmentation, RandomCrop(size, padding 4) + flip, seeded the same way (strength is unused)."""

    def __init__(self, base, size, native, seed, supervised=False):
        self.base, self.size, self.seed, self.supervised = base, size, seed, supervised
        self.original = eval_transform(size, native, train=False)
        self.cropped = eval_transform(size, native, train=True)
        self.transforms = {}

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, epoch, strength = key
        image, label = self.base[index]
        image = image.convert("RGB") if image.mode != "RGB" else image
        if strength not in self.transforms and not self.supervised:
            self.transforms[strength] = pretrain_transform(self.size, strength)
        with torch.random.fork_rng(devices=[]):  # leave the training RNG alone when workers == 0
            torch.random.default_generator.manual_seed(_sample_seed(self.seed, epoch, index))
            if self.supervised:
                return self.cropped(image), label
            x1 = self.transforms[strength](image)
            x2 = self.transforms[strength](image)
        return x1, x2, self.original(image), label


class PretrainSampler(Sampler):
    """Batches of keys (index, epoch, strength): a permutation seeded by (seed, epoch), last partial batch dropped.
    set_epoch(epoch, strength, start) chooses the epoch and skips `start` batches (resume). The sampler runs in the main
    process, so this reaches persistent workers too. Process `rank` of `world` takes the rank-th of `world` equal,
    consecutive slices of each global batch of `batch_size`: the slices, in rank order, are the one-process batch."""

    def __init__(self, n, batch_size, seed, rank=0, world=1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.local = rank, batch_size // world
        self.epoch, self.strength, self.start = 1, 1.0, 0

    def set_epoch(self, epoch, strength=1.0, start=0):
        self.epoch, self.strength, self.start = epoch, strength, start

    @property
    def batches_per_epoch(self):
        return self.n // self.batch_size

    def __len__(self):
        return self.batches_per_epoch - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.start, self.batches_per_epoch):
            first = b * self.batch_size + self.rank * self.local
            batch = order[first:first + self.local]
            yield [(i, self.epoch, self.strength) for i in batch]


# --- Whole batches on the training device (--augment batched) -----------------------------------
# The datasets held in memory go to the training device once, as uint8; each step's batch is cut from them by
# the sampler's indices and augmented there as a whole, with one parameter set per image drawn as torchvision
# draws it (README, "Augmentation"), by a CPU generator keyed on (seed, epoch, batch), for the global batch, of
# which each process takes its slice: a resumed run and N processes see the views of one uninterrupted process.
# The indices and parameters go in one non-blocking copy from pinned memory; nothing here waits for the device.

IN_MEMORY = ["cifar10", "cifar100", "stl10", "digits", "synthetic"]


def crop_params(g, n, height, width, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params for n images at once: 10 tries of
    area = H W U(scale), log(aspect) ~ U(log ratio), w = round(sqrt(area aspect)), h = round(sqrt(area / aspect));
    the first try with 0 < w <= W and 0 < h <= H wins, with top i ~ U{0..H-h}, left j ~ U{0..W-w};
    if none does, the centre crop at the nearest allowed aspect ratio. Returns (i, j, h, w), float (n,)."""
    area = height * width * torch.empty(n, 10, dtype=torch.float64).uniform_(*scale, generator=g)
    aspect = torch.empty(n, 10, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).exp()
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))  # half to even, as round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # argmax gives the first maximal index
    fallback_w, fallback_h = ((width, round(width / ratio[0])) if width / height < ratio[0] else
                              (round(height * ratio[1]), height) if width / height > ratio[1] else (width, height))
    found = ok.any(1)
    w = torch.where(found, w.gather(1, first)[:, 0], float(fallback_w))
    h = torch.where(found, h.gather(1, first)[:, 0], float(fallback_h))
    u = torch.rand(2, n, dtype=torch.float64, generator=g)
    i = torch.where(found, torch.minimum((u[0] * (height - h + 1)).floor(), height - h), (height - h) // 2)
    j = torch.where(found, torch.minimum((u[1] * (width - w + 1)).floor(), width - w), (width - w) // 2)
    return i.float(), j.float(), h.float(), w.float()


def view_params(g, n, height, width, s):
    """The random parameters of pretrain_transform(size, s) for n images: crop (i, j, h, w), flip
    (p 0.5), ColorJitter factors [brightness, contrast, saturation ~ U(max(0, 1 - 0.4 s), 1 + 0.4 s),
    hue ~ U(-0.1 s, 0.1 s)] applied in a per-image random order with p 0.8 s, grayscale (p 0.2 s); s: strength."""
    params = dict(zip("ijhw", crop_params(g, n, height, width, (1 - 0.9 * s, 1.0))))
    u = torch.rand(n, 7, dtype=torch.float64, generator=g)
    low, high = torch.tensor([max(0, 1 - 0.4 * s)] * 3 + [-0.1 * s]), torch.tensor([1 + 0.4 * s] * 3 + [0.1 * s])
    params.update(flip=u[:, 0] < 0.5, factors=(low + (high - low) * u[:, 1:5]).float(),
                  order=torch.rand(n, 4, generator=g).argsort(1),  # a uniform random permutation per image
                  jitter=u[:, 5] < 0.8 * s, gray=u[:, 6] < 0.2 * s)
    return params


def crop_flip_params(g, n, size, padding=4):
    """RandomCrop(size, padding) + flip for n images: top, left ~ U{0..2 padding} in the padded image."""
    corner = torch.randint(0, 2 * padding + 1, (2, n), generator=g)
    return {"i": corner[0] - padding, "j": corner[1] - padding, "flip": torch.rand(n, generator=g) < 0.5}


def cubic(t, a=-0.5):
    """The bicubic kernel (Keys) with a = -0.5, PIL's and torch's antialiased bicubic."""
    t = t.abs()
    return torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                       torch.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


def resize_matrix(start, length, in_size, out_size):
    """R (n, out_size, in_size): row r resamples the crop [start, start + length) of a line of in_size
    pixels to out_size as torchvision's resize(BICUBIC, antialias=True) does (PIL's scheme): centre
    c = (r + 1/2) L / out, weights cubic((x + 1/2 - c) / max(1, L / out)) over the crop's pixels x, normalised."""
    scale = (length / out_size)[:, None, None]
    center = (torch.arange(out_size, device=start.device)[None, :, None] + 0.5) * scale
    x = torch.arange(in_size, device=start.device)[None, None, :] - start[:, None, None]  # in crop coordinates
    w = cubic((x + 0.5 - center) / scale.clamp(min=1)) * ((x >= 0) & (x < length[:, None, None]))
    return w / w.sum(2, keepdim=True)


def shift_matrix(start, in_size, out_size):
    """R (n, out_size, in_size), R[r, x] = 1 where x = start + r: a crop, zero outside (RandomCrop's padding)."""
    rows = torch.arange(out_size, device=start.device)[None, :, None] + start[:, None, None]
    return (rows == torch.arange(in_size, device=start.device)).float()


def resample(images, ry, rx, flip=None):
    """out = Ry X Rx^T per image and channel, one batched matmul on uint8 images scaled to [0, 1], clamped
    to [0, 1] as PIL's uint8 result is; hflip reverses the rows of Rx (the output columns)."""
    if flip is not None:
        rx = torch.where(flip[:, None, None], rx.flip(1), rx)
    return (ry[:, None] @ (images.float() / 255) @ rx[:, None].transpose(-1, -2)).clamp(0, 1)


def grayscale(x):
    """torchvision's rgb_to_grayscale: L = 0.2989 R + 0.587 G + 0.114 B, shape (n, 1, H, W)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def blend(x, other, f):
    """torchvision's _blend: clamp(f x + (1 - f) other, 0, 1); f = 1 leaves x as it is."""
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_hue(x, f):
    """torchvision's adjust_hue: RGB -> HSV (H in [0, 1)), H <- (H + f) mod 1, HSV -> RGB by
    channel_k = V - V S clamp(min(m, 4 - m), 0, 1), m = (k + 6 H) mod 6, k = 5, 3, 1 for R, G, B."""
    v = x.amax(1)
    c = v - x.amin(1)  # chroma
    s = c / torch.where(c == 0, 1, v)
    r, g, b = ((v[:, None] - x) / torch.where(c == 0, 1, c)[:, None]).unbind(1)  # (V - R) / C, ...
    red, green = v == x[:, 0], (v == x[:, 1]) & (v != x[:, 0])
    h6 = torch.where(red, b - g, torch.where(green, 2 + r - b, 4 + g - r))  # 6 H, in [-1, 5)
    h6 = torch.remainder(h6 + 6 * f[:, 0], 6)
    k = torch.arange(5.0, 0.0, -2.0, device=x.device)[None, :, None, None]  # 5, 3, 1, made there: no copy
    m = torch.remainder(k + h6[:, None], 6)
    return v[:, None] - (v * s)[:, None] * torch.minimum(m, 4 - m).clamp(0, 1)


def jitter_groups(order, jitter):
    """Computed where order and jitter were drawn (the host): for each position k, the images sorted by the op
    they apply there (column k of perm; those ColorJitter skips last) and how many apply each (counts[k])."""
    op = torch.where(jitter[:, None], order, 4)
    return op.argsort(dim=0, stable=True), [torch.bincount(op[:, k], minlength=5).tolist() for k in range(4)]


def color_jitter(x, factors, perm, counts):
    """RandomApply(ColorJitter, p) with torchvision's per-image random order: at each of the 4 positions every image
    applies its own op (0 brightness: blend with 0; 1 contrast: with the mean of its grayscale; 2 saturation: with its
    grayscale; 3 hue), computed for those images alone, gathered and scattered by jitter_groups' host-made indices."""
    x = x.clone()  # written in place below
    for k in range(4):
        for o, i in enumerate(perm[:, k].split(counts[k])[:4]):
            if len(i):
                xi, f = x[i], factors[i, o, None, None, None]
                other = grayscale(xi) if o in (1, 2) else 0
                other = other.mean((1, 2, 3), keepdim=True) if o == 1 else other
                x[i] = adjust_hue(xi, f) if o == 3 else blend(xi, other, f)
    return x


def augment(images, p, size):
    """pretrain_transform on a batch of uint8 images (n, 3, H, W) with parameters p (view_params):
    RandomResizedCrop(bicubic) + flip as one resampling, ColorJitter, RandomGrayscale; float in [0, 1]."""
    x = resample(images, resize_matrix(p["i"], p["h"], images.shape[2], size),
                 resize_matrix(p["j"], p["w"], images.shape[3], size), p["flip"])
    x = color_jitter(x, p["factors"], p["perm"], p["counts"])
    return torch.where(p["gray"][:, None, None, None], grayscale(x).expand_as(x), x)


class BatchedViews:
    """The loader of --augment batched: iterating yields, per batch of the sampler, (x1, x2, x0, y) as
    PretrainViews does (supervised=True: (x, y)), made on the device of `images` (uint8 (N, 3, H, W))."""

    def __init__(self, images, labels, sampler, size, seed, supervised=False):
        self.images, self.labels, self.batch_sampler = images, labels, sampler
        self.size, self.seed, self.supervised = size, seed, supervised
        height, self.native = images.shape[2], images.shape[2] == size
        zero, whole = torch.zeros(1, device=images.device), torch.full((1,), float(height), device=images.device)
        self.to_size = resize_matrix(zero, whole, height, size)  # eval_transform's Resize(size) of a square image

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        sampler, device = self.batch_sampler, self.images.device
        for batch, keys in enumerate(sampler, sampler.start):
            g = torch.Generator().manual_seed(_sample_seed(self.seed, sampler.epoch, batch))
            drawn = ([crop_flip_params(g, sampler.batch_size, self.size)] if self.supervised else
                     [view_params(g, sampler.batch_size, *self.images.shape[2:], sampler.strength) for _ in range(2)])
            first = sampler.rank * sampler.local  # this process's slice of the global batch's parameters
            views = [{k: v[first:first + len(keys)] for k, v in p.items()} for p in drawn]
            for p in views if not self.supervised else []:
                p["perm"], p["counts"] = jitter_groups(p.pop("order"), p.pop("jitter"))
            moved, *views = to_device([{"index": torch.tensor([key[0] for key in keys])}] + views, device)
            images, y = self.images[moved["index"]], self.labels[moved["index"]]
            if self.supervised:
                yield self.crop_flip(images, views[0]), y
            else:
                yield *(augment(images, p, self.size) for p in views), self.original(images), y

    def original(self, images):
        """x0: eval_transform(train=False), Resize(size) if the images are not that size."""
        to_size = self.to_size.expand(len(images), -1, -1)
        return images.float() / 255 if self.native else resample(images, to_size, to_size)

    def crop_flip(self, images, p):
        """eval_transform(train=True): Resize(size) if needed, RandomCrop(size, padding 4) + flip."""
        ry, rx = (shift_matrix(p[k], self.size, self.size) @ self.to_size for k in "ij")
        return resample(images, ry, rx, p["flip"])


def to_device(host, device):
    """The tensors in `host` (dicts of tensors of one row per image; other values stay) on `device` in one copy: side by
    side in one float64 tensor (exact for these indices, coordinates and float32 factors), pinned on CUDA, so that the
    non-blocking copy waits for nothing (PyTorch reuses pinned memory only once its copies are done), unpacked there."""
    tensors = [t for p in host for t in p.values() if isinstance(t, torch.Tensor)]
    packed = torch.cat([t.reshape(len(t), -1).double() for t in tensors], 1)
    moved = (packed.pin_memory() if device.type == "cuda" else packed).to(device, non_blocking=True)
    cols = iter(moved.split([t[0].numel() for t in tensors], 1))
    return [{k: next(cols).reshape_as(v).to(v.dtype) if torch.is_tensor(v) else v for k, v in p.items()} for p in host]


def in_memory(base, device):
    """The images of an in-memory dataset as uint8 (N, 3, H, W) and its labels (N,), on `device`."""
    images = torch.from_numpy(base.data)  # HWC (CIFAR, digits, synthetic); STL-10 is stored CHW
    images = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 else images
    labels = torch.as_tensor(np.asarray(base.targets if hasattr(base, "targets") else base.labels))  # STL-10: labels
    return images.to(device), labels.long().to(device)  # no host copy: dense, it moves as it is


def _worker_init(_):
    # Ctrl-C and a SIGTERM to the process group (scancel, kill -- -PGID) are the main process's: it stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# Loaders whose workers still run at exit: multiprocessing then ends daemonic children with SIGTERM and joins them,
# but ours ignore SIGTERM (above), so the program would hang. A loader can outlive main(): matplotlib's mathtext parser
# keeps tracebacks holding main()'s frame in reference cycles, freed only after the exit hooks. This hook (registered
# after torch's and multiprocessing's, so run before them) ends the workers as dropping the iterator does (no API).
_LOADERS = weakref.WeakSet()


@atexit.register
def _end_loader_workers():
    for loader in list(_LOADERS):
        loader._iterator = None


def _tracked(loader):
    _LOADERS.add(loader)
    return loader


def default_workers():
    return min(8, os.cpu_count() or 1)


def pretrain_loader(args, device, supervised=False):
    """The pre-training dataset and its loader; returns (loader, sampler). supervised=True: the
    labelled training split, one view per image (PretrainViews). --augment batched (the default on CUDA
    for the datasets held in memory): BatchedViews on `device`; pil: PretrainViews in loader workers."""
    if args.augment is None:  # resolved once and saved with the run; a resumed run from before the flag used PIL
        args.augment = "batched" if device.type == "cuda" and args.dataset in IN_MEMORY and not args.resume else "pil"
    if args.augment == "batched" and args.dataset not in IN_MEMORY:
        raise UserError(f"--augment batched needs a dataset held in memory ({', '.join(IN_MEMORY)}); --dataset "
                        f"{args.dataset} is read from files one image at a time: use --augment pil")
    base = load_dataset(args.dataset, args.data_dir, "train" if supervised else "pretrain", args.seed, args.image_size)
    if len(base) < args.batch_size:
        raise UserError(f"the dataset has {len(base)} images, fewer than --batch-size {args.batch_size}; "
                        "lower the batch size or add images")
    if supervised or args.supcon:  # labels are learnt from: one class would train at loss 0 and learn nothing
        check_classes(args.dataset, args.data_dir, getattr(base, "classes", None), "supervised.py" if supervised else "--supcon")
    sampler = PretrainSampler(len(base), args.batch_size, args.seed, *rank_and_world())
    if args.augment == "batched":
        return BatchedViews(*in_memory(base, device), sampler, args.image_size, args.seed, supervised), sampler
    views = PretrainViews(base, args.image_size, NATIVE_SIZE[args.dataset], args.seed, supervised)
    # The loader gets its own generator: creating an iterator then draws from it, not from the global
    # RNG that the attack uses, so a resumed run's attacks start from the same random numbers.
    loader = DataLoader(views, batch_sampler=sampler, num_workers=args.workers, generator=torch.Generator(),
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                        worker_init_fn=_worker_init, prefetch_factor=4 if args.workers > 0 else None)
    return _tracked(loader), sampler


def check_classes(name, data_dir, classes, user):
    """A dataset whose labels are used (`user`: supervised.py, --supcon, evaluation) needs at least two
    classes, or training reaches loss 0 and accuracy 100% having learnt nothing. Only an ImageFolder
    can have fewer (the others have 10 or 100): its one class folder is refused."""
    if name == "imagefolder" and len(classes) < 2:
        raise UserError(f"{os.path.join(data_dir, 'train')} holds one class ({classes[0]}), but {user} learns from "
                        "labels and needs at least two; add a subfolder of images for every other class")


class LabelledImages(Dataset):
    """(transformed image, label) of a raw dataset, optionally only its first `subset` images and with
    `labels` (one per image) in place of the dataset's own."""

    def __init__(self, base, transform, subset=None, labels=None):
        self.base, self.transform, self.subset, self.labels = base, transform, subset, labels

    def __len__(self):
        return min(len(self.base), self.subset) if self.subset else len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        label = label if self.labels is None else self.labels[i]  # pseudo labels replace the true ones
        return self.transform(image.convert("RGB") if image.mode != "RGB" else image), int(label)


def eval_loader(dataset, data_dir, split, size, batch_size, workers, device, seed=0, subset=None, labels=None,
                train=None):
    """Labelled loader for evaluation: (x, y). `subset` keeps the first N images (quick runs); `labels`
    replaces the dataset's labels; `train` (default: split == 'train') augments and shuffles."""
    train = split == "train" if train is None else train
    images = LabelledImages(load_dataset(dataset, data_dir, split, seed, size),
                            eval_transform(size, NATIVE_SIZE[dataset], train), subset, labels)
    g = torch.Generator().manual_seed(seed)
    return _tracked(DataLoader(images, batch_size=batch_size, shuffle=train, generator=g, drop_last=False,
                               num_workers=workers, pin_memory=device.type == "cuda",
                               persistent_workers=workers > 0, worker_init_fn=_worker_init))


# =============================================================================================
# Optimisation
# =============================================================================================

class LARS(torch.optim.Optimizer):
    """LARS as in ACL: local_lr = eta ||w|| / (||g|| + wd ||w||) (1 when either norm < 1e-15),
    buf = m buf + lr local_lr (g + wd w), w -= buf, for every parameter tensor. Each operation is one
    torch._foreach_* call (or one op on the stacked norms) over all tensors of a group, in place of a
    Python loop over the tensors; no host sync. On the CPU every value comes from the same float
    operations in the same order as that loop (bit for bit, tested); torch._foreach_norm on CUDA
    sums in another order, so there the two agree to float rounding."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, m, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
            trust = eta * w_norm / (g_norm + wd * w_norm)
            local_lr = torch.where((w_norm < 1e-15) | (g_norm < 1e-15), torch.ones_like(trust), trust)
            update = torch._foreach_mul(params, wd)  # wd w, then g + wd w: two roundings, as written
            torch._foreach_add_(update, grads)
            torch._foreach_mul_(update, (lr * local_lr).unbind())
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, update)
            torch._foreach_sub_(params, bufs)


def make_optimizer(name, params, lr, weight_decay):
    if name == "lars":
        return LARS(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def lr_at(step, base_lr, warmup_steps, total_steps, final_lr=1e-6):
    """Linear warm-up to base_lr over warmup_steps, then cosine decay per iteration to final_lr."""
    # step is 0-based; like the released code's scheduler (stepped before each update), step s uses
    # the schedule's value at s + 1, so the last step runs at exactly final_lr.
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step + 1 - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def dynacl_schedule(epoch, epochs, dynacl, k=50, lambda_dyn=2 / 3):
    """DynACL (Luo et al., ICLR 2023), as used in the AIR code: for epoch e = 1..E the augmentation
    strength s_e = 1 - floor((e - 1) / K) K / E (K = 50: 1.0, 0.95, ...) and the loss weight
    omega = lambda_dyn (1 - s_e), lambda_dyn = 2/3; (1.0, 0.0) without --dynacl."""
    if not dynacl:
        return 1.0, 0.0
    strength = 1 - math.floor((epoch - 1) / k) * k / epochs
    return strength, lambda_dyn * (1 - strength)


# =============================================================================================
# Run utilities: arguments, device, run folder, logging, checkpoints, signals
# =============================================================================================

class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows every default that is a value ("(default: 512)"); None and off switches show none."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or "%(default)" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"


def add_shared_flags(parser):
    """The flags every training script takes, in one order with one wording, so that a diff of two
    method files shows only what one method changes."""
    parser.formatter_class = DefaultsHelpFormatter
    a = parser.add_argument
    a("--dataset", default="cifar10", choices=DATASETS, help="pre-training data; 'synthetic' is for tests and benchmarks only")
    a("--data-dir", default="./data", help="where datasets are read from (and downloaded to on first use)")
    a("--image-size", type=int, default=None, help="input size in px (default: the dataset's own; imagefolder 32, digits 16)")
    a("--epochs", type=int, default=1000, help="number of pre-training epochs")
    a("--batch-size", type=int, default=512, help="images per step (each gives two views in the contrastive methods)")
    a("--lr", type=float, default=5.0, help="peak learning rate after warm-up (ACL: 5.0 with LARS at batch 512)")
    a("--optimizer", default="lars", choices=["lars", "sgd"], help="LARS as in ACL, or SGD with momentum 0.9")
    a("--weight-decay", type=float, default=1e-6, help="weight decay")
    a("--warmup-epochs", type=int, default=10, help="epochs of linear learning-rate warm-up before the cosine decay")
    a("--temperature", type=float, default=0.5, help="temperature t of the contrastive losses")
    a("--eps", type=float, default=8, help="L-inf radius of the pre-training attack, in /255 units")
    a("--pgd-steps", type=int, default=5, help="steps of the pre-training PGD attack")
    a("--pgd-alpha", type=float, default=2, help="step size of the pre-training PGD attack, in /255 units")
    a("--dynacl", action="store_true", help="DynACL: augmentation strength lowered every 50 epochs and, in acl.py and air.py, the "
      "clean/adversarial loss weights moved with it (A-InfoNCE has one loss: strength only)")
    a("--supcon", action="store_true", help="supervised contrastive (SupCon): images of one class are each other's positives, "
      "applies to acl.py and air.py: both NT-Xent terms and the attack; needs a labelled dataset")
    a("--width", type=int, default=64, help="ResNet-18 base width (64 is the standard network; 8 for CPU tests)")
    a("--seed", type=int, default=0, help="random seed (data order, augmentation, attack starts, init)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train; auto picks CUDA when available")
    a("--augment", default=None, choices=["batched", "pil"], help="make the views on the training device, whole batches at "
      "once (batched; datasets held in memory), or per image with PIL in loader workers (pil); default: batched on "
      "CUDA, pil on the CPU and for imagefolder")
    a("--workers", type=int, default=default_workers(), help="data-loader worker processes (0 = load in the main process); min(8, CPU cores) unless given")
    a("--out-dir", default="runs", help="folder that receives the run folder <method>_<dataset>_<seed>_<time>/")
    a("--resume", default=None, help="checkpoint.pt of an earlier run of this method, or its run folder, to continue (in that folder)")
    a("--max-steps", type=int, default=None, help="stop after this global step (tests, benchmarks); resume can raise it")
    a("--log-every", type=int, default=50, help="steps between progress lines and metrics.jsonl records")
    a("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at epoch ends, stops and signals)")
    a("--no-amp", action="store_true", help="CUDA: train in fp32 instead of bf16 autocast (the CPU always uses fp32)")
    a("--compile", action="store_true", help="torch.compile the network (experimental: tried on the CPU only so far)")
    a("--benchmark", action="store_true", help="with --max-steps: also time the data loader alone and print a summary")


# Arguments that may change when a run is resumed; every other one belongs to the run. (--out-dir only names
# the folder the run is in: a resumed run continues in its own folder, see parse_and_resume.)
RESUMABLE = {"resume", "max_steps", "log_every", "save_every", "workers", "device", "no_amp", "compile",
             "benchmark", "out_dir", "data_dir"}
# Of those, the run's length, cadence and data folder are the checkpoint's unless given again: a resumed
# run ends where the interrupted one would have, logs and saves at the same steps, and reads its data
# where it did (not from --data-dir's default).
KEPT_ON_RESUME = {"max_steps", "log_every", "save_every", "data_dir"}
# What a run from before a flag existed ran with, where that is not the flag's default (None for --augment:
# resolved when a run starts, and a checkpoint from before the flag resumes with PIL, pretrain_loader).
BEFORE_THE_FLAG = {"augment": "pil"}


def given_flags(parser, argv):
    """The destinations of the flags that were written on the command line (not defaulted)."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions})
    parser.parse_args(argv, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not unset}


def check_finite(args):
    """Every number given as a float flag (or a list of them) must be finite: NaN passes every range check
    written as `x < 0` and inf every lower bound, and either would fail hours later or train on nothing.
    Called right after parsing, in every script, before the range checks."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number (got {v})")


def check_ranges(args, at_least_1=(), non_negative=(), positive=()):
    """One sentence for the first of the named flags out of its range; a flag left at None is not checked."""
    rules = ((at_least_1, lambda v: v >= 1, "must be at least 1"), (non_negative, lambda v: v >= 0, "must be >= 0"),
             (positive, lambda v: v > 0, "must be positive"))
    for names, in_range, rule in rules:
        for name in names:
            value = getattr(args, name)
            if value is not None and not in_range(value):
                raise UserError(f"--{name.replace('_', '-')} {rule} (got {value})")


def check_fit_flags(args):
    """The SGD fits of eval_linear.py and representations.py: momentum in [0, 1), lr milestones increasing epoch
    numbers >= 1, an image size of at least 8 px (milestones and image size left at None are not checked)."""
    if not 0 <= args.momentum < 1:
        raise UserError(f"--momentum must be in [0, 1) (got {args.momentum})")
    if args.milestones is not None and (min(args.milestones) < 1 or sorted(set(args.milestones)) != args.milestones):
        raise UserError(f"--milestones must be increasing epoch numbers >= 1 (got {' '.join(map(str, args.milestones))})")
    if args.image_size is not None and args.image_size < 8:
        raise UserError(f"--image-size must be at least 8 (got {args.image_size})")


def check_attack_flags(eps, alpha, steps, steps_flag="--pgd-steps"):
    """The attack's radius and step, in /255 units: eps in [0, 255] (255 is the whole pixel range), alpha >= 0,
    and alpha > 0 when the attack takes steps (alpha 0 would leave it at its random start and call that PGD)."""
    if not 0 <= eps <= 255:
        raise UserError(f"--eps must be in [0, 255] (got {eps:g}); it is in /255 units, e.g. --eps 8")
    if alpha < 0:
        raise UserError(f"--pgd-alpha must be >= 0 (got {alpha:g})")
    if alpha == 0 and eps > 0 and steps > 0:
        raise UserError(f"--pgd-alpha 0 would leave the PGD attack (eps {eps:g}/255, {steps} steps) at its random "
                        f"start; give a positive step in /255 units, e.g. --pgd-alpha 2, or {steps_flag} 0 for the "
                        "random start alone")


def check_shared_args(args, method):
    if args.batch_size < 2:
        raise UserError(f"--batch-size must be at least 2 (got {args.batch_size}): contrastive losses need other images as "
                        "negatives, and batch norm needs more than one image")
    if args.pgd_steps < 0:
        raise UserError(f"--pgd-steps must be >= 0 (got {args.pgd_steps})")
    check_attack_flags(args.eps, args.pgd_alpha, args.pgd_steps)
    for name in ("epochs", "width", "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    for name in ("lr", "temperature"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name} must be positive (got {getattr(args, name)})")
    for name in ("weight_decay", "warmup_epochs", "workers", "save_every"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be at least 1 (got {args.max_steps})")
    if args.supcon and method not in ("acl", "air"):  # SupCon replaces NT-Xent: a_infonce.py and supervised.py have none
        raise UserError(f"--supcon applies to acl.py and air.py (their NT-Xent terms and attack), not to {method}.py; "
                        "drop --supcon")
    if args.supcon and args.dataset == "stl10":
        raise UserError("--supcon needs labels, but --dataset stl10 pre-trains on STL-10's unlabelled images; "
                        "use a labelled dataset (cifar10, cifar100, imagefolder, digits) or drop --supcon")
    if args.image_size is None:
        args.image_size = NATIVE_SIZE[args.dataset] or DEFAULT_IMAGE_SIZE[args.dataset]
    if args.image_size < 8:
        raise UserError(f"--image-size must be at least 8 (got {args.image_size})")


def _shown(value):
    """A flag's value as it is written on a command line: 8.0 and 8 both as 8."""
    return f"{value:g}" if isinstance(value, float) else value


def parse_and_resume(parser, argv, method):
    """Parse the command line; with --resume, load the checkpoint, check it (check_resumable) and take the run's
    arguments from it. A flag written on the command line that contradicts the checkpoint is refused, and so is
    an --out-dir other than the folder the run is in (a resumed run continues in its own folder)."""
    args = parser.parse_args(argv)
    check_finite(args)
    checkpoint, given = None, given_flags(parser, argv)
    if args.resume:
        args.resume = checkpoint_file(args.resume)
        checkpoint = load_checkpoint(args.resume)
        check_resumable(checkpoint, args.resume, method)
        saved = checkpoint["args"]
        for name in sorted(given - RESUMABLE):
            # a flag newer than the run: it ran with its default, or with what BEFORE_THE_FLAG says
            trained = saved.get(name, BEFORE_THE_FLAG.get(name, parser.get_default(name)))
            if trained != getattr(args, name):
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{args.resume} was trained with {flag} {_shown(trained)}, but {flag} "
                                f"{_shown(getattr(args, name))} was given; drop the flag to resume, or start a new run")
        run_dir = os.path.dirname(os.path.abspath(args.resume))
        if "out_dir" in given and not _same_file(os.path.dirname(run_dir), args.out_dir):
            raise UserError(f"--out-dir {args.out_dir} cannot move a resumed run: it continues in its own folder "
                            f"{run_dir}; drop --out-dir (or copy the run folder into {args.out_dir} and resume the copy)")
        for name, value in saved.items():
            if hasattr(args, name) and (name not in RESUMABLE or (name in KEPT_ON_RESUME and name not in given)):
                setattr(args, name, value)
    if "data_dir" in given:
        check_data_dir_is_read(args.dataset)
    check_shared_args(args, method)
    return args, checkpoint


# The training script of each method a checkpoint can record. eval_linear.py writes files whose
# method has a '+': '<method>++' (--post-process) and '<method>+<mode>' (a fine-tuned model).
SCRIPTS = {"acl": "acl.py", "air": "air.py", "a_infonce": "a_infonce.py", "supervised": "supervised.py"}


def check_resumable(checkpoint, path, method):
    """A training script continues only a checkpoint of its own runs, with every entry a resume reads
    (check_entries); any other file is refused with one sentence saying what it is and what to do with it."""
    recorded = checkpoint.get("method") if isinstance(checkpoint, dict) else None
    if recorded == method:
        return check_entries(checkpoint, path)
    if recorded in SCRIPTS:
        raise UserError(f"{path} is a checkpoint of {recorded!r} ({SCRIPTS[recorded]}), not of {method!r}; resume it "
                        f"with {SCRIPTS[recorded]}, or start a new run")
    written = isinstance(checkpoint, dict) and ("fine_tune" in checkpoint or "post_process" in checkpoint)
    if written or (isinstance(recorded, str) and "+" in recorded):  # also one made from a released file (method None)
        post_processed = "post_process" in checkpoint if written else recorded.endswith("++")
        what = ("an encoder post-processed by eval_linear.py --post-process" if post_processed
                else "a model fine-tuned by eval_linear.py")
        raise UserError(f"{path} is {what} (method {recorded!r}), not a training run's checkpoint: it cannot be "
                        "resumed, only evaluated with eval_linear.py")
    recorded = "records no method" if recorded is None else f"records the method {recorded!r}"
    raise UserError(f"{path} is not a checkpoint of this project's training scripts (it {recorded}; a released "
                    "checkpoint, for example): it cannot be resumed, only evaluated with eval_linear.py")


# What a resume reads from a training checkpoint (make_checkpoint), and what each entry must be. The weights and
# the optimiser's state are checked against the network in Run (check_weights, check_optimizer_state).
RESUMED_ENTRIES = {
    "args": (lambda v: isinstance(v, dict), "a dict of the run's arguments"),
    "model": (lambda v: isinstance(v, dict), "a state dict of the network"),
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list), "a state dict of the optimiser"),
    "rng": (lambda v: isinstance(v, dict) and isinstance(v.get("cpu"), torch.Tensor) and v["cpu"].dtype == torch.uint8
            and v["cpu"].shape == torch.get_rng_state().shape, "the random generator's state"),
    "step": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number of steps >= 0"),
    "log": (lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("count"), int)
                                    and (v.get("sum") is None or isinstance(v["sum"], torch.Tensor))),
            "the open log window's sums"),
}


def check_entries(checkpoint, path):
    """Every entry a resume reads is there and of its kind (RESUMED_ENTRIES; 'log' may be absent, as in checkpoints
    from before it); else one sentence naming the entry, before anything is written."""
    for key, (fits, what) in RESUMED_ENTRIES.items():
        if key not in checkpoint and key != "log":
            raise UserError(f"{path} is damaged: it has no {key!r} ({what}), so it cannot be resumed; resume an intact "
                            "copy of the checkpoint, or start a new run")
        if not fits(checkpoint.get(key)):
            got = f" (got {checkpoint[key]!r})" if key == "step" else ""
            raise UserError(f"{path} is damaged: its {key!r} is not {what}{got}, so it cannot be resumed; resume an "
                            "intact copy of the checkpoint, or start a new run")


def checkpoint_file(path):
    """The checkpoint a path names: a run folder stands for its checkpoint.pt (--resume, eval_linear.py)."""
    if not os.path.isdir(path):
        return path
    if not os.path.isfile(os.path.join(path, "checkpoint.pt")):
        raise UserError(f"{path} is a folder without a checkpoint.pt; give a run folder that has one, or the "
                        "checkpoint file itself")
    return os.path.join(path, "checkpoint.pt")


def pick_device(name):
    """The device; on the GPU the cuDNN settings, on the CPU as many threads as there are idle cores."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu or auto")
    device = torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # TF32 convolutions (with --no-amp; autocast runs them in bf16). Matrix products stay fp32 (PyTorch's default):
        # the losses' and the views' resampling are fp32 under autocast too; TF32 would move pixels by up to 0.35 level.
        torch.backends.cudnn.allow_tf32 = True
    else:
        use_idle_cores()
    return device


# PyTorch runs its CPU kernels on one OpenMP thread per core, and OpenMP threads that wait for each
# other spin: beside another CPU-heavy process each thread waits for a partner that is not scheduled,
# and a run slows down by far more than its lost share of the CPU (README, Speed: 3x to 100x). So the
# scripts use as many threads as there are idle cores when they start.
TORCH_THREADS = torch.get_num_threads()  # PyTorch's own choice (one per physical core), before any change


def read_proc_stat():
    """{CPU index: (idle ticks, all ticks)} since boot, from Linux's /proc/stat (idle includes iowait)."""
    ticks = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
                ticks[int(name[3:])] = (idle + iowait, user + nice + system + idle + iowait + irq + softirq + steal)
    return ticks


def idle_threads(environ=None, read_stat=None, allowed=None, default=None, interval=0.2):
    """(threads, idle cores): the CPU threads to use now, or (None, None) to leave PyTorch's choice.
    OMP_NUM_THREADS, set by the user or by torchrun, is respected (None). Otherwise two readings of
    /proc/stat `interval` seconds apart give each core's idle share, summed over the cores this process
    may run on (os.sched_getaffinity); threads = max(1, round(idle cores)), at most PyTorch's default.
    Where either cannot be read (not Linux), (None, None)."""
    environ = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in environ:
        return None, None
    read_stat, default = read_stat or read_proc_stat, default or TORCH_THREADS
    try:
        allowed = os.sched_getaffinity(0) if allowed is None else allowed
        before = read_stat()
        time.sleep(interval)
        after = read_stat()
    except (AttributeError, OSError, ValueError):
        return None, None
    idle = 0.0
    for cpu in allowed:
        if cpu in before and cpu in after:
            ticks = after[cpu][1] - before[cpu][1]
            idle += (after[cpu][0] - before[cpu][0]) / ticks if ticks > 0 else 1.0  # no tick counted: idle
    return min(default, max(1, round(idle))), idle


def use_idle_cores():
    """torch.set_num_threads(idle_threads()), saying so in one line when it is fewer than the default."""
    threads, idle = idle_threads()
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    if threads is not None and threads < TORCH_THREADS:
        print(f"CPU: {threads} thread{'s' * (threads > 1)}, not {TORCH_THREADS}: {idle:.1f} of "
              f"{len(os.sched_getaffinity(0))} cores are idle (other processes use the rest); "
              "set OMP_NUM_THREADS to choose", flush=True)


def run_dir_for(args, method, checkpoint_path=None):
    """A resumed run keeps writing into its own folder; a new one gets <method>_<dataset>_<seed>_<time>/."""
    if checkpoint_path:
        return os.path.dirname(os.path.abspath(checkpoint_path))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out_dir, f"{method}_{args.dataset}_{args.seed}_{stamp}")
    suffix = 1
    while os.path.exists(path):
        suffix += 1
        path = os.path.join(args.out_dir, f"{method}_{args.dataset}_{args.seed}_{stamp}-{suffix}")
    try:
        os.makedirs(path)
    except OSError as e:
        raise UserError(f"cannot create the run folder {path} ({e.strerror}); choose another --out-dir") from None
    return path


# The files of a training run's folder (Run) and those --post-process writes next to its checkpoint: a
# report (eval_linear.py, representations.py) never takes one of these names.
RUN_FILES = ("checkpoint.pt", "args.json", "metrics.jsonl", "benchmark.json", "postprocessed.pt", "postprocessed.json")


def _same_file(a, b):
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))  # also a hard link


def check_outputs(paths, inputs, flag="--out", report=True, remedy=None):
    """Refuse, before any work and in one sentence, outputs that would lose a file. `paths`: what a command
    will write (with report=True the first is the JSON report given to `flag`, which must end in .json,
    then the files written beside it: fine-tuned models, figures); `inputs`: the files the run reads.
    No path may be an input, or a folder, or (report=True) take a name of RUN_FILES, and each one's
    folder must be writable or possible to make (the report's folder is made when the results are
    written, as the training scripts make --out-dir). Used by eval_linear.py and representations.py."""
    what = f"{flag} {paths[0]}" if report else flag
    remedy = remedy or f"choose another {flag}"
    if report and not paths[0].endswith(".json"):
        raise UserError(f"{what} is not a .json file name; {flag} names the JSON report (the fine-tuned models and "
                        "figures are written beside it), e.g. eval.json")
    for path in paths:
        beside = not (report and path == paths[0])
        if report and os.path.basename(path) in RUN_FILES:
            raise UserError(f"{what} {f'would write {path}, which has' if beside else 'has'} the name of a training "
                            f"run's file ({', '.join(RUN_FILES)}); {remedy}")
        if any(_same_file(path, other) for other in inputs):
            raise UserError(f"{what} {f'would overwrite {path}, which' if beside else 'is a file that'} this run reads; "
                            f"{remedy}")
        missing = _first_missing_folder(os.path.dirname(os.path.abspath(path)))
        folder = os.path.dirname(missing) if missing else os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            why = ("it is a folder" if os.path.isdir(path) else
                   f"{folder} is not a folder" if not os.path.isdir(folder) else f"{folder} is not writable")
            raise UserError(f"cannot write {path}: {why}; {remedy}")


def earlier_output(path):
    """Which script wrote the file at `path`, from which input, where it was written then, and its record:
    ('eval_linear.py', checkpoint, a kept model's path, record) for its report (a JSON with 'checkpoint' and
    'mode') or a model it kept (a .pt whose 'fine_tune' record has them), ('representations.py', first model, its
    --out, report) for its report (a JSON with 'model' and 'cka'); Nones for any other file (another program's,
    or a damaged one)."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                record = json.load(f)
        else:
            record = load_checkpoint(path)
            record = record.get("fine_tune") if isinstance(record, dict) else None
    except (OSError, ValueError, UserError):
        record = None
    if isinstance(record, dict) and isinstance(record.get("checkpoint"), str) and "mode" in record:
        entry = (record.get("results") or [record])[0]  # --mode all: the first mode's entry names its model
        written_at = entry.get("fine_tuned") if isinstance(entry, dict) else None
        return "eval_linear.py", record["checkpoint"], written_at, record
    first = record.get("model") if isinstance(record, dict) else None
    if isinstance(first, dict) and isinstance(first.get("checkpoint"), str) and "cka" in record:
        return "representations.py", first["checkpoint"], record.get("out"), record
    return None, None, None, None


def check_replaced(path, script, source, out):
    """Before any work, for each file `path` that `script` would write for its report `out`: an existing file is
    replaced only when it is `script`'s own output from the same input `source` (an earlier run of the same
    evaluation or analysis): the same path, or the same path relative to the file when the folder was moved or
    copied with its reports. Another checkpoint's report or kept model, the other script's report, or a file this
    project did not write is refused in one sentence naming whose it is. Returns the replaced file's record."""
    if not os.path.exists(path):
        return None
    owner, recorded, written_at, record = earlier_output(path)
    what = ("a model fine-tuned by eval_linear.py from" if owner and not path.endswith(".json") else
            f"{owner}'s report on" if owner else "")
    if owner is None:
        raise UserError(f"--out {out} would replace {path}, which is not a file of {script} (another program's, or a "
                        "damaged one); choose another --out")
    if owner != script:
        raise UserError(f"--out {out} would replace {path}, {what} {recorded}; {script} does not replace {owner}'s "
                        "files: choose another --out")
    moved = isinstance(written_at, str) and os.path.relpath(recorded, os.path.dirname(written_at)) == \
        os.path.relpath(os.path.abspath(source), os.path.dirname(os.path.abspath(path)))
    if not (moved or _same_file(recorded, source)):
        raise UserError(f"--out {out} would replace {path}, {what} {recorded}, not {source}; an --out replaces only "
                        "what an earlier run wrote from the same input: choose another --out")
    return record


@contextlib.contextmanager
def atomic_file(path, mode):
    """Write `path` atomically: a temporary file, flushed to disk, then renamed over `path`. On any
    failure (a full disk, an exception raised by a signal handler) the temporary file is removed."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2)


def to_cpu(obj):
    """`obj` with every tensor in it (in dicts, lists and tuples, at any depth) on the CPU; the containers
    keep their type and attributes (a state dict's _metadata). CPU tensors are kept as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        moved = type(obj)((k, to_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "__dict__"):  # an OrderedDict's attributes; a plain dict has none
            moved.__dict__.update(obj.__dict__)
        return moved
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(path, checkpoint):
    """Every .pt file the project writes goes through here: its tensors on the CPU (to_cpu), so that a
    file written on a GPU loads on any machine without map_location; written atomically (a temporary
    file, flushed to disk, then renamed over the old one)."""
    with atomic_file(path, "wb") as f:
        torch.save(to_cpu(checkpoint), f)


def load_checkpoint(path):
    """torch.load(weights_only=True) on the CPU; unreadable files end with one clear sentence."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; check the path")
    try:
        with warnings.catch_warnings():  # torch warns about a plain pickle's protocol before it refuses the file
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"checkpoint {path} cannot be read: it is truncated, corrupt or not a PyTorch "
                        "checkpoint; use another file") from None


def _listed(keys, most=3):
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def check_weights(state, expected, path, network, remedy, optional=("num_batches_tracked",)):
    """Refuse, in one sentence, weights `state` that do not fit `expected` (the network's state dict, described by
    `network`): a missing key, an unexpected one (`remedy` says what to do), a shape that differs or a value that
    is not a tensor, a NaN or infinite value. A partly loaded network would be evaluated silently, a NaN one trained
    on until its first loss. Keys ending in `optional` may be missing: num_batches_tracked is only a BN counter
    (unused at a fixed momentum) that checkpoints of old PyTorch versions lack. eval_linear.load_encoder and Run."""
    missing = [k for k in expected if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {list(getattr(state[k], 'shape', [type(state[k]).__name__]))} (expected {list(v.shape)})"
                  for k, v in expected.items()
                  if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)]
    if missing:
        raise UserError(f"{path} lacks {len(missing)} weights of {network} ({_listed(missing)}); use a complete "
                        "checkpoint")
    if unexpected:
        raise UserError(f"{path} has {len(unexpected)} keys that {network} does not have ({_listed(unexpected)}); "
                        f"{remedy}")
    if mismatched:
        raise UserError(f"{path} has weights whose shapes do not fit {network}: {_listed(mismatched)}")
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise UserError(f"{path} contains NaN or infinite weights; use an earlier checkpoint")


def check_optimizer_state(state, optimizer, path):
    """A checkpoint's optimiser state fits `optimizer` (as many groups of as many parameters, each buffer the shape
    of its parameter) and is finite; else one sentence, before a resume loads or writes anything."""
    groups, params = optimizer.param_groups, [p for group in optimizer.param_groups for p in group["params"]]
    fits = len(state["param_groups"]) == len(groups) and all(
        isinstance(saved, dict) and len(saved.get("params", ())) == len(group["params"])
        for saved, group in zip(state["param_groups"], groups))
    fits = fits and all(isinstance(i, int) and 0 <= i < len(params) and isinstance(entry, dict)
                        for i, entry in state["state"].items())
    buffers = [(params[i], v) for i, entry in state["state"].items() for v in entry.values()] if fits else []
    fits = fits and all(not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape == p.shape for p, v in buffers)
    if not fits:
        raise UserError(f"{path} is damaged: its optimiser state does not fit the network of its arguments, so it cannot "
                        "be resumed; resume an intact copy of the checkpoint, or start a new run")
    if not all(torch.isfinite(v).all() for _, v in buffers if isinstance(v, torch.Tensor) and v.is_floating_point()):
        raise UserError(f"{path} contains NaN or infinite optimiser state; use an earlier checkpoint")


def rng_state():
    """The CPU generator's state and the current GPU's (the one this process draws from; under torchrun
    every process draws the same numbers, so rank 0's state resumes any number of processes)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restore the random state into the current GPU. A checkpoint saved on the CPU has no CUDA state,
    and older ones hold every GPU's list (restored only with as many GPUs); then the CUDA generator
    keeps its seed: the run continues, not bit for bit."""
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if torch.cuda.is_available() and isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda)
    elif torch.cuda.is_available() and cuda is not None and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def make_checkpoint(method, args, model, optimizer, epoch, step, log=None):
    """A dict of plain types and tensors only, so torch.load(weights_only=True) reads it. `log` holds
    the open log window's sums (RunLog.state) so that a resumed run's first record averages the
    same steps as an uninterrupted run's."""
    return {"method": method, "args": dict(vars(args)), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "rng": rng_state(), "log": log}


class StopSignal:
    """Ctrl-C and SIGTERM set a flag and (where `announce`) say so at once; the loop checkpoints at the
    end of the current step and exits. `agreed()` is the same on every torchrun process. `restore()` puts
    back the handlers that were there before, so that a run started in-process (a test, a notebook) leaves
    SIGTERM and Ctrl-C stopping the process after it ends."""

    def __init__(self, announce=True):
        self.received, self.announce = None, announce
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: not set from Python

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if self.announce:
            try:
                print(f"received {self.received}: stopping after this step and saving a checkpoint", flush=True)
            except RuntimeError:  # it came while this process was printing (reentrant call): the flag is set
                pass

    def agreed(self):
        """The signal that any process received (the highest number), or None. Under torchrun this is one
        all-reduce of a CPU integer per step over a gloo group: a few microseconds that never wait for
        the GPU (no host-device sync), so Ctrl-C is answered after this step on every process.
        Agreeing only on log steps would answer up to --log-every steps late, past torchrun's 30 s
        grace before it kills the workers of a slow run."""
        if rank_and_world()[1] == 1:
            return self.received
        code = torch.tensor([signal.Signals[self.received].value if self.received else 0])
        dist.all_reduce(code, dist.ReduceOp.MAX, group=cpu_group())
        return signal.Signals(int(code)).name if int(code) else None


class NonFiniteWatch:
    """Remembers the first step whose loss terms were not finite, on the device, without a
    host-device sync per step; `check()` (on log and checkpoint steps) syncs once and stops the run."""

    def __init__(self, device):
        self.step = torch.tensor(-1, device=device)
        self.terms = None

    def update(self, step, terms):
        self.last_step = step
        first = (self.step < 0) & ~torch.isfinite(terms).all()
        self.step = torch.where(first, step, self.step)
        self.terms = terms.detach() if self.terms is None else torch.where(first, terms.detach(), self.terms)

    def check(self, names, checkpoint_path, model):
        """Stop if a loss was non-finite, or if the weights are (a finite loss with infinite gradients).
        Under torchrun the processes agree first (check steps sync anyway), so all stop at this step."""
        weights_finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        step, own_step, weights_bad = int(self.step), int(self.step), not bool(weights_finite)
        if rank_and_world()[1] > 1:
            never = 2**62
            flags = torch.tensor([step if step >= 0 else never, -int(weights_bad)])
            dist.all_reduce(flags, dist.ReduceOp.MIN, group=cpu_group())
            step, weights_bad = (int(flags[0]) if int(flags[0]) < never else -1), int(flags[1]) < 0
        if step < 0 and weights_bad:
            fail(f"the network's weights became non-finite by step {self.last_step} although the loss stayed finite; "
                 f"training stopped and the last good checkpoint is {checkpoint_path}; lower --lr", status=1, everywhere=True)
        if step >= 0:
            values = ", ".join(f"{n} {v:.4g}" for n, v in zip(names, self.terms.tolist())) if own_step == step else "on another process"
            kept = f"the last good checkpoint is {checkpoint_path}" if os.path.exists(checkpoint_path) else "no checkpoint was written yet"
            fail(f"the loss became non-finite at step {step} ({values}); training stopped and {kept}; "
                 "lower --lr or check the data", status=1, everywhere=True)


class RunLog:
    """Progress lines on stdout and one JSON object per log line in metrics.jsonl. A window closes at
    each multiple of --log-every; a record at a stop between two multiples (--max-steps) leaves it
    open. `state()` is the open window's sums, carried by the checkpoint (`state` here), so that a
    resumed run's first record averages the same steps as an uninterrupted run's."""

    def __init__(self, run_dir, total_steps, start_step, batch_size, device, log_every=1, state=None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.total_steps, self.batch_size, self.device, self.log_every = total_steps, batch_size, device, log_every
        self.sum, self.count = (None, 0) if state is None else (state["sum"], state["count"])
        if self.sum is not None:
            self.sum = self.sum.to(device)
        self.last_time, self.last_step = time.perf_counter(), start_step

    def state(self):
        return {"sum": self.sum, "count": self.count}

    def accumulate(self, terms):
        self.sum = terms.detach().clone() if self.sum is None else self.sum + terms.detach()
        self.count += 1

    def write(self, step, epoch, epochs, lr, names):
        if self.count == 0:
            return None
        means = (self.sum / self.count).tolist()  # the one host-device sync of a log step
        now = time.perf_counter()
        images_per_s = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
        eta = (self.total_steps - step) * self.batch_size / max(images_per_s, 1e-9)
        record = {"step": step, "epoch": epoch, "lr": lr, **dict(zip(names, means)), "images_per_s": images_per_s}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        losses = " ".join(f"{n} {v:.4f}" for n, v in zip(names, means))
        print(f"epoch {epoch}/{epochs} step {step}/{self.total_steps} | {losses} | lr {lr:.4g} | "
              f"{images_per_s:.0f} img/s | eta {format_seconds(eta)}", flush=True)
        if step % self.log_every == 0:
            self.sum, self.count = None, 0
        self.last_time, self.last_step = now, step
        return record


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class _GlobalOnly(contextlib.nullcontext):
    """In place of FlopCounterMode's module tracker: every operation counts towards the total ('Global')."""
    parents = {"Global"}


class Benchmark:
    """Steady-state throughput of a --max-steps run: timed from the end of a warm-up to the last step,
    with the peak GPU memory and, with --benchmark, the rate of the data loader alone and the FLOPs of
    one training step, so that the run shows whether the device or the data pipeline is the limit."""

    def __init__(self, device, batch_size, warmup_steps):
        self.device, self.batch_size, self.warmup_steps = device, batch_size, warmup_steps
        self.steps_done, self.start, self.start_steps = 0, None, 0
        self.loader_images_per_s = self.loader_images_per_s_per_worker = None
        self.flop_counter = self.flops_per_image = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def time_loader(self, loader, sampler, batches, world=1):
        """This process's loader alone over `batches` batches; its rate times the processes (they load side by side),
        comparable with the training images/s, and per loader worker (None without: --workers 0, --augment batched)."""
        sampler.set_epoch(1)
        start, images = time.perf_counter(), 0
        for n, batch in enumerate(loader, 1):
            images += len(batch[0])
            if n >= batches:
                break
        synchronize(self.device)  # --augment batched makes the batches on the device, asynchronously
        rate = images / (time.perf_counter() - start)
        workers = getattr(loader, "num_workers", 0) or None  # None: --workers 0, or BatchedViews (views on the device)
        self.loader_images_per_s, self.loader_images_per_s_per_worker = rate * world, workers and rate / workers

    def count_flops(self, images):
        """Count the floating-point operations of everything until the next step() with PyTorch's
        FlopCounterMode (matrix products and convolutions, forward and backward: the attack's
        forwards and input gradients, the training forwards, the backward), per image of the
        `images` this process trains on in a step. The counted step is a warm-up step: untimed."""
        from torch.utils.flop_counter import FlopCounterMode
        self.flop_counter, self.flop_images = FlopCounterMode(display=False), images
        # Totals only: the counter's per-module attribution registers backward hooks that fail under the
        # attack's torch.autograd.grad on a leaf input (pytorch/pytorch#131753); the totals are the same.
        self.flop_counter.mod_tracker = _GlobalOnly()
        self.flop_counter.__enter__()

    def step(self):
        self.steps_done += 1
        if self.flop_counter:
            self.flop_counter.__exit__(None, None, None)
            self.flops_per_image = self.flop_counter.get_total_flops() / self.flop_images
            self.flop_counter = None
        if self.steps_done == self.warmup_steps:
            synchronize(self.device)
            self.start, self.start_steps = time.perf_counter(), self.steps_done

    def summary(self, run_dir, method):
        synchronize(self.device)
        timed = self.steps_done - self.start_steps
        if self.start is None or timed < 1:
            return None
        images_per_s = timed * self.batch_size / (time.perf_counter() - self.start)
        flops = self.flops_per_image
        result = {"method": method, "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
                  "timed_steps": timed, "batch_size": self.batch_size, "images_per_s": images_per_s,
                  "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None,
                  "loader_images_per_s": self.loader_images_per_s,
                  "loader_images_per_s_per_worker": self.loader_images_per_s_per_worker,
                  "flops_per_image": flops, "tflops_per_s": flops * images_per_s / 1e12 if flops else None}
        write_json(os.path.join(run_dir, "benchmark.json"), result)
        compute = f", {flops / 1e9:.3g} GFLOP per image, {result['tflops_per_s']:.3g} TFLOP/s" if flops else ""
        memory = f", peak GPU memory {result['peak_gpu_memory_gib']:.2f} GiB" if result["peak_gpu_memory_gib"] else ""
        loader = f", data loader alone {self.loader_images_per_s:.0f} img/s" if self.loader_images_per_s else ""
        per_worker = self.loader_images_per_s_per_worker
        loader += f" ({per_worker:.0f} per worker)" if per_worker else ""
        print(f"benchmark: {images_per_s:.1f} img/s over {timed} steps after {self.start_steps} warm-up steps on "
              f"{result['device']}{compute}{memory}{loader}", flush=True)
        return result


def main_guard(main):
    """Run main(); a UserError becomes one sentence on stderr and its exit status (no traceback)."""
    try:
        main()
    except UserError as e:
        fail(str(e), e.status)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# =============================================================================================
# Several processes (torchrun): process group, each process's slice, gradient-summing gather
# =============================================================================================
# `torchrun --nproc_per_node N acl.py ...` computes the one-process run at the same global
# --batch-size: every process takes its slice of the same batch (PretrainSampler) with the same
# per-image augmentation, the losses and the attack see the global batch (gather), and DDP averages
# the gradients. `python acl.py ...` (no WORLD_SIZE in the environment) starts no process group.

_CPU_GROUP = None  # a gloo group for small CPU collectives; None = the default group (gloo already)
# PyTorch 2.14 deprecates DDP's broadcast_buffers and torch.distributed.nn.functional.all_gather; both
# work as documented, and their replacements are private or missing in the older versions we support.
warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)


def rank_and_world():
    """(this process's rank, number of processes); (0, 1) without torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cpu_group():
    return _CPU_GROUP


def barrier():
    """Wait for every torchrun process (over gloo: no GPU sync); nothing without torchrun."""
    if rank_and_world()[1] > 1:
        dist.barrier(group=cpu_group())


def init_distributed(args):
    """This process's device. Started by torchrun (WORLD_SIZE set): also join its process group, NCCL
    with the GPU LOCAL_RANK on CUDA, gloo on the CPU, after checking that the global --batch-size
    divides by the number of processes and that this node has a GPU for each of its processes."""
    global _CPU_GROUP
    if "WORLD_SIZE" not in os.environ:
        return pick_device(args.device)
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and must divide by the {world} processes; "
                        f"use a multiple of {world}")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and torch.cuda.device_count() < local_world:
        raise UserError(f"{local_world} processes on this node need one GPU each, but PyTorch sees "
                        f"{torch.cuda.device_count()}; start fewer processes (--nproc-per-node) or use --device cpu")
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    pick_device(device.type)  # the cuDNN and TF32 settings
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if cuda else "gloo")
        except Exception as e:  # a missing or unreachable rendezvous: say so in one sentence
            raise UserError(f"could not start the process group of {world} processes ({str(e).splitlines()[0]}); "
                            "start the script with torchrun and check its --rdzv-endpoint (or MASTER_ADDR and "
                            "MASTER_PORT)") from None
    _CPU_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return device


def gather(*tensors):
    """Each tensor's global batch: every process's slice, in rank order (without torchrun, the tensors
    as they are). Every process then computes the same global loss. The backward of
    torch.distributed.nn.functional.all_gather sums, over the N processes, the gradient of each
    slice: N times the one-process gradient, which DDP's averaging of the parameter gradients
    divides by N again, so the step is the one-process step. (A gather that keeps only the local
    slice's gradient would drop the other processes' share of it.)"""
    if rank_and_world()[1] == 1:
        return tensors
    return torch.cat(dist_nn.all_gather(torch.stack(tensors)), dim=1).unbind(0)


def parallel(model, compile, device, find_unused=False):
    """(net, train_net): `net` is the model (torch.compile'd with --compile; its state dict stays the
    plain model's) for the attack, `train_net` for the training forwards. Under torchrun train_net is
    DistributedDataParallel over net, and on CUDA every batch norm, clean and adversarial copy, is a
    SyncBatchNorm, so batch statistics are the global batch's (PyTorch has none on the CPU: there
    each process normalises its slice). broadcast_buffers=False: DDP would otherwise copy rank 0's
    buffers into every process before each of the two (AIR: three) forwards that precede one
    backward, in place between forwards that share a backward; with SyncBatchNorm the running
    statistics are the global batch's on every process anyway (on the CPU, rank 0's are saved).
    find_unused: some parameters get no gradient (supervised.py --eps 0 leaves the adversarial BN
    copies unused), so DDP must not wait for them."""
    world = rank_and_world()[1]
    if world > 1 and device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps the BN children in place, same parameters
    net = torch.compile(model, dynamic=False) if compile else model
    if world == 1:
        return net, net
    device_ids = [device.index] if device.type == "cuda" else None
    return net, nn.parallel.DistributedDataParallel(net, device_ids=device_ids, broadcast_buffers=False,
                                                    find_unused_parameters=find_unused)


# =============================================================================================
# Run bookkeeping: one object per training run, one call per step
# =============================================================================================

def check_writable(run_dir):
    """A resumed run writes into its folder: one that cannot be written (a read-only file system, a folder without
    write permission) is refused in one sentence before anything else is done."""
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"cannot resume in {run_dir}: the run folder is not writable (a read-only file system, or "
                        "no permission); make it writable, or copy the run folder somewhere writable and resume the copy")


def metrics_to_keep(path, step, log_every):
    """On resume, the records of metrics.jsonl to keep (None without the file): those up to the
    checkpoint's step, less one there that closed a partial window (a --max-steps stop). The resumed
    run writes those again, so metrics.jsonl reads as if the run was never interrupted (also after a
    crash past the last checkpoint). A last line cut by a crash (no newline) is dropped; any other line
    that is not a record is refused in one sentence naming it, before the resumed run writes anything."""
    if not os.path.exists(path):
        return None
    records = []
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    break  # the last line, cut by a crash
                try:
                    record = json.loads(line)
                except ValueError:  # not UTF-8 or not JSON
                    record = None
                if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                    raise UserError(f"{path} line {number} is not a metrics record (one JSON object with its 'step' "
                                    "per line); repair or delete that line and resume again (nothing was changed)")
                records.append(record)
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); make it readable and resume again") from None
    return [r for r in records if r["step"] < step or (r["step"] == step and step % log_every == 0)]


def write_metrics(path, records):
    with atomic_file(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


class Run:
    """Everything a training loop does besides training, made once, then `end_of_step()` once per step:
    resume (weights, optimiser, step, random state, open log window; a checkpoint already at or past
    the run's stop changes nothing), the run folder and args.json, progress lines and metrics.jsonl,
    the non-finite watch, checkpoints (every epoch end, every --save-every steps, the last step,
    Ctrl-C/SIGTERM) and the benchmark. Under torchrun rank 0 alone names the folder, prints and
    writes, and every process stops at the same step."""

    def __init__(self, method, args, checkpoint, model, optimizer, loader, device, amp):
        self.method, self.args, self.model, self.optimizer = method, args, model, optimizer
        self.nothing_to_do = False
        self.rank, world = rank_and_world()
        self.steps_per_epoch = loader.batch_sampler.batches_per_epoch
        total_steps = args.epochs * self.steps_per_epoch
        self.stop_step = min(total_steps, args.max_steps or total_steps)
        self.step, log_state = 0, None
        self.dir = self._on_rank0(world, lambda: run_dir_for(args, method, args.resume))  # the same on every process
        self.checkpoint_path = os.path.join(self.dir, "checkpoint.pt")
        metrics_path, kept = os.path.join(self.dir, "metrics.jsonl"), None
        self.log = self.bench = None
        if checkpoint:  # every check comes before the first write: a refused resume leaves the run folder as it is
            network = f"the {method}.py network of width {args.width} with the {model.stem} stem that its arguments " \
                      "describe"
            check_weights(checkpoint["model"], model.state_dict(), args.resume, network, "resume an intact copy of the "
                          "checkpoint, or start a new run", optional=())
            check_optimizer_state(checkpoint["optimizer"], optimizer, args.resume)
            self.step, log_state = checkpoint["step"], checkpoint.get("log")
            self.nothing_to_do = self._check_resume_point(total_steps)
            if self.nothing_to_do:  # nothing is loaded or written: the run folder stays as it is
                return
            self._on_rank0(world, lambda: check_writable(self.dir))
            log_every = checkpoint["args"].get("log_every", args.log_every)
            kept = self._on_rank0(world, lambda: metrics_to_keep(metrics_path, self.step, log_every))
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            set_rng_state(checkpoint["rng"])
        if self.rank == 0:
            write_json(os.path.join(self.dir, "args.json"), vars(args))
            if kept is not None:
                write_metrics(metrics_path, kept)
            if checkpoint:
                print(f"resumed {args.resume} at step {self.step}", flush=True)
            processes = f", {world} processes" if world > 1 else ""
            print(f"{method} on {args.dataset} ({device.type}{', bf16' if amp else ''}{processes}): "
                  f"{self.stop_step - self.step} steps to step {self.stop_step} of {total_steps}, "
                  f"{self.steps_per_epoch} per epoch; writing {self.dir}", flush=True)
            self.log = RunLog(self.dir, self.stop_step, self.step, args.batch_size, device, args.log_every, log_state)
            if args.max_steps:  # images/s count the global batch: the processes step together
                self.bench = Benchmark(device, args.batch_size, min(10, max(1, (self.stop_step - self.step) // 5)))
        self.watch = NonFiniteWatch(device)
        self.stop = StopSignal(announce=self.rank == 0)
        if self.bench and args.benchmark:
            self.bench.time_loader(loader, loader.batch_sampler, min(50, self.steps_per_epoch), world)
            if not args.compile:  # FlopCounterMode counts eager operations: not a compiled graph's
                self.bench.count_flops(args.batch_size // world)

    def _check_resume_point(self, total_steps):
        """A resumed run must have steps left before it stops: a stop below the checkpoint's step is
        refused, and a stop at it (a finished run, or --max-steps equal to its step) is nothing to do,
        said in one line. Either way nothing is changed. Returns True when there is nothing to do."""
        step, stop, args = self.step, self.stop_step, self.args
        if stop == total_steps:
            where, more = f"the end of its --epochs {args.epochs}", "start a new run to train longer"
        else:
            where, more = f"--max-steps {stop}", f"give a --max-steps above {step} to train further"
        if step > stop:
            raise UserError(f"{args.resume} is at step {step}, already past step {stop} ({where}); {more}")
        if step == stop and self.rank == 0:
            print(f"nothing to do: {args.resume} is at step {step}, where this run stops ({where}); {more}", flush=True)
        return step == stop

    def _on_rank0(self, world, compute):
        """compute() on rank 0 alone (it names and makes the run folder, reads metrics.jsonl); the other
        processes learn its result, or its error, so that every process stops together."""
        shared = [None, None]
        if self.rank == 0:
            try:
                shared[0] = compute()
            except UserError as e:
                shared[1] = str(e)
        if world > 1:
            dist.broadcast_object_list(shared, src=0, group=cpu_group())
        if shared[1]:
            raise UserError(shared[1])
        return shared[0]

    def end_of_step(self, step, epoch, lr, loss, terms):
        """After each optimiser step: watch, log, checkpoint, stop signal. True at the run's last step."""
        try:
            return self._end_of_step(step, epoch, lr, loss, terms)
        except BaseException:  # a stop (a signal, a non-finite loss) ends the run: the signal handlers go back
            self.stop.restore()
            raise

    def _end_of_step(self, step, epoch, lr, loss, terms):
        self.step, args = step, self.args
        names, values = ["loss", *terms], torch.stack([loss, *terms.values()]).detach()
        self.watch.update(step, values)
        if self.log:
            self.log.accumulate(values)
        if self.bench:
            self.bench.step()
        last, received = step == self.stop_step, self.stop.agreed()
        log_step = step % args.log_every == 0 or last
        save_step = step % self.steps_per_epoch == 0 or last or received or (args.save_every and step % args.save_every == 0)
        if log_step or save_step:
            self.watch.check(names, self.checkpoint_path, self.model)
        if log_step and self.log:
            self.log.write(step, epoch, args.epochs, lr, names)
        if save_step and self.rank == 0:
            save_checkpoint(self.checkpoint_path, make_checkpoint(self.method, args, self.model, self.optimizer,
                                                                  epoch, step, self.log.state()))
        if received:
            barrier()  # rank 0's checkpoint is complete before any process exits and torchrun stops the rest
            if self.rank == 0:
                print(f"stopped by {received} at step {step}: saved {self.checkpoint_path}; continue with "
                      f"--resume {self.checkpoint_path}", flush=True)
            raise SystemExit(128 + signal.Signals[received].value)
        return last

    def finish(self):
        """The benchmark summary and the closing line; returns the run folder."""
        if self.nothing_to_do:
            return self.dir
        self.stop.restore()
        if self.bench:
            self.bench.summary(self.dir, self.method)
        if self.rank == 0:
            print(f"done: step {self.step}, checkpoint {self.checkpoint_path}", flush=True)
        barrier()
        return self.dir
