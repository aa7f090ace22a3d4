"""The run machinery around common.py's science, for the six scripts: flags and their checks, resume, checkpoints,
output guards, signals, the non-finite watch, logging, the benchmark, CPU threads, torchrun, and `main_guard`. A reader
of a method file may trust it and skip it; common.py never imports it."""
import argparse
import atexit
import contextlib
import gc
import importlib.util
import json
import math
import os
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from common import DATASETS, DEFAULT_IMAGE_SIZE, NATIVE_SIZE, UserError, _first_missing_folder, rank_and_world

# PyTorch 2.14 deprecates DDP's broadcast_buffers and torch.distributed.nn.functional.all_gather; both
# work as documented, and their replacements are private or missing in the older versions we support.
warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)


def fail(message, status=2, everywhere=False):
    """One sentence on stderr, then exit; everywhere=True: every torchrun process exits here, together."""
    if os.environ.get("LOCAL_RANK", "0") == "0":  # under torchrun: one message per node, not one per process
        print(f"error: {message}", file=sys.stderr, flush=True)
    if everywhere:
        barrier()  # none exits (and has torchrun stop the rest) before the sentence is said
    sys.exit(status)


def main_guard(main):
    """Run main(); a UserError becomes one sentence on stderr and its exit status (no traceback)."""
    try:
        main()
    except UserError as e:
        fail(str(e), e.status)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Loader workers ignore SIGTERM (common._worker_init), with which multiprocessing ends them at exit, so a loader alive
# at exit would hang the program; matplotlib's mathtext (log-axis labels) keeps one past main() in reference cycles
# freed after the exit hooks. Registered after torch's and multiprocessing's hooks, this one runs before them.
@atexit.register
def _end_loader_workers():
    for loader in [obj for obj in gc.get_objects() if issubclass(type(obj), DataLoader)]:
        loader._iterator = None  # which ends its workers


# --- Flags and their checks, resume ----------------------------------------------------------------------------

def default_workers():
    return min(8, os.cpu_count() or 1)


def check_data_dir_is_read(dataset):
    if dataset in ("digits", "synthetic"):
        where = "built in (digits.npz next to common.py)" if dataset == "digits" else "generated, for tests"
        raise UserError(f"--data-dir is not read with --dataset {dataset}, whose images are {where}; drop --data-dir "
                        "or choose the dataset that folder holds")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows every default that is a value ("(default: 512)"); None and off switches show none."""

    def _get_help_string(self, action):
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return action.help
        return action.help + " (default: %(default)s)"


def add_shared_flags(parser):
    """The flags of every training script, in one order and wording: a diff of two method files shows the method."""
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
    a("--pgd-alpha", type=float, default=None, help="step size of the pre-training PGD attack, in /255 units "
      "(default: eps / 4, 2 at the default --eps 8)")
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
    a("--compile", action="store_true", help="torch.compile the network (experimental: measured once on one H200, "
      "before the batched views; docs/speed.md)")
    a("--benchmark", action="store_true", help="with --max-steps: also time the data loader alone and print a summary")
    a("--tensorboard", action="store_true", help="also write the logged scalars as TensorBoard event files into the "
      "run folder (needs the tensorboard package; a resume keeps it)")


# Arguments a resume may change (a resumed run continues in its own folder: --out-dir can only name it); every other
# one belongs to the run. Of those, the run's length, cadence and data folder are the checkpoint's unless given again:
# a resumed run ends, logs and saves where the interrupted one would have, and reads its data where it did.
RESUMABLE = {"resume", "max_steps", "log_every", "save_every", "workers", "device", "no_amp", "compile",
             "benchmark", "out_dir", "data_dir", "tensorboard"}
KEPT_ON_RESUME = {"max_steps", "log_every", "save_every", "data_dir", "tensorboard"}
# What a run from before a flag existed ran with, where that is not the flag's default (--augment's None is resolved
# when a run starts; a checkpoint from before the flag resumes with PIL, pretrain_loader).
BEFORE_THE_FLAG = {"augment": "pil"}


def given_flags(parser, argv):
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions})
    parser.parse_args(argv, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not unset}


def check_finite(args):
    """Every float flag (or list of them) is finite: NaN passes every range check, and inf every lower bound."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number (got {v})")


