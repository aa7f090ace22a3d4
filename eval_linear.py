"""Robustness of a pre-trained encoder after SLF, ALF and AFF fine-tuning.

    SLF: frozen encoder, linear classifier trained on clean images        (cross-entropy)
    ALF: frozen encoder, linear classifier trained on PGD-10 images        (cross-entropy)
    AFF: whole network trained with TRADES, beta 6 (Zhang et al., ICML 2019)
         CE(f(x), y) + beta * KL(f(x) || f(x')), clean x through the clean BN, x' through the adversarial BN

Reported: clean accuracy, PGD-20 accuracy, optionally AutoAttack (torchattacks), CIFAR-10-C style
corruptions and per-stage linear CKA between clean and adversarial representations (--cka). Reads this
project's checkpoints and the released ACL / DynACL / AIR pre-training checkpoints.

Output: a table on stdout and a JSON file (--out); with --mode all, its "results" list holds one entry
per mode. Our choice: an image counts as robust only when its clean version is also classified correctly
(it lies in the eps-ball), so robust accuracy <= clean accuracy. Each mode's fine-tuned network is kept
beside the JSON as <json stem>_<mode>.pt, which representations.py maps as it is (it imports this file).

    python eval_linear.py runs/acl_cifar10_0_<time>/checkpoint.pt --mode all --autoattack
    python eval_linear.py ACL_DS.pt --mode slf --dataset stl10 --image-size 32   # transfer to STL-10
    python eval_linear.py checkpoint.pt --mode all --cka   # keeps eval_all_cifar10_{slf,alf,aff}.pt
    python eval_linear.py runs/air_cifar10_0_<time>/checkpoint.pt --mode all --recipe paper   # the authors' settings
    python eval_linear.py DynACL.pt --method dynacl --post-process lpaft --mode all --recipe paper   # DynACL++
"""
import argparse
import copy
import math
import os
import re
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (DATASETS, NUM_CLASSES, ResNet18, STAGE_NAMES, UserError, autocast, check_classes, eval_loader,
                    load_dataset, pgd_attack, step_and_project)
from machinery import (DefaultsHelpFormatter, add_shared_flags, check_attack_flags, check_data_dir_is_read,
                       check_finite, check_fit_flags, check_outputs, check_package, check_ranges, check_replaced,
                       check_weights, checkpoint_file, default_workers, fail, load_checkpoint, main_guard, pick_device,
                       save_checkpoint, synchronize, write_json)

# The modes' own defaults (docs/evaluation.md); a flag given on the command line overrides them for every mode.
MODE_DEFAULTS = {
    "slf": dict(epochs=25, batch_size=512, lr=0.01, milestones=[10, 20], bn="adv"),
    "alf": dict(epochs=25, batch_size=512, lr=0.01, milestones=[10, 20], bn="adv"),
    "aff": dict(epochs=25, batch_size=128, lr=0.1, milestones=[15, 20], bn="adv"),
}


# ---- Recipes: the authors' fine-tuning settings per method, dataset and mode (--recipe paper) ----
# The published tables (and the RobustSSL leaderboard) were fine-tuned with the AIR authors'
# finetuning_utils.setup_hyperparameter; these are its values as they take effect. A row holds the lr
# milestones, the BN copy and one cell per dataset/image size: (batch, lr), (batch, lr, epochs) or
# (batch, lr, epochs, milestones), 25 epochs unless given; None, unset in the released code: batch 128, lr 0.1.
# Always SGD, momentum 0.9, weight decay 2e-4 (the flags' defaults). "stl10/32" is STL-10 resized to 32 px.
# Departure: AFF starts from the checkpoint's BN weights; the released AFF loads them under names its network lacks.
RECIPE_SIZES = ["cifar10/32", "cifar100/32", "stl10/96", "stl10/32"]
RECIPE_METHODS = ["acl", "dynacl", "dynacl++", "acl-air", "dynacl-air", "dynacl-air++", "a-infonce"]
PAPER_RECIPES = {
    # (method, mode):        (milestones, BN,   [cifar10/32,   cifar100/32,  stl10/96,              stl10/32])
    ("acl", "slf"):          ([10, 20], "adv",   [(512, 0.01),  (512, 0.05),  (512, 0.1),            (128, 0.01)]),
    ("acl", "alf"):          ([10, 20], "adv",   [(512, 0.01),  (512, 0.05),  (512, 0.1),            (128, 0.01)]),
    ("acl", "aff"):          ([40, 60], "adv",   [(128, 0.1, 100), (128, 0.1, 100), (128, 0.1, 100), (128, 0.1, 100)]),
    ("dynacl", "slf"):       ([10, 20], "adv",   [(512, 0.01),  (512, 0.05),  (512, 0.1),            (128, 0.01)]),
    ("dynacl", "alf"):       ([10, 20], "adv",   [(512, 0.01),  (512, 0.05),  (512, 0.1),            (128, 0.01)]),
    ("dynacl", "aff"):       ([15, 20], "adv",   [(128, 0.1),   (128, 0.1),   (128, 0.1, 25, [10, 20]), (128, 0.1)]),
    ("dynacl++", "slf"):     ([10, 20], "adv",   [(512, 0.01),  (512, 0.05),  (512, 0.1),            (128, 0.01)]),
    ("dynacl++", "alf"):     ([10, 20], "adv",   [(512, 0.01),  (512, 0.05),  (512, 0.1),            (128, 0.01)]),
    ("dynacl++", "aff"):     ([15, 20], "adv",   [(128, 0.1),   (128, 0.1),   (128, 0.1, 25, [10, 20]), (128, 0.1)]),
    ("acl-air", "slf"):      ([10, 20], "adv",   [(512, 0.005), (512, 0.1),   (512, 0.01),           (128, 0.01)]),
    ("acl-air", "alf"):      ([10, 20], "adv",   [(512, 0.01),  (512, 0.1),   (512, 0.01),           (128, 0.01)]),
    ("acl-air", "aff"):      ([40, 60], "adv",   [(128, 0.1, 100), (128, 0.1, 100), (128, 0.1, 100), (128, 0.1, 100)]),
    ("dynacl-air", "slf"):   ([10, 20], "adv",   [(512, 0.01, 5), (512, 0.1), (512, 0.1),            (128, 0.01)]),
    ("dynacl-air", "alf"):   ([10, 20], "adv",   [(512, 0.01),  (512, 0.1),   (128, 0.1),            (128, 0.01)]),
    ("dynacl-air", "aff"):   ([15, 20], "adv",   [(128, 0.1),   (128, 0.1),   (128, 0.1),            (128, 0.1)]),
    # DynACL-AIR++ is evaluated through the clean BN copy, as the released code does (bnNameCnt = 0),
    # although its post-processing trained the adversarial copy; --bn adv overrides.
    ("dynacl-air++", "slf"): ([10, 20], "clean", [(512, 0.01),  (512, 0.1),   (512, 0.1),            None]),
    ("dynacl-air++", "alf"): ([10, 20], "clean", [(512, 0.01, 4), (512, 0.1), (128, 0.1),            None]),
    # the released AFF says epoch = 19, a typo that its loop turns into 25 epochs
    ("dynacl-air++", "aff"): ([15, 20], "clean", [(128, 0.1),   (128, 0.1),   (128, 0.1),            (128, 0.1)]),
    # "anything else" in the released code, one setting for every mode and size. It would also catch ACL++, ACL-AIR++
    # and A-InfoNCE++, which the authors never made or evaluated: those (like supervised and -supcon) are refused.
    **{("a-infonce", mode): ([15, 20], "adv", [(128, 0.1)] * len(RECIPE_SIZES)) for mode in MODE_DEFAULTS},
}


