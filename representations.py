"""Clean versus adversarial representations of models as they are: seed 002's analysis.

After Ghofrani, Yaghouti & Jamshidi, "Rethinking Robust Contrastive Learning from the Adversarial Perspective":
minibatch linear CKA maps between the points of a network (stem, its 8 blocks, the pooled feature; --cka-points
all adds every conv, BN and shortcut) on clean and adversarial images (clean x adv, clean x clean, adv x adv;
--cka-eps repeats clean x adv per attack radius), cross-model maps of the first model's points (rows) against
every other model's (columns), a linear probe at every point (--probes), the figures (--plot) and one JSON (--out).

Every MODEL is one of
  - a model kept by eval_linear.py, <json stem>_<mode>.pt: its fine-tuned encoder and classifier, through the BN
    copy it was evaluated with; its adversarial images are PGD-20 against that classifier;
  - a pre-training checkpoint or its run folder: the encoder through --bn. An encoder has no classifier to attack,
    so one is fitted here first: a linear classifier on the frozen encoder with SLF's settings and seed (what
    eval_linear.py --mode slf trains, not kept); its adversarial images are PGD-20 against encoder + that
    classifier. The JSON names the choice per model under "attacked".
Nothing else is trained, except the probes of --probes: fine-tune once with eval_linear.py (it keeps every model)
and map the kept models here as often as needed. This file imports eval_linear.py, never the other way round.

    python eval_linear.py runs/acl_cifar10_0_<time>/ --mode all           # keeps eval_all_cifar10_{slf,alf,aff}.pt
    python representations.py runs/acl_cifar10_0_<time>/eval_all_cifar10_slf.pt --plot       # within-model maps
    python representations.py AT_slf.pt ST_slf.pt --labels AT ST --plot                      # + cross-model maps
    python representations.py AT_slf.pt AT_alf.pt AT_aff.pt --plot                           # AT vs PAT vs FAT
    python representations.py AT_slf.pt --probes --cka-eps 2 4 8 16 --plot                  # probes, eps effect
    python representations.py checkpoint.pt --dataset synthetic --test-size 64 --cka-samples 64 --epochs 1
"""
import argparse
import importlib.util
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn as nn

from common import BasicBlock, DATASETS, DualBN, UserError, autocast, eval_loader, pgd_attack
from machinery import (DefaultsHelpFormatter, atomic_file, check_attack_flags, check_finite, check_fit_flags,
                       check_outputs, check_ranges, check_replaced, checkpoint_file, default_workers, given_flags,
                       main_guard, pick_device, write_json)
from eval_linear import (MODE_DEFAULTS, Classifier, _gram, correct_per_image, dataset_classes, earlier_outputs, fine_tune,
                         load_encoder, only_clean_bn_trained, print_values, print_wrapped, representation_similarity,
                         resolve_data, say_if_one_step)