# The range of every number flag of the six scripts, as the sentence that refuses a value outside it (the value
# fills {}). check_ranges applies the entries of the flags a script has; a flag left at None is not checked.
AT_LEAST_1 = (lambda v: v >= 1, "must be at least 1 (got {})")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0 (got {})")
POSITIVE = (lambda v: v > 0, "must be positive (got {})")
RANGES = {
    **dict.fromkeys(["epochs", "width", "log_every", "max_steps", "batch_size", "test_batch_size", "train_size",
                     "test_size", "probe_epochs", "lpaft_probe_epochs", "lpaft_epochs", "lpaft_batch_size",
                     "kmeans_restarts"], AT_LEAST_1),
    **dict.fromkeys(["pgd_steps", "train_pgd_steps", "weight_decay", "warmup_epochs", "workers", "save_every",
                     "trades_beta", "lpaft_weight_decay", "lambda1", "lambda2", "ip_weight"], NON_NEGATIVE),
    **dict.fromkeys(["lr", "temperature", "lpaft_probe_lr", "lpaft_lr"], POSITIVE),
    "eps": (lambda v: 0 <= v <= 255, "must be in [0, 255] (got {:g}); it is in /255 units, e.g. --eps 8"),
    "pgd_alpha": (lambda v: v >= 0, "must be >= 0 (got {:g})"),
    "clean_grad_share": (lambda v: 0 <= v <= 1, "must be in [0, 1] (got {})"),
    "tau_plus": (lambda v: 0 <= v < 1, "must be in [0, 1) (got {})"),
    "momentum": (lambda v: 0 <= v < 1, "must be in [0, 1) (got {})"),
    "image_size": (lambda v: v >= 8, "must be at least 8 (got {})"),
}
# A training batch also holds each image's negatives.
TRAINING_RANGES = {**RANGES, "batch_size": (lambda v: v >= 2, "must be at least 2 (got {}): contrastive losses need "
                                            "other images as negatives, and batch norm needs more than one image")}


def check_ranges(args, ranges=RANGES):
    for name, (in_range, sentence) in ranges.items():
        value = getattr(args, name, None)
        if value is not None and not in_range(value):
            raise UserError(f"--{name.replace('_', '-')} " + sentence.format(value))


def check_fit_flags(args):  # the SGD fits of eval_linear.py and representations.py
    if args.milestones is not None and (min(args.milestones) < 1 or sorted(set(args.milestones)) != args.milestones):
        raise UserError(f"--milestones must be increasing epoch numbers >= 1 (got {' '.join(map(str, args.milestones))})")


def check_package(flag, package):
    if importlib.util.find_spec(package) is None:
        raise UserError(f"--{flag} needs the {package} package, which is not installed; run 'pip install {package}' "
                        f"or drop --{flag}")


def check_attack_flags(eps, alpha, steps, steps_flag="--pgd-steps"):
    if alpha == 0 and eps > 0 and steps > 0:
        raise UserError(f"--pgd-alpha 0 would leave the PGD attack (eps {eps:g}/255, {steps} steps) at its random "
                        f"start; give a positive step in /255 units, e.g. --pgd-alpha 2, or {steps_flag} 0 for the "
                        "random start alone")


# The shared flags that a method does not have (SupCon replaces NT-Xent: a_infonce.py and supervised.py have none).
NOT_IN = {
    "supcon": ({"a_infonce", "supervised"}, "--supcon applies to acl.py and air.py (their NT-Xent terms and attack), "
               "not to {}.py; drop --supcon"),
    "temperature": ({"supervised"}, "--temperature is the contrastive losses' temperature, which {}.py "
                    "(cross-entropy) does not have; drop --temperature"),
    "dynacl": ({"supervised"}, "--dynacl changes the contrastive augmentation and loss weights, which {}.py does not "
               "have; drop --dynacl"),
}


def parse_and_resume(parser, argv, method):
    """Parse and check the command line; with --resume, load and check the checkpoint and take the run's arguments
    from it, refusing a given flag that contradicts it and an --out-dir other than the run's own folder."""
    args, given, checkpoint = parser.parse_args(argv), given_flags(parser, argv), None
    for name in sorted(given & NOT_IN.keys()):
        if method in NOT_IN[name][0]:
            raise UserError(NOT_IN[name][1].format(method))
    check_finite(args)
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
                # both as written on a command line: 8.0 and 8 as 8
                trained, value = (f"{v:g}" if isinstance(v, float) else v for v in (trained, getattr(args, name)))
                raise UserError(f"{args.resume} was trained with {flag} {trained}, but {flag} {value} was given; drop "
                                "the flag to resume, or start a new run")
        run_dir = os.path.dirname(os.path.abspath(args.resume))
        if "out_dir" in given and not _same_file(os.path.dirname(run_dir), args.out_dir):
            raise UserError(f"--out-dir {args.out_dir} cannot move a resumed run: it continues in its own folder "
                            f"{run_dir}; drop --out-dir (or copy the run folder into {args.out_dir} and resume the copy)")
        for name, value in saved.items():
            if hasattr(args, name) and (name not in RESUMABLE or (name in KEPT_ON_RESUME and name not in given)):
                setattr(args, name, value)
    if "data_dir" in given:
        check_data_dir_is_read(args.dataset)
    if args.image_size is None:
        args.image_size = NATIVE_SIZE[args.dataset] or DEFAULT_IMAGE_SIZE[args.dataset]
    if args.pgd_alpha is None:
        args.pgd_alpha = args.eps / 4  # the papers' step: 2/255 at 8/255
    if args.tensorboard:
        check_package("tensorboard", "tensorboard")
    check_ranges(args, TRAINING_RANGES)
    check_attack_flags(args.eps, args.pgd_alpha, args.pgd_steps)
    if args.supcon and args.dataset == "stl10":
        raise UserError("--supcon needs labels, but --dataset stl10 pre-trains on STL-10's unlabelled images; "
                        "use a labelled dataset (cifar10, cifar100, imagefolder, digits) or drop --supcon")
    return args, checkpoint