def mode_settings(args, mode, method=None, image_size=None):
    """The mode's defaults (--recipe uniform) or the authors' (--recipe paper, for a method and dataset/image size
    the table has: main refuses the others before any work), overridden by the flags given."""
    settings = dict(MODE_DEFAULTS[mode])
    if args.recipe == "paper":
        milestones, settings["bn"], cells = PAPER_RECIPES[(method, mode)]
        cell = cells[RECIPE_SIZES.index(f"{args.dataset}/{image_size}")] or (128, 0.1)
        cell += (25, milestones)[len(cell) - 2:]  # a short cell keeps the defaults
        settings.update(zip(["batch_size", "lr", "epochs", "milestones"], cell))
    settings.update({name: getattr(args, name) for name in settings if getattr(args, name) is not None})
    return settings


# Method names. Every name this program records, reads back with --method and shows in figures is
#     <base>[-supcon][++][+<mode>]
#   base      acl, dynacl (acl.py [--dynacl]), acl-air, dynacl-air (air.py [--dynacl]), a-infonce, supervised
#   -supcon   pre-trained with acl.py / air.py --supcon (SupCon's loss instead of NT-Xent); the others refuse it
#   ++        post-processed (--post-process lpaft): DynACL++, DynACL-AIR++ are the authors'; any other is ours
#   +<mode>   a fine-tuned model written by this program (<json stem>_<mode>.pt), e.g. acl+aff, dynacl-air+++slf
METHOD_BASES = ["acl", "dynacl", "acl-air", "dynacl-air", "a-infonce", "supervised"]
SUPCON_BASES = METHOD_BASES[:4]  # acl.py and air.py
METHOD_NAME = re.compile(rf"(?:(?:{'|'.join(SUPCON_BASES)})(?:-supcon)?|a-infonce|supervised)(\+\+)?(?:\+(slf|alf|aff))?")
METHOD_GRAMMAR = (f"<base>[-supcon][++][+<mode>] with <base> one of {', '.join(METHOD_BASES)}, -supcon only after "
                  f"{', '.join(SUPCON_BASES)} (--supcon is acl.py's and air.py's), and <mode> slf, alf or aff")


def recorded_method(checkpoint):
    """The name (above) of the method a checkpoint records, e.g. air.py --dynacl --supcon -> 'dynacl-air-supcon';
    post-processed and fine-tuned files record theirs ('dynacl++', 'acl+aff'); None for released files."""
    method = checkpoint.get("method") if isinstance(checkpoint, dict) else None
    if method not in ("acl", "air", "a_infonce", "supervised"):
        return method
    name = {"acl": "acl", "air": "acl-air", "a_infonce": "a-infonce", "supervised": "supervised"}[method]
    run_args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    # DynACL's omega does not apply to A-InfoNCE (its --dynacl changes only the augmentation): it stays 'a-infonce'
    if run_args.get("dynacl") and name.startswith("acl"):
        name = "dyn" + name
    return name + "-supcon" if run_args.get("supcon") else name  # older checkpoints predate --supcon


# What an evaluation JSON records of the pre-training beside its script's own flags (results.py tabulates it).
PRETRAINING = ["dataset", "image_size", "epochs", "batch_size", "eps", "pgd_alpha", "pgd_steps", "seed", "width",
               "dynacl", "supcon"]
SCRIPT_OF_BASE = {"acl": "acl.py", "dynacl": "acl.py", "acl-air": "air.py", "dynacl-air": "air.py",
                  "a-infonce": "a_infonce.py", "supervised": "supervised.py"}


def pretraining_record(encoder, method):
    """The evaluated encoder's pre-training: the script that ran it and the method's name, the PRETRAINING settings
    and the flags of that script alone (e.g. air.py's lambda1); released checkpoints record only --method's name."""
    run_args, shared = encoder.run_args or {}, argparse.ArgumentParser()
    add_shared_flags(shared)
    base = method and method.split("+")[0].replace("-supcon", "")
    ran = "epochs" in run_args  # a training script's arguments (a released file's post-processing records less)
    return {"script": SCRIPT_OF_BASE.get(base) if ran else None, "method": method,
            **{k: run_args.get(k) for k in PRETRAINING},
            "flags": {k: v for k, v in run_args.items() if k not in {a.dest for a in shared._actions}}}


def derived_method(method, suffix):
    """The name of a model made from a `method` model: suffix '++' (post-processed) or '+<mode>' (fine-tuned)."""
    return None if method is None else method + suffix


def resolve_method(args, recorded):
    """The checkpoint's method: what it records, else --method; a contradiction is refused, and the
    paper recipe and post-processing refuse a checkpoint that says neither."""
    if args.method and recorded and args.method != recorded:
        raise UserError(f"{args.checkpoint} records the method {recorded}, but --method {args.method} was given; "
                        "drop --method (it is only for released checkpoints, which record none)")
    if args.method and METHOD_NAME.fullmatch(args.method).group(2):
        raise UserError(f"--method {args.method} names a fine-tuned model, which is not fine-tuned again; give the "
                        "pre-training method of the checkpoint (map fine-tuned files with representations.py)")
    method = recorded or args.method
    if method is None and (args.recipe == "paper" or args.post_process):
        raise UserError(f"{args.checkpoint} does not record its method (a released checkpoint); say which it is "
                        f"with --method {{{','.join(RECIPE_METHODS)}}}")
    return method