SLF = MODE_DEFAULTS["slf"]  # the fitted classifiers' and the probes' settings (eval_linear.py's SLF)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    a = parser.add_argument
    a("models", nargs="+", metavar="MODEL", help="models kept by eval_linear.py (<json stem>_<mode>.pt), pre-training "
      "checkpoints or their run folders; the first gives the rows of the cross-model maps")
    a("--bn", default=None, choices=["adv", "clean"], help="BN copy of every pre-training checkpoint's encoder (a kept "
      "model uses its own; default: adv, clean for supervised.py --eps 0, whose adversarial BN is never trained)")
    a("--dataset", default=None, choices=DATASETS, help="test images (and the training images of fitted classifiers "
      "and probes); 'synthetic' is for tests only (default: the first model's, else cifar10)")
    a("--data-dir", default=None, help="where datasets are read from (and downloaded to on first use) (default: the "
      "first model's for its own dataset, else ./data)")
    a("--image-size", type=int, default=None, help="input size in px (default: the first model's)")
    a("--eps", type=float, default=8, help="L-inf radius of the attack, in /255 units")
    a("--pgd-alpha", type=float, default=None, help="step size of the PGD attacks, in /255 units (default: a quarter "
      "of each attack's radius, --eps and every --cka-eps: 2 at eps 8, the papers' step)")
    a("--pgd-steps", type=int, default=20, help="steps of the PGD attack")
    a("--cka-samples", type=int, default=1000, help="test images of the maps (the first ones)")
    a("--cka-points", default="blocks", choices=["blocks", "all"], help="points of the maps and probes: stem, the 8 "
      "blocks, pooled; 'all' adds every conv, BN and shortcut")
    a("--cka-eps", type=float, nargs="+", default=None, help="repeat the first model's clean x adv map at each attack "
      "radius, in /255 (default: --eps)")
    a("--test-batch-size", type=int, default=512, help="batch of the test passes: the maps' minibatches")
    a("--probes", action="store_true", help="a linear probe at every point of the first model: clean and adversarial "
      "accuracy")
    a("--probe-features", default="flatten", choices=["flatten", "pool"], help="probe input: the point's flattened "
      "map, or its global average pool")
    a("--probe-attack", default="fixed", choices=["fixed", "probe"], help="adversarial probe images: PGD made once "
      "against the first model's classifier, or against each probe")
    a("--probe-epochs", type=int, default=30, help="training epochs of each probe")
    a("--epochs", type=int, default=SLF["epochs"], help="training epochs of the classifier fitted on a pre-training "
      "checkpoint's encoder")
    a("--batch-size", type=int, default=SLF["batch_size"], help="training batch of fitted classifiers and probes")
    a("--lr", type=float, default=SLF["lr"], help="initial learning rate of fitted classifiers and probes")
    a("--milestones", type=int, nargs="+", default=SLF["milestones"], help="epochs after which their lr is x0.1")
    a("--momentum", type=float, default=0.9, help="their SGD momentum")
    a("--weight-decay", type=float, default=2e-4, help="their SGD weight decay")
    a("--train-size", type=int, default=None, help="use only the first N training images (quick runs)")
    a("--test-size", type=int, default=None, help="use only the first N test images (quick runs)")
    a("--plot", action="store_true", help="PNG figures of the maps and probe accuracies next to the JSON "
      "(needs matplotlib)")
    a("--labels", nargs="+", default=None, metavar="LABEL", help="the models' names in figures and tables, one per "
      "model (default: method, mode and pre-training eps, e.g. 'acl+slf, eps 8/255')")
    a("--seed", type=int, default=0, help="random seed (data order, attack starts); each fit and probe starts from it")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run; auto picks CUDA when available")
    a("--workers", type=int, default=default_workers(), help="data-loader worker processes (0 = load in the main process)")
    a("--no-amp", action="store_true", help="CUDA: fp32 instead of bf16 autocast (the CPU always uses fp32)")
    a("--out", default=None, help="JSON file for the results (default: <first model without .pt>_representations_"
      "<dataset>.json)")
    args = parser.parse_args(argv)
    args.given = given_flags(parser, argv)  # for check_flags_used
    check_finite(args)
    args.models = [checkpoint_file(path) for path in args.models]
    check_ranges(args)
    if args.pgd_alpha is None:
        args.pgd_alpha = args.eps / 4
    check_attack_flags(args.eps, args.pgd_alpha, args.pgd_steps)
    check_fit_flags(args)
    if args.cka_samples < 4:
        raise UserError(f"--cka-samples must be at least 4 (got {args.cka_samples}): the unbiased CKA estimator "
                        "needs n > 3 images")
    if args.test_batch_size < 4:
        raise UserError(f"--test-batch-size must be at least 4 (got {args.test_batch_size}): the unbiased CKA "
                        "estimator needs n > 3 images per batch")
    if args.cka_eps is not None and not 0 <= min(args.cka_eps) <= max(args.cka_eps) <= 255:
        raise UserError(f"--cka-eps must be in [0, 255] (got {' '.join(f'{e:g}' for e in args.cka_eps)}); it is in "
                        "/255 units, e.g. --cka-eps 2 8")
    if args.labels is not None and len(args.labels) != len(args.models):
        raise UserError(f"--labels takes one label per model, {len(args.models)} here, but {len(args.labels)} were given")
    return args


# Flags that set only the classifier fitted on a pre-training checkpoint's encoder, that classifier and the probes,
# or the probes: given where nothing uses them, they would change nothing; check_flags_used refuses them.
FIT_FLAGS = ["bn", "epochs"]
FIT_AND_PROBE_FLAGS = ["batch_size", "lr", "milestones", "momentum", "weight_decay", "train_size"]
PROBE_FLAGS = ["probe_features", "probe_attack", "probe_epochs"]


def check_flags_used(args, fitted):
    for name in [n for n in FIT_FLAGS + FIT_AND_PROBE_FLAGS + PROBE_FLAGS if n in args.given]:
        flag = "--" + name.replace("_", "-")
        if name in PROBE_FLAGS and not args.probes:
            raise UserError(f"{flag} sets the probes, but --probes was not given; add --probes or drop {flag}")
        if name not in PROBE_FLAGS and not fitted and not (args.probes and name in FIT_AND_PROBE_FLAGS):
            probes = " and the probes (no --probes here)" if name in FIT_AND_PROBE_FLAGS else ""
            raise UserError(f"{flag} sets the classifier fitted on a pre-training checkpoint's encoder{probes}, but "
                            f"every model here is kept by eval_linear.py with its own classifier: {flag} would change "
                            "nothing; drop it")


# ---- Points of a network and the minibatch CKA estimator ------------------------------------
# As in the authors' released code: the estimator below, models in eval mode, clean and adversarial images aligned
# image by image; the probes read flattened features and are scored on PGD images made once against the first model.
CKA_ESTIMATOR = ("minibatch linear CKA with the unbiased HSIC estimator (Nguyen, Raghu & Kornblith, ICLR 2021), "
                 "HSIC sums over test batches in float64, features flattened per image")