# Each training method's script; eval_linear.py's files record '<method>++' (--post-process) or '<method>+<mode>'.
SCRIPTS = {"acl": "acl.py", "air": "air.py", "a_infonce": "a_infonce.py", "supervised": "supervised.py"}
# What a resume reads from a training checkpoint (Run), and what each entry must be ('log' may be absent: older
# checkpoints). The weights and the optimiser's state are checked against the network in Run.
INTACT = "resume an intact copy of the checkpoint, or start a new run"  # what to do about a damaged checkpoint
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


def check_resumable(checkpoint, path, method):
    """Only a whole checkpoint of this script's runs resumes; any other file is refused, saying what it is."""
    recorded = checkpoint.get("method") if isinstance(checkpoint, dict) else None
    if recorded != method:
        if recorded in SCRIPTS:
            raise UserError(f"{path} is a checkpoint of {recorded!r} ({SCRIPTS[recorded]}), not of {method!r}; resume "
                            f"it with {SCRIPTS[recorded]}, or start a new run")
        written = isinstance(checkpoint, dict) and ("fine_tune" in checkpoint or "post_process" in checkpoint)
        if written or (isinstance(recorded, str) and "+" in recorded):  # also of a released file
            post_processed = "post_process" in checkpoint if written else recorded.endswith("++")
            what = ("an encoder post-processed by eval_linear.py --post-process" if post_processed
                    else "a model fine-tuned by eval_linear.py")
            raise UserError(f"{path} is {what} (method {recorded!r}), not a training run's checkpoint: it cannot be "
                            "resumed, only evaluated with eval_linear.py")
        recorded = "records no method" if recorded is None else f"records the method {recorded!r}"
        raise UserError(f"{path} is not a checkpoint of this project's training scripts (it {recorded}; a released "
                        "checkpoint, for example): it cannot be resumed, only evaluated with eval_linear.py")
    for key, (fits, what) in RESUMED_ENTRIES.items():
        if key not in checkpoint and key != "log":
            raise UserError(f"{path} is damaged: it has no {key!r} ({what}), so it cannot be resumed; {INTACT}")
        if not fits(checkpoint.get(key)):
            got = f" (got {checkpoint[key]!r})" if key == "step" else ""
            raise UserError(f"{path} is damaged: its {key!r} is not {what}{got}, so it cannot be resumed; {INTACT}")


def checkpoint_file(path):
    if not os.path.isdir(path):
        return path
    if not os.path.isfile(os.path.join(path, "checkpoint.pt")):
        raise UserError(f"{path} is a folder without a checkpoint.pt; give a run folder that has one, or the "
                        "checkpoint file itself")
    return os.path.join(path, "checkpoint.pt")


# --- Device and CPU threads ------------------------------------------------------------------------------------

# OpenMP threads that wait for each other spin: beside another CPU-heavy process, one thread per core slows a run far
# more than its lost share of the CPU (docs/speed.md: 3x to 100x). So the scripts use the cores idle when they start.
TORCH_THREADS = torch.get_num_threads()  # PyTorch's own choice (one per physical core), before any change


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
        return device
    threads, idle = idle_threads()
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    if threads is not None and threads < TORCH_THREADS:
        print(f"CPU: {threads} thread{'s' * (threads > 1)}, not {TORCH_THREADS}: {idle:.1f} of "
              f"{len(os.sched_getaffinity(0))} cores are idle (other processes use the rest); "
              "set OMP_NUM_THREADS to choose", flush=True)
    return device


def read_proc_stat():
    """{CPU index: (idle ticks, all ticks)} since boot, from Linux's /proc/stat (idle includes iowait)."""
    with open("/proc/stat") as f:
        rows = [line.split() for line in f if line.startswith("cpu") and line[3:4].isdigit()]
    # ticks: user, nice, system, idle, iowait, irq, softirq, steal
    return {int(name[3:]): (int(ticks[3]) + int(ticks[4]), sum(map(int, ticks[:8]))) for name, *ticks in rows}