def recipe_record(args, method, mode, settings):
    """The settings a mode runs with, printed in one line and kept in the JSON under 'recipe'."""
    recipe = {"name": args.recipe, "method": method, "mode": mode, **settings, "momentum": args.momentum,
              "weight_decay": args.weight_decay, "from_flags": [n for n in settings if getattr(args, n) is not None]}
    print_wrapped([f"{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in recipe.items()],
                  first="recipe ", sep=" | ", indent="       ")
    return recipe


# The representation analysis's flags, which moved to representations.py, each answered with a command there.
MOVED_FLAGS = {"--compare": "OTHER.pt", "--probes": "--probes", "--probe-features": "--probes --probe-features pool",
               "--probe-attack": "--probes --probe-attack probe", "--probe-epochs": "--probes --probe-epochs 30",
               "--cka-eps": "--cka-eps 2 8", "--cka-points": "--cka-points all", "--labels": "OTHER.pt --labels A B",
               "--plot": "--plot"}


def parse_args(argv=None):
    given = [flag for flag in MOVED_FLAGS if flag in {w.split("=")[0] for w in (sys.argv[1:] if argv is None else argv)}]
    if given:
        compared = " (every model after the first is compared with it)" if given[0] == "--compare" else ""
        raise UserError(f"{given[0]} belongs to the representation analysis, which moved to representations.py: keep "
                        f"the fine-tuned models here, then run python representations.py <json stem>_<mode>.pt "
                        f"{MOVED_FLAGS[given[0]]}{compared}")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    a = parser.add_argument
    a("checkpoint", help="pre-training checkpoint: this project's checkpoint.pt, or a released ACL/DynACL/AIR file")
    a("--mode", default=None, choices=["slf", "alf", "aff", "all"], help="fine-tuning protocol; 'all': SLF, ALF and AFF "
      "from one encoder; --post-process without --mode only post-processes (default: slf)")
    a("--bn", default=None, choices=["adv", "clean"], help="BN copy of the encoder for SLF/ALF and for evaluating AFF "
      "(default: the recipe's: adv, except clean for DynACL-AIR++ with --recipe paper; clean in SLF/ALF for "
      "supervised.py --eps 0, whose adversarial BN is never trained)")
    a("--dataset", default=None, choices=DATASETS, help="fine-tuning and test data; 'synthetic' is for tests only "
      "(default: the checkpoint's, else cifar10; another dataset is a transfer evaluation)")
    a("--data-dir", default=None, help="where datasets are read from (and downloaded to on first use) (default: the "
      "checkpoint's for its own dataset, else ./data)")
    a("--image-size", type=int, default=None, help="input size in px (default: the checkpoint's, else 32 / 96 for the CIFAR / ImageNet stem)")
    a("--epochs", type=int, default=None, help="fine-tuning epochs (default: the recipe's; uniform: 25 for every mode)")
    a("--batch-size", type=int, default=None, help="training batch (default: the recipe's; uniform: SLF/ALF 512, AFF 128)")
    a("--lr", type=float, default=None, help="initial learning rate (default: the recipe's; uniform: SLF/ALF 0.01, AFF 0.1)")
    a("--milestones", type=int, nargs="+", default=None,
      help="epochs after which the lr is x0.1 (default: the recipe's; uniform: SLF/ALF 10 20, AFF 15 20)")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--weight-decay", type=float, default=2e-4, help="SGD weight decay")
    a("--trades-beta", type=float, default=6.0, help="AFF: weight of TRADES' KL term")
    a("--eps", type=float, default=8, help="L-inf radius of every attack, in /255 units")
    a("--pgd-alpha", type=float, default=None, help="step size of every attack, test and training, in /255 units "
      "(default: eps / 4, 2 at the default --eps 8: the papers' step)")
    a("--pgd-steps", type=int, default=20, help="steps of the test PGD attack (pgd20_acc); the training attacks take "
      "--train-pgd-steps")
    a("--train-pgd-steps", type=int, default=10, help="steps of the ALF (PGD) and AFF (TRADES) training attacks")
    a("--test-batch-size", type=int, default=512, help="batch of the evaluation passes (clean, PGD, corruptions, CKA)")
    a("--train-size", type=int, default=None, help="use only the first N training images "
      "(quick runs; also of --post-process's split)")
    a("--test-size", type=int, default=None, help="use only the first N test images (quick runs)")
    a("--autoattack", action="store_true", help="also report AutoAttack (standard, L-inf) through the torchattacks package")
    a("--corruptions", default=None, metavar="DIR", help="CIFAR-10-C / CIFAR-100-C folder (labels.npy, <name>.npy)")
    a("--cka", action="store_true", help="clean-vs-PGD linear CKA per stage and pooled cosine similarity, on the last "
      "mode's model (the maps, cross-model maps, probes and figures are representations.py's)")
    a("--cka-samples", type=int, default=1000, help="test images used for --cka")
    a("--seed", type=int, default=0, help="random seed (data order, attack starts); every mode starts from it")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run; auto picks CUDA when available")
    a("--workers", type=int, default=default_workers(), help="data-loader worker processes (0 = load in the main process)")
    a("--no-amp", action="store_true", help="CUDA: fp32 instead of bf16 autocast (the CPU always uses fp32)")
    a("--out", default=None, help="JSON file for the results (default: <checkpoint folder>/eval_<mode>_<dataset>.json)")
    a("--tensorboard", action="store_true", help="also add each mode's settings and accuracies to the TensorBoard "
      "HParams table, in <checkpoint folder>/<json stem>_<mode>/ (needs the tensorboard package)")
    # Recipes and post-processing (DynACL++ / DynACL-AIR++): the authors' settings, LPAFT
    a("--recipe", default="uniform", choices=["uniform", "paper"], help="fine-tuning settings: 'uniform' (the modes' "
      "defaults) or 'paper' (the authors' per method, dataset and mode); a flag given overrides either")
    a("--method", default=None, help="the checkpoint's method, for released checkpoints (this project's record it): "
      f"{METHOD_GRAMMAR}, e.g. dynacl-air++")
    a("--post-process", default=None, choices=["lpaft"], help="first turn a DynACL / DynACL-AIR encoder into DynACL++ "
      "/ DynACL-AIR++ (k-means pseudo labels, linear probing, TRADES): writes postprocessed.pt next to the checkpoint")
    a("--lpaft-probe-epochs", type=int, default=10, help="post-processing: linear-probing epochs")
    a("--lpaft-probe-lr", type=float, default=0.01, help="post-processing: linear-probing lr (no decay)")
    a("--lpaft-epochs", type=int, default=25, help="post-processing: TRADES full fine-tuning epochs")
    a("--lpaft-lr", type=float, default=0.1, help="post-processing: TRADES full fine-tuning lr")
    a("--lpaft-milestones", type=int, nargs="+", default=[10, 20],
      help="post-processing: epochs after which the TRADES lr is x0.1")
    a("--lpaft-batch-size", type=int, default=512, help="post-processing: batch of both training stages")
    a("--lpaft-weight-decay", type=float, default=1e-4, help="post-processing: SGD weight decay of both training stages")
    a("--kmeans-restarts", type=int, default=5, help="post-processing: k-means++ runs; the lowest inertia is kept")
    args = parser.parse_args(argv)
    check_finite(args)
    args.checkpoint = checkpoint_file(args.checkpoint)
    check_ranges(args)
    if args.pgd_alpha is None:
        args.pgd_alpha = args.eps / 4
    check_attack_flags(args.eps, args.pgd_alpha, args.pgd_steps)
    check_attack_flags(args.eps, args.pgd_alpha, args.train_pgd_steps, "--train-pgd-steps")
    check_fit_flags(args)
    if args.cka_samples < 4:  # 2 images give CKA 1 at every stage, 1 image NaN: as representations.py, n > 3
        raise UserError(f"--cka-samples must be at least 4 (got {args.cka_samples}): CKA compares images with each other")
    if args.method is not None and not METHOD_NAME.fullmatch(args.method):
        raise UserError(f"--method {args.method} is not a method name; write {METHOD_GRAMMAR} (e.g. dynacl-air++)")
    if args.mode is None and not args.post_process:
        args.mode = "slf"
    return args


def resolve_data(args, run_args):
    """--dataset and --data-dir default to the pre-training run's, else CIFAR-10 in ./data (a released checkpoint
    records none); another --dataset is a transfer evaluation. Returns the header line's words for the data."""
    recorded = (run_args or {}).get("dataset")
    given = args.dataset is not None
    args.dataset = args.dataset or recorded or "cifar10"
    if args.data_dir is not None:
        check_data_dir_is_read(args.dataset)
    else:
        args.data_dir = (run_args.get("data_dir") if args.dataset == recorded else None) or "./data"
    where = "" if args.dataset in ("digits", "synthetic") else f" in {args.data_dir}"
    if recorded is None:
        return args.dataset + where + ("" if given else " (the default: the checkpoint records no dataset)")
    if args.dataset != recorded:
        return f"{args.dataset}{where} (transfer: pre-trained on {recorded})"
    return f"{args.dataset}{where} (the checkpoint's{'' if given else ', as --dataset was not given'})"


def dataset_classes(dataset, data_dir):
    """The number of classes of a dataset; an ImageFolder's class folders, the same in train/ and test/."""
    if dataset != "imagefolder":
        return NUM_CLASSES[dataset]
    classes = load_dataset("imagefolder", data_dir, "train").classes
    if load_dataset("imagefolder", data_dir, "test").classes != classes:
        raise UserError(f"{data_dir}/train and {data_dir}/test have different class folders; make them the same")
    check_classes(dataset, data_dir, classes, "evaluation")
    return len(classes)


def only_clean_bn_trained(encoder, mode):
    """True for a supervised.py --eps 0 checkpoint in SLF or ALF: its adversarial BN copy was never trained, so the
    frozen encoder is read through the clean one (unless --bn says otherwise); AFF trains the adversarial one."""
    return mode != "aff" and encoder.method == "supervised" and (encoder.run_args or {}).get("eps") == 0


# ---- Loading a pre-trained encoder ----------------------------------------------------------
class Encoder(nn.Module):
    """Backbone without projection head: images in [0, 1] -> pooled features through its BN copy, or `adv` if given."""

    def __init__(self, model, bn="adv"):
        super().__init__()
        self.model, self.adv = model, bn == "adv"

    def forward(self, x, adv=None):
        return self.model.features(x, self.adv if adv is None else adv)

    def stages(self, x):
        """Every stage output (STAGE_NAMES: stem, layer1..4, pooled), for the CKA diagnostic."""
        return self.model.features(x, self.adv, stages=True)


def _state_dict_of(checkpoint, path):
    """The backbone's weights and the run's arguments (None for released checkpoints)."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):  # acl.py, air.py, a_infonce.py
        state, run_args = checkpoint["model"], checkpoint.get("args")
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):  # released ACL/DynACL/AIR
        state, run_args = checkpoint["state_dict"], None
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state, run_args = checkpoint, None  # a bare state dict
    else:
        raise UserError(f"{path} is not a pre-training checkpoint: expected this project's checkpoint (key 'model'), "
                        "a dict with 'state_dict', or a bare state dict of tensors")
    # drop DataParallel's 'module.' prefix, the projection head and a classifier (supervised.py's, a kept model's)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    return state, run_args if isinstance(run_args, dict) else None


def load_encoder(path, bn="adv"):
    """The encoder of a checkpoint in eval mode through the BN copy `bn`, width and stem read from conv1.weight [width,
    3, k, k] (k = 3: CIFAR stem, 7: ImageNet). A missing, unexpected or mis-shaped key is refused (check_weights)."""
    checkpoint = load_checkpoint(path)
    state, run_args = _state_dict_of(checkpoint, path)
    conv1 = state.get("conv1.weight")
    if not isinstance(conv1, torch.Tensor) or conv1.ndim != 4 or conv1.shape[1] != 3 or conv1.shape[2] not in (3, 7):
        raise UserError(f"{path} has no ResNet-18 'conv1.weight' of shape [width, 3, 3, 3] or [width, 3, 7, 7]; "
                        "it is not an ACL/DynACL/AIR pre-training checkpoint")
    width, stem = conv1.shape[0], "cifar" if conv1.shape[2] == 3 else "imagenet"
    model = ResNet18(width, stem, head=False)
    check_weights(state, model.state_dict(), path, f"a dual-BN ResNet-18 of width {width} with the {stem} stem",
                  "it is not an ACL/DynACL/AIR pre-training checkpoint")
    model.load_state_dict(state, strict=False)  # strict=False only for num_batches_tracked, checked above
    encoder = Encoder(model, bn).eval()
    encoder.width, encoder.stem, encoder.run_args = width, stem, run_args
    encoder.method = recorded_method(checkpoint)
    encoder.fine_tuned = checkpoint if "fine_tune" in checkpoint else None  # a kept model, as read (unchecked)
    encoder.image_size = (run_args or {}).get("image_size") or (32 if stem == "cifar" else 96)
    return encoder


class Classifier(nn.Module):
    """Encoder + zero-initialised linear classifier on the pooled feature (or on `dim` features: a probe's)."""

    def __init__(self, encoder, num_classes, dim=None):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(dim or encoder.model.feature_dim, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x, adv=None):
        return self.fc(self.encoder(x, adv))


def fine_tuned_checkpoint(model, entry):
    """What <json stem>_<mode>.pt holds, in plain types and tensors (torch.load(weights_only=True) reads it): 'method'
    <method>+<mode>; 'args' the pre-training run's (with image_size); 'model' the backbone in the pre-training layout
    plus classifier.*; 'bn' the classifier's BN copy; 'num_classes'; 'fine_tune' the JSON entry less its CKA."""
    state = {**model.encoder.model.state_dict(), **{f"classifier.{k}": v for k, v in model.fc.state_dict().items()}}
    state = {k: v.detach().cpu().clone() for k, v in state.items()}
    return {"method": derived_method(entry["method"], f"+{entry['mode']}"),
            "args": dict(model.encoder.run_args or {}, image_size=entry["image_size"]), "model": state, "bn": entry["bn"],
            "num_classes": entry["num_classes"], "fine_tune": {k: v for k, v in entry.items() if k != "cka"}}


def fine_tuned_path(out, mode):
    """Where a mode's fine-tuned model goes: <json stem>_<mode>.pt."""
    return f"{os.path.splitext(out)[0]}_{mode}.pt"


def earlier_outputs(out, keep, suffix=r"_(?:slf|alf|aff)\.pt"):
    """The files beside the JSON `out` named <json stem><suffix> (by default the fine-tuned models fine_tuned_path
    names; representations.py's figures) except those in `keep` (what this run wrote and read): an earlier run's."""
    folder, name = os.path.split(out)
    pattern = re.compile(re.escape(os.path.splitext(name)[0]) + suffix)
    keep = {os.path.realpath(path) for path in keep}
    paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder or ".")) if pattern.fullmatch(f)]
    return [path for path in paths if os.path.realpath(path) not in keep]


