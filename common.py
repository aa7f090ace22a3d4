"""What ACL, A-InfoNCE, AIR and supervised training share, in the order one step runs: the network, the
losses and attacks, the data (the readable PIL specification first, the batched device path after it), and
the optimisation. Nothing here runs at import. Each method file (acl.py, a_infonce.py, air.py,
supervised.py) keeps its own loss and training loop in view; the run machinery around them (flags,
checkpoints, logging, torchrun set-up) is machinery.py. Each function's docstring states what it computes
(with the equation where there is one); README.md explains the methods and protocols.
"""
import contextlib
import hashlib
import math
import os
import pickle
import shutil
import signal

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets


class UserError(Exception):
    """A problem with the user's input: reported as one sentence, exit status 2 (a subclass's `status`), no traceback."""
    status = 2


# ---- Network: dual-BN ResNet-18 with ACL's projection head ----------------------------------
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


# ---- Contrastive loss and attacks -----------------------------------------------------------
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
    BN in attack_mode: eval mode, input gradients only (`labels`: the global batch's, for --supcon).
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
    training. Input gradients only; under torchrun (supervised.py) the random start is _random_start's."""
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


# ---- Several processes (torchrun): each process's slice of the batch, the gradient-summing gather ----
# `torchrun --nproc_per_node N acl.py ...` computes the one-process run at the same global
# --batch-size: every process takes its slice of the same batch (PretrainSampler) with the same
# per-image augmentation, the losses and the attack see the global batch (gather), and DDP averages
# the gradients (machinery.parallel). `python acl.py ...` starts no process group.

def rank_and_world():
    """(this process's rank, number of processes); (0, 1) without torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


# ---- Data -----------------------------------------------------------------------------------
DATASETS = ["cifar10", "cifar100", "stl10", "imagefolder", "digits", "synthetic"]
# None: the images come in any size (imagefolder) or are made at --image-size (digits), see eval_transform.
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
    cls = {"cifar10": CIFAR10, "cifar100": CIFAR100, "stl10": STL10}.get(name)
    if cls is None:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    kwargs = ({"split": {"pretrain": "unlabeled", "train": "train", "test": "test"}[split]} if cls is STL10 else
              {"train": split != "test"})
    created = _first_missing_folder(data_dir)  # torchvision creates the folder before it downloads
    try:
        return cls(data_dir, download=True, **kwargs)
    except Exception as e:  # no network, a broken archive, a full disk: say where the data must go
        if created:  # a failed load leaves nothing behind, e.g. after a mistyped --data-dir
            shutil.rmtree(created, ignore_errors=True)
        folder = os.path.join(os.path.abspath(data_dir), cls.base_folder)
        why = _why_unreadable(cls, folder) if cls is not STL10 and os.path.isdir(folder) else None
        if why:  # the extracted copy is there (so torchvision did not say why it failed): name the file
            raise UserError(f"the {name} folder {folder} is there but cannot be read: {why}; extract {cls.filename} "
                            f"into {os.path.abspath(data_dir)} again (or remove the folder to download it again)") from None
        reason = str(e).strip() or type(e).__name__
        raise UserError(f"could not find or download {name} in {os.path.abspath(data_dir)} ({reason}); "
                        f"download {cls.filename} elsewhere and put it (or its extracted folder) there, or point "
                        "--data-dir at a folder that has it") from None


def _why_unreadable(cls, folder):
    """What is wrong with an extracted CIFAR folder, naming the file (None if nothing is found): a file
    missing, not a pickle, or not a dict of 3x32x32 uint8 rows and their labels as torchvision reads it."""
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


def eval_transform(size, native, train):
    """Evaluation: train split RandomCrop(size, padding=4) + flip; test split unaugmented."""
    resize = [] if native == size else [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    aug = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose(resize + aug + [T.ToTensor()])


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


# ---- Whole batches on the training device (--augment batched) -------------------------------
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


# ---- Data loaders ---------------------------------------------------------------------------
def _worker_init(_):
    # Ctrl-C and a SIGTERM to the process group (scancel, kill -- -PGID) are the main process's: it stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def pretrain_loader(args, device, supervised=False):
    """(loader, sampler) of the pre-training dataset; supervised=True: the labelled training split, one view
    per image. --augment batched: BatchedViews on `device`; pil: PretrainViews in loader workers."""
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
    return loader, sampler


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
    return DataLoader(images, batch_size=batch_size, shuffle=train, generator=g, drop_last=False, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0, worker_init_fn=_worker_init)


# ---- Optimisation ---------------------------------------------------------------------------
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
    optimizer = LARS if name == "lars" else torch.optim.SGD
    return optimizer(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


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