def idle_threads(environ=None, read_stat=None, allowed=None, default=None, interval=0.2):
    """(threads, idle cores): the idle shares of the cores this process may run on over `interval` s, threads =
    max(1, round(idle)) <= PyTorch's default; (None, None) under OMP_NUM_THREADS or where /proc/stat is missing."""
    if "OMP_NUM_THREADS" in (os.environ if environ is None else environ):
        return None, None
    read_stat, default = read_stat or read_proc_stat, default or TORCH_THREADS
    try:
        allowed = os.sched_getaffinity(0) if allowed is None else allowed
        before = read_stat()
        time.sleep(interval)
        after = read_stat()
    except (AttributeError, OSError, ValueError):
        return None, None
    idle = sum((after[cpu][0] - before[cpu][0]) / (after[cpu][1] - before[cpu][1]) if after[cpu][1] > before[cpu][1]
               else 1.0 for cpu in allowed if cpu in before and cpu in after)  # a core with no tick counted is idle
    return min(default, max(1, round(idle))), idle


# --- Output guards of eval_linear.py and representations.py ----------------------------------------------------

# A training run's files and those --post-process writes beside its checkpoint: never a report's name.
RUN_FILES = ("checkpoint.pt", "args.json", "metrics.jsonl", "benchmark.json", "postprocessed.pt", "postprocessed.json")


def _same_file(a, b):
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))  # also a hard link


def check_outputs(paths, inputs, flag="--out", report=True, remedy=None):
    """Before any work, refuse `paths` (report=True: the .json report given to `flag`, then the files beside it) that
    are an input, a folder, a name of RUN_FILES (report=True), or in a folder that cannot be written or made."""
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
        # the folder it is written in, or where its missing folders would be made
        folder = os.path.dirname(_first_missing_folder(os.path.dirname(os.path.abspath(path))) or os.path.abspath(path))
        if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            why = ("it is a folder" if os.path.isdir(path) else
                   f"{folder} is not a folder" if not os.path.isdir(folder) else f"{folder} is not writable")
            raise UserError(f"cannot write {path}: {why}; {remedy}")


def check_replaced(path, script, source, out):
    """An existing `path` (for the report `out`) is replaced only if it is `script`'s output from the same `source`
    (by path, or relative to it when the folder was moved), else refused naming whose it is; returns its record."""
    if not os.path.exists(path):
        return None
    try:  # the record of an earlier report, or of a model eval_linear.py kept (its 'fine_tune' entry)
        if path.endswith(".json"):
            with open(path) as f:
                record = json.load(f)
        else:
            record = load_checkpoint(path)
            record = record.get("fine_tune") if isinstance(record, dict) else None
    except (OSError, ValueError, UserError):
        record = None
    record = record if isinstance(record, dict) else {}
    first = record.get("model")
    if isinstance(record.get("checkpoint"), str) and "mode" in record:
        entry = (record.get("results") or [record])[0]  # --mode all: the first mode's entry names its model
        owner, recorded = "eval_linear.py", record["checkpoint"]
        written_at = entry.get("fine_tuned") if isinstance(entry, dict) else None
    elif isinstance(first, dict) and isinstance(first.get("checkpoint"), str) and "cka" in record:
        owner, recorded, written_at = "representations.py", first["checkpoint"], record.get("out")
    else:
        raise UserError(f"--out {out} would replace {path}, which is not a file of {script} (another program's, or a "
                        "damaged one); choose another --out")
    what = f"{owner}'s report on" if path.endswith(".json") else "a model fine-tuned by eval_linear.py from"
    if owner != script:
        raise UserError(f"--out {out} would replace {path}, {what} {recorded}; {script} does not replace {owner}'s "
                        "files: choose another --out")
    moved = isinstance(written_at, str) and os.path.relpath(recorded, os.path.dirname(written_at)) == \
        os.path.relpath(os.path.abspath(source), os.path.dirname(os.path.abspath(path)))
    if not (moved or _same_file(recorded, source)):
        raise UserError(f"--out {out} would replace {path}, {what} {recorded}, not {source}; an --out replaces only "
                        "what an earlier run wrote from the same input: choose another --out")
    return record


# --- Checkpoints: atomic files, what a resume or an evaluation loads, random state -----------------------------

@contextlib.contextmanager
def atomic_file(path, mode):
    """Write `path` atomically: a temporary file, flushed to disk, renamed over `path`; removed on any failure."""
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
    """`obj` with every tensor in its dicts, lists and tuples on the CPU; containers keep type and attributes."""
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
    """Every .pt file the project writes: its tensors on the CPU (it loads anywhere), written atomically."""
    with atomic_file(path, "wb") as f:
        torch.save(to_cpu(checkpoint), f)


def load_checkpoint(path):
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


def _finite(tensors):
    return all(torch.isfinite(v).all() for v in tensors if isinstance(v, torch.Tensor) and v.is_floating_point())