def check_output_files(args, out, modes):
    """Before any work: no file written overwrites an input or a run's file, or replaces another program's file."""
    folder = os.path.dirname(os.path.abspath(args.checkpoint))
    postprocessed = [os.path.join(folder, "postprocessed.pt"), os.path.join(folder, "postprocessed.json")]
    if args.mode:  # --post-process alone writes no JSON
        written = [out] + [fine_tuned_path(out, mode) for mode in modes]
        check_outputs(written, [args.checkpoint])
        for path in written:  # the checkpoint they will record: postprocessed.pt after --post-process
            check_replaced(path, "eval_linear.py", postprocessed[0] if args.post_process else args.checkpoint, out)
    if args.post_process:
        check_outputs(postprocessed, [args.checkpoint], "--post-process", report=False,
                      remedy="post-process a copy of the checkpoint in another folder")


# ---- Fine-tuning ----------------------------------------------------------------------------
def trades_attack(model, x, eps, alpha, steps, amp=False, natural_adv=False):
    """TRADES' inner maximisation of KL(f(x) || f(x')) from x + 0.001 N(0, I), in eval mode, input gradients only:
    f(x) through the clean BN (the adversarial one with `natural_adv`, as in LPAFT), f(x') through the adversarial
    BN. The start is not uniform, as in TRADES' code; departure: we clamp it to [0, 1]."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(amp):
        p_clean = F.softmax(model(x, adv=natural_adv).float(), dim=1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            with autocast(amp):
                logits_adv = model(x_adv, adv=True)
            kl = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(kl, [x_adv])
        x_adv = step_and_project(x_adv, grad, x, eps, alpha)
    model.train(was_training)
    return x_adv.detach()


def say_if_one_step(loader, flag):
    """One line when the training split fits in one batch (fine-tuning keeps an incomplete batch): one step an epoch."""
    if len(loader) == 1:
        print(f"note: the {len(loader.dataset)} training images fit in one batch of {loader.batch_size}: one step an "
              f"epoch (lower {flag})", flush=True)


class Diverged(UserError):
    """A fine-tuning whose loss or weights went NaN or infinite: one sentence, exit status 1; its model is not kept."""
    status = 1


def fine_tune(model, mode, loader, settings, args, device, amp, memory_format):
    """Train `model` (a Classifier) by `mode` for settings['epochs'], keeping the last epoch (no selection on the test
    set). Optional settings: 'weight_decay' (else --weight-decay), 'natural_bn' ('adv': AFF sends the natural images
    through the adversarial BN too), 'label' (of the progress lines and messages). A loss or weight (or BN
    statistic) that is NaN or infinite at the end of an epoch raises Diverged."""
    eps, alpha = args.eps / 255, args.pgd_alpha / 255
    frozen = mode in ("slf", "alf")
    natural_adv, label = settings.get("natural_bn") == "adv", settings.get("label", mode)
    model.encoder.requires_grad_(not frozen)
    params = model.fc.parameters() if frozen else model.parameters()
    optimizer = torch.optim.SGD(params, lr=settings["lr"], momentum=args.momentum,
                                weight_decay=settings.get("weight_decay", args.weight_decay))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, settings["milestones"], gamma=0.1)
    model.eval()  # SLF/ALF stay in eval mode; AFF switches to train mode after each inner attack
    for epoch in range(1, settings["epochs"] + 1):
        start, seen = time.perf_counter(), 0
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        for x, y in loader:
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            if frozen:
                if mode == "alf":  # PGD against encoder + classifier, then train on the attacked images
                    x = pgd_attack(model, x, y, eps, alpha, args.train_pgd_steps, amp)
                with autocast(amp):
                    with torch.no_grad():
                        features = model.encoder(x)
                    logits = model.fc(features).float()
                loss = F.cross_entropy(logits, y)
            else:  # AFF: TRADES, the whole network in train mode; clean -> clean BN, adversarial -> adversarial BN
                x_adv = trades_attack(model, x, eps, alpha, args.train_pgd_steps, amp, natural_adv)
                model.train()
                with autocast(amp):
                    logits = model(x, adv=natural_adv).float()
                    logits_adv = model(x_adv, adv=True).float()
                kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
                loss = F.cross_entropy(logits, y) + args.trades_beta * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)  # summed on the device: no host sync before the epoch ends
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        synchronize(device)
        seconds = time.perf_counter() - start
        loss = loss_sum.item() / seen
        print(f"{label} epoch {epoch}/{settings['epochs']} | loss {loss:.4f} | train acc "
              f"{100 * correct.item() / seen:.2f}% | lr {lr:.4g} | {seen / seconds:.0f} img/s", flush=True)
        weights_finite = bool(torch.stack([torch.isfinite(t).all() for t in model.state_dict().values()]).all())
        if not (math.isfinite(loss) and weights_finite):
            weights = "" if weights_finite else ", and weights became non-finite"
            raise Diverged(f"fine-tuning ({label}) diverged in epoch {epoch}/{settings['epochs']}: mean loss {loss:.4g}"
                           f"{weights}; lower the learning rate (it was {settings['lr']:g})")
    model.eval()
    return seen / seconds


# ---- Metrics --------------------------------------------------------------------------------
def correct_per_image(model, loader, device, eps, alpha, steps, amp=False, memory_format=torch.contiguous_format,
                      adversarial=None):
    """Per-image correctness (bool tensors on the CPU) of the clean and the PGD images of a loader, robust only where
    the clean image is correct too (our choice, above). `adversarial`: PGD images made earlier, one tensor per batch."""
    model.eval()
    clean, robust = [], []
    for i, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        if adversarial is None:
            x_adv = pgd_attack(model, x, y, eps, alpha, steps, amp)
        else:
            x_adv = adversarial[i].to(device, non_blocking=True, memory_format=memory_format)
        with torch.no_grad(), autocast(amp):
            clean_ok = model(x).argmax(1) == y
            adv_ok = model(x_adv).argmax(1) == y
        clean.append(clean_ok)
        robust.append(clean_ok & adv_ok)
    return torch.cat(clean).cpu(), torch.cat(robust).cpu()


def autoattack_accuracy(model, loader, num_classes, eps, device, seed):
    """Accuracy under AutoAttack (standard, L-inf), again counted only on clean-correct images."""
    import torchattacks
    net = model.eval()  # fp32 logits of the evaluated route: no autocast here
    attack = torchattacks.AutoAttack(net, norm="Linf", eps=eps, version="standard", n_classes=num_classes, seed=seed)
    robust = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        x_adv = attack(x, y)
        with torch.no_grad():
            robust.append((net(x).argmax(1) == y) & (net(x_adv).argmax(1) == y))
    return torch.cat(robust).float().mean().item()


def read_corruptions(folder):
    """A CIFAR-10-C style folder -> (labels, {name: uint8 images N x H x W x 3}), memory-mapped.
    The 5 severities are stacked: severity k is rows (k - 1) n .. k n with n = len(labels) / 5."""
    labels_path = os.path.join(folder, "labels.npy")
    if not os.path.isfile(labels_path):
        raise UserError(f"--corruptions {folder} has no labels.npy; point it at a CIFAR-10-C / CIFAR-100-C folder")
    names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".npy") and f != "labels.npy")
    if not names:
        raise UserError(f"--corruptions {folder} holds no <corruption>.npy file besides labels.npy")
    try:
        labels = np.load(labels_path)
        images = {name: np.load(os.path.join(folder, name + ".npy"), mmap_mode="r") for name in names}
    except (OSError, ValueError) as e:
        raise UserError(f"a .npy file in {folder} cannot be read ({e}); replace it") from None
    if labels.ndim != 1 or len(labels) == 0 or len(labels) % 5:
        raise UserError(f"{labels_path} must hold 5 severities x n labels (got shape {labels.shape})")
    for name, array in images.items():
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[0] != len(labels) or array.shape[3] != 3:
            raise UserError(f"{folder}/{name}.npy must be uint8 of shape [{len(labels)}, H, W, 3] like labels.npy "
                            f"(got {array.dtype} {list(array.shape)})")
    return labels.astype(np.int64), images


def corruption_accuracy(model, labels, images, batch_size, device, image_size, amp=False):
    """Accuracy per corruption and severity: {'mean', 'by_severity': [5], 'by_corruption': {name: [5]}}."""
    model.eval()
    by_corruption = {}
    for name, array in images.items():
        correct = []
        for i in range(0, len(labels), batch_size):
            x = torch.from_numpy(np.array(array[i:i + batch_size])).to(device).permute(0, 3, 1, 2).float() / 255
            if x.shape[-1] != image_size:  # e.g. a 96 px model on 32 px CIFAR-10-C
                x = F.interpolate(x, size=image_size, mode="bicubic", align_corners=False).clamp(0, 1)
            y = torch.from_numpy(labels[i:i + batch_size]).to(device)
            with torch.no_grad(), autocast(amp):
                correct.append(model(x).argmax(1) == y)
        by_corruption[name] = torch.cat(correct).view(5, -1).float().mean(1).tolist()  # a row per severity
    table = np.array(list(by_corruption.values()))
    return {"mean": float(table.mean()), "by_severity": table.mean(0).tolist(), "by_corruption": by_corruption}


def _gram(x, centre=False, chunk=8192):
    """K = X X^T of the flattened rows (column-centred first when `centre`) in float64, from column chunks (memory)."""
    x = x.flatten(1)
    gram = torch.zeros(len(x), len(x), dtype=torch.float64, device=x.device)
    for c in range(0, x.shape[1], chunk):
        part = x[:, c:c + chunk].double()
        if centre:
            part = part - part.mean(0, keepdim=True)
        gram += part @ part.T
    return gram


def linear_cka(x, y):
    """Linear CKA of x, y (N x ..., one row per image): <K, L>_F / (||K||_F ||L||_F)."""
    k, l = _gram(x, centre=True), _gram(y, centre=True)
    return float((k * l).sum() / (torch.linalg.norm(k) * torch.linalg.norm(l)))


def representation_similarity(model, loader, samples, device, eps, alpha, steps, amp, memory_format, mode,
                              adversarial=None):
    """Per-stage linear CKA and pooled cosine similarity of the first `samples` test images and their PGD versions
    against the classifier, through the evaluated BN copy (`adversarial`: those made earlier, one tensor per batch)."""
    model.eval()
    clean, adv, seen = [[] for _ in STAGE_NAMES], [[] for _ in STAGE_NAMES], 0
    for i, (x, y) in enumerate(loader):
        x = x[:samples - seen].to(device, non_blocking=True, memory_format=memory_format)
        y = y[:samples - seen].to(device, non_blocking=True)
        if adversarial is None:
            x_adv = pgd_attack(model, x, y, eps, alpha, steps, amp)
        else:
            x_adv = adversarial[i][:len(x)].to(device, non_blocking=True, memory_format=memory_format)
        with torch.no_grad(), autocast(amp):
            for store, images in ((clean, x), (adv, x_adv)):
                for i, stage in enumerate(model.encoder.stages(images)):
                    store[i].append(stage.float().flatten(1))
        seen += len(y)
        if seen >= samples:
            break
    clean, adv = [torch.cat(s) for s in clean], [torch.cat(s) for s in adv]
    cosine = F.cosine_similarity(clean[-1].double(), adv[-1].double(), dim=1).mean().item()
    cka = {name: linear_cka(c, a) for name, c, a in zip(STAGE_NAMES, clean, adv)}
    return {"model": mode, "samples": seen, "linear_cka": cka, "pooled_cosine": cosine}


LINE_WIDTH = 110  # console tables wrap here; only a long path makes a line longer


def print_wrapped(pieces, first="  ", sep="  ", indent="  "):
    """Print `pieces` after `first`, joined by `sep`, in lines of <= LINE_WIDTH; continuation lines start `indent`."""
    lines, line, empty = [], first, True
    for piece in pieces:
        if not empty and len(line) + len(sep) + len(piece) > LINE_WIDTH:
            lines.append(line)
            line, empty = indent, True
        line, empty = line + ("" if empty else sep) + piece, False
    print("\n".join(lines + [line]), flush=True)


def print_values(values, indent="  "):
    """{name: value in [0, 1]} as aligned 'name value' columns."""
    width = max(map(len, values))
    print_wrapped([f"{name:<{width}} {value:6.3f}" for name, value in values.items()], indent, "   ", indent)


def print_table(results):
    """A readable summary on stdout; the JSON has the same numbers."""
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    print(f"\n{'mode':<5} {'bn':<5} {'epochs':>6} {'clean %':>8} {'PGD %':>8} {'AA %':>8} {'corrupt. %':>10} {'seconds':>8}")
    for r in results:
        corruption = r["corruption_acc"]["mean"] if r["corruption_acc"] else None
        print(f"{r['mode']:<5} {r['bn']:<5} {r['epochs']:>6} {pct(r['clean_acc']):>8} {pct(r['pgd20_acc']):>8} "
              f"{pct(r['autoattack_acc']):>8} {pct(corruption):>10} {r['seconds']:>8.0f}")
    for r in results:
        if r["corruption_acc"]:
            print(f"\ncorruptions ({r['mode']}), accuracy % at severity 1..5:")
            for name, accs in r["corruption_acc"]["by_corruption"].items():
                print(f"  {name:<20} " + " ".join(f"{100 * a:6.2f}" for a in accs))
        if cka := r["cka"]:
            print(f"\nfull-batch linear CKA per stage, clean vs PGD images ({r['mode']} model; {cka['samples']} images "
                  "at once):")
            print_values(cka["linear_cka"])
            print(f"  mean cosine similarity of the pooled features, clean vs PGD: {cka['pooled_cosine']:.3f}")


def add_to_tensorboard(results, out):
    """Each mode as one row of TensorBoard's HParams table (pre-training and evaluation settings against the
    accuracies), in <checkpoint folder>/<json stem>_<mode>/, beside the run's curves; `tensorboard --logdir runs`
    shows them all. That folder's earlier events are replaced, as the JSON they came from was."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams
    stem = os.path.splitext(os.path.basename(out))[0]
    for r in results:
        folder = os.path.join(os.path.dirname(r["checkpoint"]), f"{stem}_{r['mode']}")
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.startswith("events.out.tfevents."):
                os.remove(os.path.join(folder, name))
        pretraining = {k: v for k, v in r["pretraining"].items() if k != "flags"} | r["pretraining"]["flags"]
        settings = {**{f"pretraining/{k}": v for k, v in pretraining.items()},
                    **{k: r[k] for k in ("mode", "bn", "epochs", "lr", "eps", "pgd_alpha", "pgd_steps", "seed")}}
        settings = {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for k, v in settings.items()}
        accuracies = {f"eval/{k}": r[k] for k in ("clean_acc", "pgd20_acc", "autoattack_acc") if r[k] is not None}
        with SummaryWriter(folder) as writer:
            for summary in hparams(settings, accuracies):
                writer.file_writer.add_summary(summary)
            for tag, value in accuracies.items():
                writer.add_scalar(tag, value)