class _PointReached(Exception):
    """Raised by a hook to end a forward pass at the point a probe reads."""


def point_features(encoder, x, points="blocks", stop_at=None):
    """{name: output} of the encoder's points for images x, in forward order, through its BN copy. 'blocks': stem
    (the input of layer1.0), layer1.0 ... layer4.1 (block outputs), pooled; 'all' adds every convolution and batch-norm
    output (layerN.0.downsample.bn: a downsampling block's shortcut). `stop_at`: the forward pass ends at that point."""
    model, found, hooks = encoder.model, {}, []

    def keep(name, value):
        found[name] = value
        if name == stop_at:
            raise _PointReached

    hooks.append(model.layer1[0].register_forward_pre_hook(lambda module, inputs: keep("stem", inputs[0])))
    for name, module in model.named_modules():
        if isinstance(module, BasicBlock) or (points == "all" and isinstance(module, (nn.Conv2d, DualBN))):
            hooks.append(module.register_forward_hook(lambda module, inputs, out, name=name: keep(name, out)))
    try:
        keep("pooled", encoder(x))
    except _PointReached:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return found


def unbiased_hsic(k, l):
    """HSIC_1 of every pair of Gram matrices k[p], l[q] (stacks P x n x n and Q x n x n, n > 3) -> P x Q.
    With K~, L~ the Gram matrices with their diagonals set to 0 (Song et al., JMLR 2012):
    HSIC_1 = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))."""
    n = k.shape[-1]
    off_diagonal = 1 - torch.eye(n, dtype=k.dtype, device=k.device)
    k, l = k * off_diagonal, l * off_diagonal
    trace = k.flatten(1) @ l.flatten(1).T  # tr(K~ L~) = sum_ij K~_ij L~_ij for symmetric matrices
    sums = k.sum((1, 2))[:, None] * l.sum((1, 2))[None, :] / ((n - 1) * (n - 2))
    cross = k.sum(2) @ l.sum(2).T  # 1^T K~ L~ 1 = (K~ 1) . (L~ 1)
    return (trace + sums - 2 / (n - 2) * cross) / (n * (n - 3))


class CKAMaps:
    """Minibatch linear CKA between named sets of points, accumulated batch by batch in float64 (memory does
    not grow with the number of images). For the points i of set a and j of set b:
        CKA_ij = sum_b HSIC_1(K_bi, L_bj) / sqrt(sum_b HSIC_1(K_bi, K_bi) sum_b HSIC_1(L_bj, L_bj))."""

    def __init__(self, pairs):
        self.pairs = list(dict.fromkeys(list(pairs) + [(a, a) for pair in pairs for a in pair]))
        self.sums, self.samples = {}, 0

    def add(self, grams):
        """grams: {set name: P x n x n Gram matrices of one batch, X X^T of the flattened features}."""
        for a, b in self.pairs:
            self.sums[a, b] = self.sums.get((a, b), 0) + unbiased_hsic(grams[a], grams[b])
        self.samples += next(iter(grams.values())).shape[-1]

    def map(self, a, b):
        norm_a, norm_b = self.sums[a, a].diagonal(), self.sums[b, b].diagonal()
        return self.sums[a, b] / torch.sqrt(norm_a[:, None] * norm_b[None, :])


def _point_grams(encoder, images, points, amp):
    with torch.no_grad(), autocast(amp):
        features = point_features(encoder, images, points)
    return torch.stack([_gram(f.float()) for f in features.values()])


# ---- Models as they are, and what is attacked -----------------------------------------------
def model_label(method, run_args, path, mode=None):
    """How tables and figures name a model: its method (+ the mode it was fine-tuned in) and the pre-training eps it
    records, e.g. 'acl+slf, eps 8/255' or 'acl+slf, eps 0' (a standard encoder); a released file: its file name."""
    name = (method or os.path.basename(path)) + (f"+{mode}" if mode else "")
    eps = (run_args or {}).get("eps")
    if eps is None:
        return name
    return f"{name}, eps {eps:g}/255" if eps else f"{name}, eps 0"


def kept_part(checkpoint, path, feature_dim):
    """What a kept model (eval_linear.fine_tuned_checkpoint, as read into encoder.fine_tuned) adds to its backbone:
    {'weight', 'bias', 'bn', 'num_classes', 'record'}, checked; None for a pre-training checkpoint."""
    if checkpoint is None:
        return None
    state = checkpoint.get("model") if isinstance(checkpoint.get("model"), dict) else {}
    weight, bias = state.get("classifier.weight"), state.get("classifier.bias")
    num_classes = checkpoint.get("num_classes")
    if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor) and isinstance(num_classes, int)
            and weight.shape == (num_classes, feature_dim) and bias.shape == (num_classes,)
            and torch.isfinite(weight).all() and torch.isfinite(bias).all()
            and checkpoint.get("bn") in ("adv", "clean") and isinstance(checkpoint["fine_tune"], dict)):
        raise UserError(f"{path} is a fine-tuned file whose classifier, BN copy or record is missing or damaged; "
                        "fine-tune its pre-training checkpoint again")
    return {"weight": weight, "bias": bias, "bn": checkpoint["bn"], "num_classes": num_classes,
            "record": checkpoint["fine_tune"]}