def check_weights(state, expected, path, network, remedy, optional=("num_batches_tracked",)):
    """Refuse weights `state` that do not fit `expected`, the state dict of `network` (`remedy`: for unexpected keys).
    Keys ending in `optional` may be missing: num_batches_tracked, a BN counter that old checkpoints lack."""
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
    if not _finite(state.values()):
        raise UserError(f"{path} contains NaN or infinite weights; use an earlier checkpoint")


def check_optimizer_state(state, optimizer, path):
    """A checkpoint's optimiser state fits `optimizer` (groups, parameters, each buffer's shape) and is finite."""
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
                        f"be resumed; {INTACT}")
    if not _finite(v for _, v in buffers):
        raise UserError(f"{path} contains NaN or infinite optimiser state; use an earlier checkpoint")


# --- The benchmark of a --max-steps run ---------------------------------------------------------------------------

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Benchmark:
    """Steady-state throughput of a --max-steps run, from the end of a warm-up to the last step, with the peak GPU
    memory and, with --benchmark, the loader's rate alone and one step's FLOPs: is the device or the data the limit?
    `result` holds the numbers of benchmark.json, written and printed in one line at the end."""

    def __init__(self, method, args, device, loader, warmup_steps, world):
        cuda = device.type == "cuda"
        self.device, self.warmup_steps, self.steps_done, self.flop_counter = device, warmup_steps, 0, None
        self.result = {"method": method, "device": torch.cuda.get_device_name() if cuda else "cpu", "timed_steps": 0,
                       "batch_size": args.batch_size, "images_per_s": None, "peak_gpu_memory_gib": None,
                       "loader_images_per_s": None, "loader_images_per_s_per_worker": None, "flops_per_image": None,
                       "tflops_per_s": None}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if args.benchmark:  # this process's loader alone; its rate times the processes (they load side by side) is
            # comparable with the training images/s; per worker: none without workers (--workers 0, --augment batched)
            loader.batch_sampler.set_epoch(1)
            start, images = time.perf_counter(), 0
            for n, batch in enumerate(loader, 1):
                images += len(batch[0])
                if n >= min(50, loader.batch_sampler.batches_per_epoch):
                    break
            synchronize(device)  # --augment batched makes the batches on the device, asynchronously
            rate, workers = images / (time.perf_counter() - start), getattr(loader, "num_workers", 0)
            self.result["loader_images_per_s"] = rate * world
            self.result["loader_images_per_s_per_worker"] = rate / workers if workers else None
        if args.benchmark and not args.compile:  # FlopCounterMode counts eager operations: not a compiled graph's
            # The first step's FLOPs (matrix products, convolutions; attack and backward included) per image this
            # process trains on; counting slows that step, a warm-up step (untimed). Totals only, every operation under
            # 'Global': the counter's per-module attribution registers backward hooks that fail under the attack's
            # torch.autograd.grad on a leaf input (pytorch/pytorch#131753).
            from torch.utils.flop_counter import FlopCounterMode
            self.flop_counter, self.flop_images = FlopCounterMode(display=False), args.batch_size // world
            self.flop_counter.mod_tracker = contextlib.nullcontext()
            self.flop_counter.mod_tracker.parents = {"Global"}
            self.flop_counter.__enter__()

    def step(self):
        self.steps_done += 1
        if self.flop_counter:
            self.flop_counter.__exit__(None, None, None)
            self.result["flops_per_image"] = self.flop_counter.get_total_flops() / self.flop_images
            self.flop_counter = None
        if self.steps_done == self.warmup_steps:
            synchronize(self.device)
            self.start = time.perf_counter()

    def summary(self, run_dir):
        synchronize(self.device)
        result, timed = self.result, self.steps_done - self.warmup_steps
        if timed < 1:  # (the timer starts at the end of the warm-up)
            return
        images_per_s = timed * result["batch_size"] / (time.perf_counter() - self.start)
        result.update(timed_steps=timed, images_per_s=images_per_s)
        if self.device.type == "cuda":
            result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if flops := result["flops_per_image"]:
            result["tflops_per_s"] = flops * images_per_s / 1e12
        write_json(os.path.join(run_dir, "benchmark.json"), result)
        memory, loader, per_worker = (result[k] for k in ("peak_gpu_memory_gib", "loader_images_per_s",
                                                          "loader_images_per_s_per_worker"))
        compute = f", {flops / 1e9:.3g} GFLOP per image, {result['tflops_per_s']:.3g} TFLOP/s" if flops else ""
        memory = f", peak GPU memory {memory:.2f} GiB" if memory else ""
        loader = f", data loader alone {loader:.0f} img/s" if loader else ""
        loader += f" ({per_worker:.0f} per worker)" if per_worker else ""
        print(f"benchmark: {images_per_s:.1f} img/s over {timed} steps after {self.warmup_steps} warm-up steps on "
              f"{result['device']}{compute}{memory}{loader}", flush=True)

# --- Several processes (torchrun): process group, DDP (the slices and the gather are common.py's) --------------