# ---- Post-processing (DynACL++ / DynACL-AIR++) ----------------------------------------------
# LPAFT (Luo et al., ICLR 2023; used by AIR for DynACL-AIR++): pooled clean-BN features of the unaugmented
# pre-training images -> k-means pseudo labels -> linear probing on them -> TRADES on the whole encoder.

def _squared_distances(x, centres):
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centres.T + (centres * centres).sum(1)).clamp_(min=0)


def _initial_centres(x, k, init, generator):
    """'k-means++' (Arthur & Vassilvitskii, 2007: each next centre drawn with probability proportional
    to the squared distance to the nearest chosen one) or 'random' (k distinct points, as the released code)."""
    if init == "random":
        return x[torch.randperm(len(x), generator=generator)[:k].to(x.device)].clone()
    centres = [x[torch.randint(len(x), (1,), generator=generator).item()]]
    nearest = _squared_distances(x, centres[0][None])[:, 0]
    for _ in range(1, k):
        weights = nearest.double().cpu()
        weights = weights if weights.sum() > 0 else torch.ones_like(weights)  # every point is already a centre
        centres.append(x[torch.multinomial(weights, 1, generator=generator).item()])
        nearest = torch.minimum(nearest, _squared_distances(x, centres[-1][None])[:, 0])
    return torch.stack(centres)