def check_kept_model_data(path, part, dataset, image_size, num_classes):
    """A kept model (kept_part) is mapped on the data it was fine-tuned on: its classifier knows those classes at
    that size, and an attack through it on other images (the same class count or not) would mean nothing."""
    if not part:
        return
    record = part["record"]
    fine_tuned = (record.get("dataset", dataset), record.get("image_size", image_size))  # older records: unknown
    if fine_tuned != (dataset, image_size) or part["num_classes"] != num_classes:
        raise UserError(f"{path} was fine-tuned on {fine_tuned[0]} at {fine_tuned[1]} px ({part['num_classes']} "
                        f"classes), but this run maps {dataset} at {image_size} px ({num_classes} classes); its "
                        f"classifier knows only its own images: map models fine-tuned on the same data")


def fine_tuned_model(encoder):
    """The model a fine-tuned file holds, as it was evaluated: its encoder through the BN copy its classifier was
    trained with, and that classifier (encoder.fine_tuned: kept_part's)."""
    part = encoder.fine_tuned
    model = Classifier(encoder, part["num_classes"])
    model.encoder.adv = part["bn"] == "adv"
    model.fc.load_state_dict({"weight": part["weight"], "bias": part["bias"]})
    return model


def fit_slf(model, epochs, label, args, image_size, device, amp, memory_format):
    """Train `model`'s linear layer as SLF for `epochs` with the flags' settings, which it returns."""
    settings = dict(epochs=epochs, batch_size=args.batch_size, lr=args.lr, milestones=args.milestones,
                    momentum=args.momentum, weight_decay=args.weight_decay)
    loader = eval_loader(args.dataset, args.data_dir, "train", image_size, args.batch_size, args.workers, device,
                         args.seed, subset=args.train_size)
    say_if_one_step(loader, "--batch-size")
    fine_tune(model, "slf", loader, dict(settings, label=label), args, device, amp, memory_format)
    return settings


def attacked_model(path, encoder, label, args, num_classes, image_size, device, amp, memory_format):
    """(encoder + classifier, its record): a kept model as it is, or a pre-training encoder with a linear classifier
    fitted here with SLF's settings and seed (the classifier eval_linear.py --mode slf trains; not kept)."""
    record = {"checkpoint": os.path.abspath(path), "label": label, "method": encoder.method, "width": encoder.width,
              "fine_tuned": bool(encoder.fine_tuned)}
    if encoder.fine_tuned:
        model = fine_tuned_model(encoder).to(device, memory_format=memory_format)
        record.update(mode=encoder.fine_tuned["record"].get("mode"), bn=encoder.fine_tuned["bn"], fitted=None,
                      attacked="its own classifier, fine-tuned and kept by eval_linear.py")
        print(f"{path}: {label}; kept by eval_linear.py, attacked through its own classifier", flush=True)
        return model, record
    print(f"{path}: {label}; attacked through a linear classifier fitted here (SLF)", flush=True)
    torch.manual_seed(args.seed)  # as eval_linear.py before each mode: the same classifier as its SLF
    model = Classifier(encoder, num_classes).to(device, memory_format=memory_format)
    settings = fit_slf(model, args.epochs, "slf", args, image_size, device, amp, memory_format)
    record.update(mode="slf", bn="adv" if encoder.adv else "clean", fitted=settings,
                  attacked="a linear classifier fitted here on the frozen encoder with SLF's settings (not kept)")
    return model, record


# ---- The maps and the probes ----------------------------------------------------------------
def step_at(args, eps):
    """The PGD step at radius eps (both in /255): --pgd-alpha when given, else eps / 4 (so --cka-eps 2 8 steps 0.5, 2)."""
    return args.pgd_alpha if "pgd_alpha" in args.given else eps / 4