_CPU_GROUP = None  # a gloo group for small CPU collectives; None = the default group (gloo already)


def barrier():
    if rank_and_world()[1] > 1:  # every torchrun process waits for the others (over gloo: no GPU sync)
        dist.barrier(group=_CPU_GROUP)


def init_distributed(args):
    """This process's device. Under torchrun (WORLD_SIZE set) also join its process group (NCCL on the GPU
    LOCAL_RANK, gloo on the CPU), once the global --batch-size divides and each process has a GPU."""
    global _CPU_GROUP
    if "WORLD_SIZE" not in os.environ:
        return pick_device(args.device)
    world, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
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


def parallel(model, compile, device, find_unused=False):
    """(net, train_net): the model (torch.compile'd with --compile) for the attack, and for the training forwards
    under torchrun DDP over it, with SyncBatchNorm on CUDA (on the CPU each process normalises its slice).
    broadcast_buffers=False: DDP would copy rank 0's buffers in place between forwards that share one backward.
    find_unused: supervised.py --eps 0 leaves the adversarial BN copies without gradient."""
    world = rank_and_world()[1]
    if world > 1 and device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps the BN children in place, same parameters
    net = torch.compile(model, dynamic=False) if compile else model
    if world == 1:
        return net, net
    device_ids = [device.index] if device.type == "cuda" else None
    return net, nn.parallel.DistributedDataParallel(net, device_ids=device_ids, broadcast_buffers=False,
                                                    find_unused_parameters=find_unused)


# --- Run bookkeeping: one object per training run, one call per step ------------------------------------------

def new_run_dir(args, method):
    """A new run's folder <out-dir>/<method>_<dataset>_<seed>_<time>/ (-2, -3... when that is taken)."""
    path = base = os.path.join(args.out_dir, f"{method}_{args.dataset}_{args.seed}_{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while os.path.exists(path):
        suffix += 1
        path = f"{base}-{suffix}"
    try:
        os.makedirs(path)
    except OSError as e:
        raise UserError(f"cannot create the run folder {path} ({e.strerror}); choose another --out-dir") from None
    return path


def metrics_to_keep(run_dir, step, log_every):
    """On resume, before any write: the run folder is writable; the records of its metrics.jsonl up to the checkpoint's
    step, less one there that closed a partial window (None without the file; a last line cut by a crash is dropped)."""
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"cannot resume in {run_dir}: the run folder is not writable (a read-only file system, or "
                        "no permission); make it writable, or copy the run folder somewhere writable and resume the copy")
    path, records = os.path.join(run_dir, "metrics.jsonl"), []
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")[:-1]  # less the last line if a crash cut it (no newline)
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); make it readable and resume again") from None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:  # not UTF-8 or not JSON
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            raise UserError(f"{path} line {number} is not a metrics record (one JSON object with its 'step' per "
                            "line); repair or delete that line and resume again (nothing was changed)")
        records.append(record)
    return [r for r in records if r["step"] < step or (r["step"] == step and step % log_every == 0)]