def kmeans(x, k, restarts=5, init="k-means++", iterations=300, tol=1e-5, seed=0):
    """Lloyd's k-means (Euclidean) of the rows of x on x's device, the best of `restarts` runs by inertia
    (the sum of squared distances to the assigned centre, in float64). A run stops when its centres
    move by less than tol x the features' mean variance (squared). Returns (assignments, centres, inertia)."""
    x = x.float()
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
    threshold = tol * x.var(0).mean()
    best = None
    for _ in range(restarts):
        centres = _initial_centres(x, k, init, generator)
        for _ in range(iterations):
            assignments = _squared_distances(x, centres).argmin(1)
            counts = torch.bincount(assignments, minlength=k)[:, None]
            sums = torch.zeros_like(centres).index_add_(0, assignments, x)
            moved = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty cluster keeps its centre
            shift, centres = (moved - centres).pow(2).sum(), moved
            if shift <= threshold:
                break
        assignments = _squared_distances(x, centres).argmin(1)
        inertia = (x.double() - centres.double()[assignments]).pow(2).sum().item()
        if best is None or inertia < best[2]:
            best = (assignments, centres, inertia)
    return best


def cluster_quality(labels, clusters):
    """Purity (each cluster counted as its most frequent label) and NMI = 2 I(Y; C) / (H(Y) + H(C)) (the
    arithmetic normalisation; 1 when both are constant) of cluster assignments against true labels."""
    _, y = np.unique(np.asarray(labels), return_inverse=True)
    _, c = np.unique(np.asarray(clusters), return_inverse=True)
    joint = np.zeros((c.max() + 1, y.max() + 1))
    np.add.at(joint, (c, y), 1)
    purity = joint.max(1).sum() / joint.sum()
    joint /= joint.sum()
    pc, py = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = (joint[nonzero] * np.log(joint[nonzero] / np.outer(pc, py)[nonzero])).sum()
    entropy = lambda p: -(p[p > 0] * np.log(p[p > 0])).sum()  # noqa: E731
    h = entropy(pc) + entropy(py)
    return float(purity), float(min(1.0, max(0.0, 2 * mutual / h)) if h > 0 else 1.0)