def analysis_pass(model, compared, loader, args, device, amp, memory_format):
    """One pass over the test images. Each batch gets PGD images against the first model's classifier, returned (one
    CPU tensor per batch) for the per-stage diagonal and the fixed-attack probes; the first --cka-samples images add to
    the maps: the first model on clean and PGD images and PGD at each --cka-eps; each compared model on the clean, the
    first model's PGD and its own PGD images. A batch of fewer than 4 images is left out (the estimator: n > 3)."""
    eps, alpha = args.eps / 255, args.pgd_alpha / 255
    radii = [e for e in args.cka_eps or [] if e != args.eps]
    pairs = [("clean", "adv"), ("clean", "clean"), ("adv", "adv")] + [("clean", f"adv@{e:g}") for e in radii]
    for i in range(len(compared)):
        pairs += [("clean", f"{i}:clean"), ("adv", f"{i}:adv"), (f"{i}:clean", f"{i}:own_adv")]
    maps = CKAMaps(pairs)
    adversarial, seen = [], 0
    for x, y in loader:
        if seen >= args.cka_samples and not (args.probes and args.probe_attack == "fixed"):
            break
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        x_adv = pgd_attack(model, x, y, eps, alpha, args.pgd_steps, amp)
        adversarial.append(x_adv.cpu())
        n = min(len(x), args.cka_samples - seen)
        seen += len(x)
        if n < 4:
            continue
        x, y, x_adv = x[:n], y[:n], x_adv[:n]
        grams = {"clean": _point_grams(model.encoder, x, args.cka_points, amp),
                 "adv": _point_grams(model.encoder, x_adv, args.cka_points, amp)}
        for e in radii:
            x_eps = pgd_attack(model, x, y, e / 255, step_at(args, e) / 255, args.pgd_steps, amp)
            grams[f"adv@{e:g}"] = _point_grams(model.encoder, x_eps, args.cka_points, amp)
        for i, other in enumerate(compared):
            x_own = pgd_attack(other, x, y, eps, alpha, args.pgd_steps, amp)
            for key, images in (("clean", x), ("adv", x_adv), ("own_adv", x_own)):
                grams[f"{i}:{key}"] = _point_grams(other.encoder, images, args.cka_points, amp)
        maps.add(grams)
    return adversarial, maps


class PointFeatures(nn.Module):
    """The frozen encoder up to one point (the forward pass stops there), its output flattened per image
    or globally average-pooled."""

    def __init__(self, encoder, point, features="flatten"):
        super().__init__()
        self.encoder, self.point, self.features = encoder, point, features

    def forward(self, x):
        out = point_features(self.encoder, x, "all", stop_at=self.point)[self.point]
        return out.mean((2, 3)) if self.features == "pool" and out.ndim == 4 else out.flatten(1)


class Probe(Classifier):
    """A linear probe at one point: Classifier on PointFeatures, so fine_tune trains it as SLF and correct_per_image
    scores it; at 'pooled' it is Classifier itself, up to the names of its modules."""

    def __init__(self, encoder, point, features, num_classes, image_size):
        points, device = PointFeatures(encoder, point, features), next(encoder.parameters()).device
        with torch.no_grad():
            dim = points(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1]
        super().__init__(points, num_classes, dim)

    def forward(self, x):  # the point's own BN copy: no `adv`
        return self.fc(self.encoder(x))


def probe_accuracies(model, names, adversarial, test_loader, num_classes, image_size, args, device, amp, memory_format):
    """A probe at every point of the first model's encoder (SLF's settings, --probe-epochs): {point: {clean,
    adversarial}}, scored on the fixed PGD images or by attacking each probe."""
    accuracy = {}
    for point in names:
        torch.manual_seed(args.seed)  # as each fit: the probe at 'pooled' of a fitted model repeats its classifier
        probe = Probe(model.encoder, point, args.probe_features, num_classes, image_size).to(device)
        settings = fit_slf(probe, args.probe_epochs, f"probe {point}", args, image_size, device, amp, memory_format)
        clean, robust = correct_per_image(probe, test_loader, device, args.eps / 255, args.pgd_alpha / 255,
                                          args.pgd_steps, amp, memory_format,
                                          adversarial if args.probe_attack == "fixed" else None)
        accuracy[point] = {"clean": clean.float().mean().item(), "adversarial": robust.float().mean().item()}
    return {"points_mode": args.cka_points, "features": args.probe_features, "attack": args.probe_attack, **settings,
            "accuracy": accuracy}


# ---- Tables and figures ---------------------------------------------------------------------
def print_analysis(result):
    """The tables on stdout; the JSON has the same numbers. Each CKA table names its estimator."""
    cka, label = result["cka"], result["model"]["label"]
    print(f"\nfull-batch linear CKA per stage, clean vs PGD images ({label}; {cka['samples']} images at once):")
    print_values(cka["linear_cka"])
    print(f"  mean cosine similarity of the pooled features, clean vs PGD: {cka['pooled_cosine']:.3f}")
    print(f"\nminibatch linear CKA (unbiased HSIC; batches of {cka['batch_size']}, {cka['map_samples']} images), "
          "diagonal of the clean x adv map:")
    diagonals = [(label, cka["clean_x_adv"])]
    diagonals += [(f"{label}, attack eps {e}/255", matrix)
                  for e, matrix in cka["clean_x_adv_per_eps"].items() if float(e) != cka["eps"]]
    diagonals += [(o["label"], o["own_clean_x_adv"]) for o in result["compare"]]
    for name, matrix in diagonals:
        print(f"  {name}:")
        print_values(dict(zip(cka["points"], np.diag(matrix))), indent="    ")
    for other in result["compare"]:
        print(f"\nminibatch linear CKA, rows {label}, columns {other['label']}, diagonal:")
        print_wrapped([f"{point} {c:.3f} ({a:.3f})" for point, c, a in zip(
            cka["points"], np.diag(other["clean_x_clean"]), np.diag(other["adv_x_adv"]))],
            first="  clean x clean (adv x adv): ", indent="    ")
    if probes := result["probes"]:
        print(f"\nlinear probes ({label}; {probes['features']} features, {probes['attack']} attack): "
              "clean % / adversarial %")
        for point, accuracy in probes["accuracy"].items():
            print(f"  {point:<24} {100 * accuracy['clean']:6.2f} {100 * accuracy['adversarial']:6.2f}")