class Run:
    """Everything a training loop does besides training: resume, run folder, args.json, log, non-finite watch,
    checkpoints (epoch ends, --save-every, last step, Ctrl-C/SIGTERM), benchmark. Under torchrun rank 0 writes."""
    NO_STEP = 2**62  # the non-finite watch's step while every loss was finite

    def __init__(self, method, args, checkpoint, model, optimizer, loader, device, amp):
        self.method, self.args, self.model, self.optimizer = method, args, model, optimizer
        self.rank, self.world = rank_and_world()
        self.steps_per_epoch = loader.batch_sampler.batches_per_epoch
        total_steps = args.epochs * self.steps_per_epoch
        self.stop_step = min(total_steps, args.max_steps or total_steps)
        self.step, log_state, kept, self.bench, self.events, self.nothing_to_do = 0, None, None, None, None, False
        self.dir = (os.path.dirname(os.path.abspath(args.resume)) if checkpoint else
                    self._on_rank0(lambda: new_run_dir(args, method)))  # the same on every process
        self.checkpoint_path = os.path.join(self.dir, "checkpoint.pt")
        if checkpoint:  # every check comes before the first write: a refused resume leaves the run folder as it is
            network = (f"the {method}.py network of width {args.width} with the {model.stem} stem that its "
                       "arguments describe")
            check_weights(checkpoint["model"], model.state_dict(), args.resume, network, INTACT, optional=())
            check_optimizer_state(checkpoint["optimizer"], optimizer, args.resume)
            self.step, log_state = checkpoint["step"], checkpoint.get("log")
            if self.stop_step == total_steps:
                where, more = f"the end of its --epochs {args.epochs}", "start a new run to train longer"
            else:
                where, more = f"--max-steps {self.stop_step}", f"give a --max-steps above {self.step} to train further"
            if self.step > self.stop_step:
                raise UserError(f"{args.resume} is at step {self.step}, already past step {self.stop_step} ({where}); "
                                f"{more}")
            if self.step == self.stop_step:  # nothing is loaded or written: the run folder stays as it is
                if self.rank == 0:
                    print(f"nothing to do: {args.resume} is at step {self.step}, where this run stops ({where}); "
                          f"{more}", flush=True)
                self.nothing_to_do = True
                return
            log_every = checkpoint["args"].get("log_every", args.log_every)
            kept = self._on_rank0(lambda: metrics_to_keep(self.dir, self.step, log_every))
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            # Without a CUDA random state (saved on the CPU; older files hold a list of every GPU's, used only with as
            # many GPUs) the CUDA generator keeps its seed: the run continues, not bit for bit.
            torch.set_rng_state(checkpoint["rng"]["cpu"])
            cuda = checkpoint["rng"].get("cuda") if torch.cuda.is_available() else None
            if isinstance(cuda, torch.Tensor):
                torch.cuda.set_rng_state(cuda)
            elif cuda is not None and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        if self.rank == 0:
            write_json(os.path.join(self.dir, "args.json"), vars(args))
            if kept is not None:
                with atomic_file(os.path.join(self.dir, "metrics.jsonl"), "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
            if args.tensorboard:  # event files made again from metrics.jsonl: a resume repeats or reorders no step
                from torch.utils.tensorboard import SummaryWriter
                for name in [n for n in os.listdir(self.dir) if n.startswith("events.out.tfevents.")]:
                    os.remove(os.path.join(self.dir, name))
                self.events = SummaryWriter(self.dir)
                for record in kept or []:
                    self._add_events(record)
            if checkpoint:
                print(f"resumed {args.resume} at step {self.step}", flush=True)
            processes = f", {self.world} processes" if self.world > 1 else ""
            print(f"{method} on {args.dataset} ({device.type}{', bf16' if amp else ''}{processes}): "
                  f"{self.stop_step - self.step} steps to step {self.stop_step} of {total_steps}, "
                  f"{self.steps_per_epoch} per epoch; writing {self.dir}", flush=True)
            print(f"training attack: PGD, {args.pgd_steps} steps (--pgd-steps), eps {args.eps:g}/255, step size "
                  f"{args.pgd_alpha:g}/255" if args.eps and args.pgd_steps else "training attack: none", flush=True)
        # The log window: the sums of the loss terms since the last multiple of --log-every, on the device. A
        # --max-steps stop leaves it open and the checkpoint keeps it, so a resumed run averages the same steps.
        self.sum = log_state["sum"].to(device) if log_state and log_state.get("sum") is not None else None
        self.count = log_state["count"] if log_state else 0
        self.log_time, self.log_step = time.perf_counter(), self.step
        # The non-finite watch: the first step whose loss terms were not finite, and those terms, kept on the device
        # (no sync per step) and looked at on log and checkpoint steps.
        self.bad_step, self.bad_terms = torch.tensor(self.NO_STEP, device=device), None
        # Ctrl-C and SIGTERM set `received` (said at once by rank 0); the loop checkpoints after this step and exits.
        # The handlers found go back when the run ends, so a run started in-process leaves them as they were.
        self.received = 0
        self.handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        if self.rank == 0 and args.max_steps:  # images/s count the global batch: the processes step together
            warmup_steps = min(10, max(1, (self.stop_step - self.step) // 5))
            self.bench = Benchmark(method, args, device, loader, warmup_steps, self.world)

    def _on_rank0(self, compute):
        """compute() on rank 0 alone; every process gets its result, or its error, so all stop together."""
        shared = [None, None]
        if self.rank == 0:
            try:
                shared[0] = compute()
            except UserError as e:
                shared[1] = str(e)
        if self.world > 1:
            dist.broadcast_object_list(shared, src=0, group=_CPU_GROUP)
        if shared[1]:
            raise UserError(shared[1])
        return shared[0]

    def _on_signal(self, signum, frame):
        self.received = signum
        if self.rank == 0:
            with contextlib.suppress(RuntimeError):  # it came while this process was printing: the flag is set
                print(f"received {signal.Signals(signum).name}: stopping after this step and saving a checkpoint",
                      flush=True)

    def _restore_signals(self):
        for sig, handler in self.handlers.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: not set from Python

    def end_of_step(self, step, epoch, lr, loss, terms):
        """After each optimiser step: watch, log, checkpoint, stop signal. True at the run's last step."""
        try:
            self.step, args, names = step, self.args, ["loss", *terms]
            self._accumulate(step, torch.stack([loss, *terms.values()]).detach())
            if self.bench:
                self.bench.step()
            received = torch.tensor(self.received)
            if self.world > 1:  # the highest that any process received: one all-reduce of a CPU integer per step
                # (gloo), since agreeing only on log steps could answer past torchrun's 30 s grace
                dist.all_reduce(received, dist.ReduceOp.MAX, group=_CPU_GROUP)
            received = int(received)
            last = step == self.stop_step
            log_step = step % args.log_every == 0 or last
            save_step = (step % self.steps_per_epoch == 0 or last or received
                         or (args.save_every and step % args.save_every == 0))
            if log_step or save_step:
                self._stop_if_not_finite(names)
            if log_step and self.rank == 0:
                self._write_log(step, epoch, lr, names)
            if step % args.log_every == 0:
                self.sum, self.count = None, 0  # the log window closes
            if save_step and self.rank == 0:  # plain types and tensors only: torch.load(weights_only=True) reads it
                rng = {"cpu": torch.get_rng_state()}  # every torchrun process draws the same numbers
                if torch.cuda.is_available():
                    rng["cuda"] = torch.cuda.get_rng_state()
                save_checkpoint(self.checkpoint_path, {
                    "method": self.method, "args": dict(vars(args)), "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "epoch": epoch, "step": step, "rng": rng,
                    "log": {"sum": self.sum, "count": self.count}})
            if received:
                barrier()  # rank 0's checkpoint is complete before any process exits and torchrun stops the rest
                if self.rank == 0:
                    print(f"stopped by {signal.Signals(received).name} at step {step}: saved {self.checkpoint_path}; "
                          f"continue with --resume {self.checkpoint_path}", flush=True)
                raise SystemExit(128 + received)
            return last
        except BaseException:  # a stop (a signal, a non-finite loss) ends the run: the signal handlers go back
            self._restore_signals()
            raise

    def _accumulate(self, step, values):
        """A step's loss terms into the log window and the non-finite watch, on the device (no sync)."""
        first = (self.bad_step == self.NO_STEP) & ~torch.isfinite(values).all()
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_terms = values if self.bad_terms is None else torch.where(first, values, self.bad_terms)
        self.sum = values if self.sum is None else self.sum + values
        self.count += 1

    def _stop_if_not_finite(self, names):
        """Stop if a loss or the weights became non-finite; under torchrun all processes agree and stop here."""
        weights_finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        agreed = torch.tensor([int(self.bad_step), int(weights_finite)])
        if self.world > 1:  # the first bad step of any process, and the weights finite on all
            dist.all_reduce(agreed, dist.ReduceOp.MIN, group=_CPU_GROUP)
        step, weights_finite = agreed.tolist()
        if step == self.NO_STEP and not weights_finite:
            fail(f"the network's weights became non-finite by step {self.step} although the loss stayed finite; "
                 f"training stopped and the last good checkpoint is {self.checkpoint_path}; lower --lr", status=1,
                 everywhere=True)
        if step != self.NO_STEP:
            values = (", ".join(f"{n} {v:.4g}" for n, v in zip(names, self.bad_terms.tolist())) if self.bad_step == step
                      else "on another process")
            kept = (f"the last good checkpoint is {self.checkpoint_path}" if os.path.exists(self.checkpoint_path)
                    else "no checkpoint was written yet")
            fail(f"the loss became non-finite at step {step} ({values}); training stopped and {kept}; "
                 "lower --lr or check the data", status=1, everywhere=True)

    def _write_log(self, step, epoch, lr, names):
        means = (self.sum / self.count).tolist()  # the one host-device sync of a log step
        now, batch_size = time.perf_counter(), self.args.batch_size
        images_per_s = (step - self.log_step) * batch_size / max(now - self.log_time, 1e-9)
        eta = int((self.stop_step - step) * batch_size / max(images_per_s, 1e-9))
        record = {"step": step, "epoch": epoch, "lr": lr, **dict(zip(names, means)), "images_per_s": images_per_s}
        with open(os.path.join(self.dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.events:
            self._add_events(record)
        losses = " ".join(f"{n} {v:.4f}" for n, v in zip(names, means))
        eta = f"{eta // 3600}h{eta % 3600 // 60:02d}m" if eta >= 3600 else f"{eta // 60}m{eta % 60:02d}s"
        print(f"epoch {epoch}/{self.args.epochs} step {step}/{self.stop_step} | {losses} | lr {lr:.4g} | "
              f"{images_per_s:.0f} img/s | eta {eta}", flush=True)
        self.log_time, self.log_step = now, step

    def _add_events(self, record):
        for name, value in record.items():
            if name not in ("step", "epoch"):
                self.events.add_scalar(name, value, record["step"])
        self.events.flush()

    def finish(self):
        if self.nothing_to_do:
            return self.dir
        self._restore_signals()
        if self.bench:
            self.bench.summary(self.dir)
        if self.rank == 0:
            if self.events:
                self.events.close()
            print(f"done: step {self.step}, checkpoint {self.checkpoint_path}", flush=True)
        barrier()
        return self.dir