def post_process(args, method, image_size, num_classes, device, amp, memory_format):
    """LPAFT on --dataset's pre-training split; writes postprocessed.pt (this project's checkpoint format,
    method '<method>++') and postprocessed.json next to the checkpoint; returns (.pt path, the JSON's record)."""
    if method.endswith("++"):
        raise UserError(f"{args.checkpoint} is already post-processed ({method}); post-process the original checkpoint")
    folder = os.path.dirname(os.path.abspath(args.checkpoint))
    path, report_path = os.path.join(folder, "postprocessed.pt"), os.path.join(folder, "postprocessed.json")
    # SIGTERM ends it at once: SystemExit unwinds through machinery.atomic_file, which removes a half-written file
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: fail(
        "post-processing was stopped by SIGTERM; no partial file was left", status=128 + signum))
    try:
        seconds, start = {}, time.perf_counter()
        torch.manual_seed(args.seed)
        # the probe and TRADES use the adversarial BN; the k-means features the clean one (below)
        model = Classifier(load_encoder(args.checkpoint, "adv"), num_classes).to(device, memory_format=memory_format)
        images = eval_loader(args.dataset, args.data_dir, "pretrain", image_size, args.test_batch_size, args.workers,
                             device, args.seed, subset=args.train_size)  # unaugmented, in order
        if len(images.dataset) < num_classes:
            raise UserError(f"the {args.dataset} pre-training split has {len(images.dataset)} images, fewer than the "
                            f"{num_classes} clusters of --post-process; use more images (--train-size) or more data")
        features, labels = [], []
        with torch.no_grad(), autocast(amp):
            for x, y in images:
                x = x.to(device, non_blocking=True, memory_format=memory_format)
                features.append(model.encoder(x, adv=False).float())
                labels.append(y)
        labels = torch.cat(labels).numpy()
        synchronize(device)
        seconds["features"] = time.perf_counter() - start

        start = time.perf_counter()
        # Departure: k-means++, the lowest inertia of restarts kept; the released code runs one random-initialised k-means
        pseudo, _, inertia = kmeans(torch.cat(features), num_classes, args.kmeans_restarts, seed=args.seed)
        pseudo = pseudo.cpu().numpy()
        purity, nmi = cluster_quality(labels, pseudo) if (labels >= 0).all() else (None, None)  # STL-10: unlabelled
        seconds["kmeans"] = time.perf_counter() - start
        quality = f"purity {purity:.4f}, NMI {nmi:.4f}" if purity is not None else "no labels to compare with"
        print(f"k-means: {num_classes} clusters of {len(pseudo)} images, inertia {inertia:.4g} (best of "
              f"{args.kmeans_restarts}); {quality}", flush=True)

        loader = eval_loader(args.dataset, args.data_dir, "pretrain", image_size, args.lpaft_batch_size, args.workers,
                             device, args.seed, subset=args.train_size, labels=pseudo.tolist(), train=True)
        say_if_one_step(loader, "--lpaft-batch-size")
        probe = dict(label="lpaft probe", epochs=args.lpaft_probe_epochs, lr=args.lpaft_probe_lr, milestones=[],
                     weight_decay=args.lpaft_weight_decay)
        aft = dict(label="lpaft trades", epochs=args.lpaft_epochs, lr=args.lpaft_lr, milestones=args.lpaft_milestones,
                   weight_decay=args.lpaft_weight_decay, natural_bn="adv")
        for name, mode, settings in (("probe", "slf", probe), ("trades", "aff", aft)):
            start = time.perf_counter()
            fine_tune(model, mode, loader, settings, args, device, amp, memory_format)
            seconds[name] = time.perf_counter() - start

        record = {"checkpoint": os.path.abspath(args.checkpoint), "postprocessed": path, "method": method + "++",
                  "dataset": args.dataset, "images": len(pseudo), "clusters": num_classes, "purity": purity, "nmi": nmi,
                  "kmeans_inertia": inertia, "kmeans_restarts": args.kmeans_restarts, "probe": probe, "trades": aft,
                  "batch_size": args.lpaft_batch_size, "trades_beta": args.trades_beta, "eps": args.eps,
                  "pgd_alpha": args.pgd_alpha, "train_pgd_steps": args.train_pgd_steps, "seed": args.seed,
                  "seconds": seconds}
        # The linear head is not kept: the result is a pre-training checkpoint for any mode.
        state = {k: v.detach().cpu().contiguous() for k, v in model.encoder.model.state_dict().items()}
        run_args = dict(model.encoder.run_args or {}, image_size=image_size)
        save_checkpoint(path, {"method": method + "++", "args": run_args, "model": state, "post_process": record})
        write_json(report_path, record)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    print(f"wrote {path} and {report_path}", flush=True)
    return path, record