# The names this program writes beside <stem>.json (plot_analysis's).
FIGURE_SUFFIX = (r"_(?:clean_x_adv(?:_eps[0-9.e+-]+)?|clean_x_clean|adv_x_adv|compare[0-9]+_(?:clean_x_clean"
                 r"|adv_x_adv)|diagonal|stages|probes)\.png")
FIGURE_DPI = 200  # sharp at a paper's column width
DISTANCE_FLOOR = 1e-5  # 1 - CKA below this is drawn at it on the log axis (the title says so)
MARKERS = "osD^v<>phX*" * 10  # one per model: coinciding lines stay visible


def _point_ticks(ax, points, axes="x"):
    every = max(1, math.ceil(len(points) / 16))  # 'all' has about 50 points: label every few
    ticks, labels = list(range(0, len(points), every)), points[::every]
    ax.set_xticks(ticks, labels, rotation=90)
    if axes == "xy":
        ax.set_yticks(ticks, labels)


def plot_analysis(result, out):
    """PNG figures next to the JSON `out`, titled with their estimator and the models' labels: a heatmap per minibatch
    CKA map (0..1); every model's clean-vs-adversarial diagonal and the full-batch per-stage CKA as 1 - CKA on a log
    axis (0.993 against 0.984 is a factor of 2 there, two coinciding lines on 0..1); the probe accuracies in percent."""
    import matplotlib.pyplot as plt  # main() chose the Agg backend

    base, label, written = os.path.splitext(out)[0], result["model"]["label"], []
    along = "point of the network (input to output)"

    def save(fig, suffix):
        path = f"{base}_{suffix}.png"
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    def heatmap(suffix, title, matrix, points, ylabel, xlabel):
        fig, ax = plt.subplots(figsize=(5.6, 4.8))
        image = ax.imshow(np.array(matrix), vmin=0, vmax=1, cmap="magma", origin="lower")
        _point_ticks(ax, points, "xy")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        fig.colorbar(image, ax=ax, label="minibatch linear CKA")
        save(fig, suffix)

    def distance_lines(suffix, title, points, curves, xlabel=along):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        clipped = False
        for (name, values), marker in zip(curves, MARKERS):
            distance = 1 - np.asarray(values, dtype=float)
            clipped |= bool((distance < DISTANCE_FLOOR).any())
            ax.plot(range(len(points)), np.maximum(distance, DISTANCE_FLOOR), marker=marker, label=name)
        ax.set_yscale("log")
        _point_ticks(ax, points)
        floor = f"; values under {DISTANCE_FLOOR:g} drawn at {DISTANCE_FLOOR:g}" if clipped else ""
        ax.set(xlabel=xlabel, ylabel="1 - CKA(clean, adversarial), log scale", title=title + floor)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="lower: less changed by the attack")
        save(fig, suffix)

    with plt.rc_context({"font.size": 10, "axes.titlesize": 10, "legend.fontsize": 9, "xtick.labelsize": 8,
                         "ytick.labelsize": 8}):
        cka, points = result["cka"], result["cka"]["points"]
        minibatch = f"minibatch linear CKA (unbiased HSIC), {cka['map_samples']} images"
        attack = f"PGD-{result['pgd_steps']} at eps {cka['eps']:g}/255"
        for key in ("clean_x_adv", "clean_x_clean", "adv_x_adv"):
            rows, columns = ("clean" if k == "clean" else "adversarial" for k in key.split("_x_"))
            heatmap(key, f"{label}\n{rows} x {columns} images\n{minibatch}", cka[key], points,
                    f"{rows} images", f"{columns} images")
        if len(cka["clean_x_adv_per_eps"]) > 1:
            for e, matrix in cka["clean_x_adv_per_eps"].items():
                heatmap(f"clean_x_adv_eps{e}", f"{label}\nclean x adversarial images (eps {e}/255)\n{minibatch}",
                        matrix, points, "clean images", f"adversarial images (eps {e}/255)")
        for i, other in enumerate(result["compare"]):
            for key, kind in (("clean_x_clean", "clean"), ("adv_x_adv", "adversarial")):
                heatmap(f"compare{i}_{key}", f"rows: {label}\ncolumns: {other['label']}\n{kind} images\n{minibatch}",
                        other[key], points, f"{label}, {kind} images", f"{other['label']}, {kind} images")
        curves = [(label, np.diag(cka["clean_x_adv"]))]
        curves += [(o["label"], np.diag(o["own_clean_x_adv"])) for o in result["compare"]]
        distance_lines("diagonal", f"Clean vs adversarial images, diagonal of the clean x adversarial map\n"
                       f"{minibatch}; {attack}, each model through its own classifier", points, curves)
        distance_lines("stages", f"Clean vs adversarial images per stage: full-batch linear CKA\n"
                       f"{cka['samples']} test images at once; {attack}", list(cka["linear_cka"]),
                       [(label, list(cka["linear_cka"].values()))], "stage of the network (input to output)")
        if probes := result["probes"]:
            fixed = "made once against the first model" if probes["attack"] == "fixed" else "against each probe"
            fig, ax = plt.subplots(figsize=(7.5, 4.5))
            for kind, marker, style in (("clean", "o", "-"), ("adversarial", "s", "--")):
                ax.plot(range(len(probes["accuracy"])), [100 * a[kind] for a in probes["accuracy"].values()],
                        marker=marker, linestyle=style, label=f"{kind} test images")
            _point_ticks(ax, list(probes["accuracy"]))
            ax.set_ylim(0, 100)
            ax.set(xlabel=along, ylabel="probe accuracy (%)", title=f"{label}: a linear probe at each point "
                   f"({probes['features']} features)\nadversarial images: PGD-{result['pgd_steps']} {fixed}")
            ax.grid(True, alpha=0.3)
            ax.legend()
            save(fig, "probes")
    return written