# ---- Main -----------------------------------------------------------------------------------
def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    # Everything that can fail is checked before hours of fine-tuning: packages, corruptions, output.
    for flag, package in (("autoattack", "torchattacks"), ("tensorboard", "tensorboard")):
        if getattr(args, flag):
            check_package(flag, package)
    if args.tensorboard and not os.access(os.path.dirname(os.path.abspath(args.checkpoint)), os.W_OK | os.X_OK):
        raise UserError(f"--tensorboard writes beside {args.checkpoint}, in a folder that is not writable; make it "
                        "writable or drop --tensorboard")
    corruptions = read_corruptions(args.corruptions) if args.corruptions else None
    postprocessed = args.post_process or os.path.basename(args.checkpoint) == "postprocessed.pt"
    device = pick_device(args.device)
    amp = device.type == "cuda" and not args.no_amp  # bf16 autocast for the network, losses in fp32
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    pretrained = load_encoder(args.checkpoint)
    if pretrained.fine_tuned:  # its classifier would be thrown away and the encoder fine-tuned a second time
        raise UserError(f"{args.checkpoint} is a model fine-tuned by eval_linear.py ({pretrained.method}); map it with "
                        "representations.py, or evaluate the checkpoint it was fine-tuned from")
    data = resolve_data(args, pretrained.run_args)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                   f"eval_{args.mode}_{args.dataset}{'_postprocessed' if postprocessed else ''}.json")
    modes = list(MODE_DEFAULTS) if args.mode == "all" else [args.mode]
    check_output_files(args, out, modes)
    image_size = args.image_size or pretrained.image_size
    num_classes = dataset_classes(args.dataset, args.data_dir)
    if corruptions and corruptions[0].max() >= num_classes:
        raise UserError(f"{args.corruptions} has labels up to {corruptions[0].max()}, but {args.dataset} has "
                        f"{num_classes} classes; use the corruptions of the fine-tuning dataset")
    method = resolve_method(args, pretrained.method)
    if args.recipe == "paper":  # a dataset, image size or method the table lacks is refused before any work
        if f"{args.dataset}/{image_size}" not in RECIPE_SIZES:
            raise UserError(f"--recipe paper has settings for {', '.join(RECIPE_SIZES)} (dataset/image size), not for "
                            f"{args.dataset}/{image_size}; use one of those or --recipe uniform")
        recipe_method = method + "++" if args.post_process else method  # not None: resolve_method refuses that
        if args.mode and (recipe_method, "slf") not in PAPER_RECIPES:  # supervised, -supcon, a ++ the authors lack
            raise UserError(f"--recipe paper has no settings for {recipe_method}: the authors published recipes for "
                            f"{', '.join(RECIPE_METHODS)} only; use --recipe uniform")
    test_loader = eval_loader(args.dataset, args.data_dir, "test", image_size, args.test_batch_size, args.workers,
                              device, args.seed, subset=args.test_size) if args.mode else None
    if args.cka and args.mode and len(test_loader.dataset) < 4:  # 1 image: NaN, 2: CKA 1 at every stage
        raise UserError(f"--cka needs at least 4 test images, but only {len(test_loader.dataset)} are used "
                        f"(--test-size, or the {args.dataset} test split); use more, or drop --cka")
    if args.post_process:
        args.checkpoint, record = post_process(args, method, image_size, num_classes, device, amp, memory_format)
        if args.mode is None:
            return record
        pretrained = load_encoder(args.checkpoint)
        method = pretrained.method
    eps, alpha = args.eps / 255, args.pgd_alpha / 255
    print(f"{args.checkpoint}: {method or 'method not recorded'}, width {pretrained.width}, {pretrained.stem} stem; "
          f"{data} at {image_size} px, {num_classes} classes, {len(test_loader.dataset)} test images "
          f"({device.type}{', bf16' if amp else ''})", flush=True)
    ball = f"eps {args.eps:g}/255, step size {args.pgd_alpha:g}/255"
    print(f"test attack: PGD, {args.pgd_steps} steps (--pgd-steps), {ball}", flush=True)
    trained = [{"alf": "ALF's PGD", "aff": "AFF's TRADES"}[m] for m in modes if m != "slf"]
    if trained:
        print(f"training attack ({' and '.join(trained)}): {args.train_pgd_steps} steps (--train-pgd-steps), {ball}",
              flush=True)
    pretraining = pretraining_record(pretrained, method)
    results, fine_tuned, stopped = [], [], None
    for mode in modes:
        mode_start = time.perf_counter()
        settings = mode_settings(args, mode, method, image_size)
        if args.bn is None and only_clean_bn_trained(pretrained, mode):
            settings["bn"] = "clean"
        recipe = recipe_record(args, method, mode, settings)
        torch.manual_seed(args.seed)  # every mode starts from the same encoder, classifier and random numbers
        model = Classifier(copy.deepcopy(pretrained), num_classes).to(device, memory_format=memory_format)
        model.encoder.adv = settings["bn"] == "adv"
        train_loader = eval_loader(args.dataset, args.data_dir, "train", image_size, settings["batch_size"], args.workers,
                                   device, args.seed, subset=args.train_size)
        say_if_one_step(train_loader, "--batch-size")
        try:
            images_per_s = fine_tune(model, mode, train_loader, settings, args, device, amp, memory_format)
        except Diverged as e:  # the modes finished before it are kept (below); its model is not
            stopped = e
            break

        clean, robust = correct_per_image(model, test_loader, device, eps, alpha, args.pgd_steps, amp, memory_format)
        entry = {"checkpoint": os.path.abspath(args.checkpoint), "dataset": args.dataset, "mode": mode, **settings,
                 "recipe": recipe, "momentum": args.momentum, "weight_decay": args.weight_decay,
                 "trades_beta": args.trades_beta if mode == "aff" else None, "eps": args.eps, "pgd_alpha": args.pgd_alpha,
                 "pgd_steps": args.pgd_steps, "train_pgd_steps": args.train_pgd_steps if mode != "slf" else None,
                 "image_size": image_size, "width": pretrained.width, "stem": pretrained.stem, "num_classes": num_classes,
                 "train_images": len(train_loader.dataset), "test_images": len(clean), "seed": args.seed,
                 "device": device.type, "amp": amp, "train_images_per_s": images_per_s,
                 "clean_acc": clean.float().mean().item(), "pgd20_acc": robust.float().mean().item(),
                 "autoattack_acc": None, "corruption_acc": None, "cka": None,
                 "method": method, "fine_tuned": os.path.abspath(fine_tuned_path(out, mode)), "pretraining": pretraining}
        if args.autoattack:
            entry["autoattack_acc"] = autoattack_accuracy(model, test_loader, num_classes, eps, device, args.seed)
        if corruptions:
            entry["corruption_acc"] = corruption_accuracy(model, *corruptions, args.test_batch_size, device, image_size, amp)
        if args.cka and mode == modes[-1]:  # the last mode's fine-tuned model (AFF with --mode all)
            entry["cka"] = representation_similarity(model, test_loader, args.cka_samples, device, eps, alpha,
                                                     args.pgd_steps, amp, memory_format, mode)
        entry["seconds"] = time.perf_counter() - mode_start
        results.append(entry)
        fine_tuned.append(fine_tuned_checkpoint(model, entry))

    if stopped and not results:
        raise stopped
    result = results[0] if args.mode != "all" else {
        "checkpoint": os.path.abspath(args.checkpoint), "dataset": args.dataset, "mode": "all", "bn": results[0]["bn"],
        "results": results, "error": stopped and str(stopped), "seconds": time.perf_counter() - start}
    print_table(results)
    written = [fine_tuned_path(out, mode) for mode in modes[:len(results)]] + [out]
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # as the training scripts make --out-dir
        for path, checkpoint in zip(written, fine_tuned):
            save_checkpoint(path, checkpoint)
        write_json(out, result)
    except OSError as e:
        raise UserError(f"cannot write {out} and the fine-tuned models beside it ({e.strerror}); choose another "
                        "--out") from None
    print("", *(f"wrote {path}" for path in written), sep="\n", flush=True)
    if args.tensorboard:
        add_to_tensorboard(results, out)
    # An earlier fine-tuned model of this JSON's name is left (it has its own record, may have cost hours), and said
    for path in earlier_outputs(out, written + [args.checkpoint]):
        print(f"left {path}: a model fine-tuned by an earlier run, not described by {os.path.basename(out)}", flush=True)
    if stopped:
        raise Diverged(f"{stopped}; {' and '.join(modes[:len(results)])}, finished before it, "
                       f"{'is' if len(results) == 1 else 'are'} in {out}")
    return result


if __name__ == "__main__":
    main_guard(main)