# ---- Main -----------------------------------------------------------------------------------
def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    # Everything that can fail is checked before the first fit: plotting package, models, flags, data, output.
    if args.plot:  # imported, not only found: an installed but broken matplotlib fails here, not after the work
        if importlib.util.find_spec("matplotlib") is None:
            raise UserError("--plot needs the matplotlib package, which is not installed; run 'pip install matplotlib' "
                            "or drop --plot (the numbers are in the JSON either way)")
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
        except Exception as e:
            raise UserError(f"--plot needs matplotlib, which is installed but cannot be imported ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}); repair it (e.g. "
                            "'pip install --force-reinstall matplotlib') or drop --plot") from None
    device = pick_device(args.device)
    amp = device.type == "cuda" and not args.no_amp  # bf16 autocast for the network, losses in fp32
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    encoders = [load_encoder(path, args.bn or "adv") for path in args.models]
    first = encoders[0]
    for path, encoder in zip(args.models, encoders):
        encoder.fine_tuned = kept_part(encoder.fine_tuned, path, encoder.model.feature_dim)
        if encoder.stem != first.stem:  # the same input images for every model: the stems must agree
            raise UserError(f"{path} has the {encoder.stem} stem but {args.models[0]} the {first.stem} stem; compare "
                            "models made for the same image size")
        if not encoder.fine_tuned and args.bn is None and only_clean_bn_trained(encoder, "slf"):
            encoder.adv = False
    check_flags_used(args, fitted=not all(encoder.fine_tuned for encoder in encoders))
    # --dataset and --data-dir default to the first model's (a kept model's: the data it was fine-tuned on)
    recorded = dict(first.run_args or {}, **({"dataset": first.fine_tuned["record"]["dataset"]}
                                             if first.fine_tuned and first.fine_tuned["record"].get("dataset") else {}))
    data = resolve_data(args, recorded)
    out = args.out or f"{os.path.splitext(args.models[0])[0]}_representations_{args.dataset}.json"
    # nothing written overwrites a model read or a run's file; the JSON replaces only our report on the same model
    figure = re.compile(re.escape(os.path.splitext(os.path.abspath(out))[0]) + FIGURE_SUFFIX)
    check_outputs([out] + [path for path in args.models if args.plot and figure.fullmatch(os.path.abspath(path))],
                  args.models)
    replaced = check_replaced(out, "representations.py", args.models[0], out) or {}  # its figures: removed below
    image_size = args.image_size or first.image_size
    num_classes = dataset_classes(args.dataset, args.data_dir)
    for path, encoder in zip(args.models, encoders):
        check_kept_model_data(path, encoder.fine_tuned, args.dataset, image_size, num_classes)
    labels = args.labels or [model_label(e.method, e.run_args, path, None if e.fine_tuned else "slf")
                             for path, e in zip(args.models, encoders)]
    # models recording the same method and eps (two seeds; a model and itself), or given one label twice: numbered
    labels = [f"{name} ({i + 1})" if labels.count(name) > 1 else name for i, name in enumerate(labels)]
    test_loader = eval_loader(args.dataset, args.data_dir, "test", image_size, args.test_batch_size, args.workers,
                              device, args.seed, subset=args.test_size)
    if len(test_loader.dataset) < 4:
        raise UserError(f"the maps need at least 4 test images (the unbiased CKA estimator needs n > 3), but only "
                        f"{len(test_loader.dataset)} are used (--test-size, or the {args.dataset} test split); use more")
    print(f"{len(args.models)} model{'s' * (len(args.models) > 1)} on {data} at {image_size} px, {num_classes} classes, "
          f"{len(test_loader.dataset)} test images ({device.type}{', bf16' if amp else ''})", flush=True)
    print(f"attack: PGD-{args.pgd_steps} through each model's classifier, eps {args.eps:g}/255, step size "
          f"{args.pgd_alpha:g}/255", flush=True)
    if radii := [f"{e:g}/255 step size {step_at(args, e):g}/255" for e in args.cka_eps or [] if e != args.eps]:
        print_wrapped(radii, first="--cka-eps also attacks at ", sep=", ", indent="  ")

    attacked = [attacked_model(path, encoder, label, args, num_classes, image_size, device, amp, memory_format)
                for path, encoder, label in zip(args.models, encoders, labels)]
    (model, *compared), records = zip(*attacked)
    torch.manual_seed(args.seed)  # the attacks' random starts do not depend on which models were fitted
    adversarial, maps = analysis_pass(model, compared, test_loader, args, device, amp, memory_format)
    with torch.no_grad():  # the names of the points, in forward order
        names = list(point_features(model.encoder, torch.zeros(1, 3, image_size, image_size, device=device),
                                    args.cka_points))
    cka = representation_similarity(model, test_loader, args.cka_samples, device, args.eps / 255, args.pgd_alpha / 255,
                                    args.pgd_steps, amp, memory_format, records[0]["mode"], adversarial)
    per_eps = {f"{e:g}": maps.map("clean", "adv" if e == args.eps else f"adv@{e:g}").tolist()
               for e in args.cka_eps or [args.eps]}
    steps = {f"{e:g}": step_at(args, e) for e in args.cka_eps or [args.eps]}
    cka.update({"estimator": CKA_ESTIMATOR, "points_mode": args.cka_points, "points": names,
                "map_samples": maps.samples, "batch_size": args.test_batch_size, "eps": args.eps,
                "clean_x_adv": maps.map("clean", "adv").tolist(), "clean_x_clean": maps.map("clean", "clean").tolist(),
                "adv_x_adv": maps.map("adv", "adv").tolist(), "clean_x_adv_per_eps": per_eps,
                "pgd_alpha_per_eps": steps})
    # rows: the first model's points; columns: the other model's
    compare = [dict(record, clean_x_clean=maps.map("clean", f"{i}:clean").tolist(),
                    adv_x_adv=maps.map("adv", f"{i}:adv").tolist(),
                    own_clean_x_adv=maps.map(f"{i}:clean", f"{i}:own_adv").tolist())
               for i, record in enumerate(records[1:])]
    probes = probe_accuracies(model, names, adversarial, test_loader, num_classes, image_size, args, device, amp,
                              memory_format) if args.probes else None
    result = {"model": records[0], "compare": compare, "dataset": args.dataset, "image_size": image_size,
              "num_classes": num_classes, "test_images": len(test_loader.dataset), "eps": args.eps,
              "pgd_alpha": args.pgd_alpha, "pgd_steps": args.pgd_steps, "seed": args.seed, "device": device.type,
              "amp": amp, "cka": cka, "probes": probes, "out": os.path.abspath(out), "figures": [],
              "seconds": time.perf_counter() - start}

    print_analysis(result)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # as eval_linear.py makes --out's folder
        write_json(out, result)
        print(f"\nwrote {out}", flush=True)
        figures = plot_analysis(result, out) if args.plot else []
        if figures:  # recorded, so that a later run of this --out removes exactly these (below)
            result["figures"] = [os.path.basename(path) for path in figures]
            write_json(out, result)
    except OSError as e:
        raise UserError(f"cannot write {out} and the figures beside it ({e.strerror}); choose another --out") from None
    for path in figures:
        print(f"wrote {path}", flush=True)
    # The figures the replaced JSON recorded that this run did not redraw would no longer match the JSON: removed.
    # Only those: a file this program did not write, even one named like a figure, is never removed.
    recorded = {os.path.basename(name) for name in replaced.get("figures") or []}
    for path in earlier_outputs(out, figures + args.models, FIGURE_SUFFIX):
        if os.path.basename(path) in recorded and os.path.isfile(path):
            os.remove(path)
            print(f"removed {path}: an earlier run's figure that {os.path.basename(out)} no longer describes", flush=True)
    return result


if __name__ == "__main__":
    main_guard(main)
