"""The data path of --augment batched against --augment pil, and what it costs (issue 32). Four measurements:

    python docs/bench_views.py speed     # seconds per batch, batched vs pil: 32 px, batch 512, one CPU thread
    python docs/bench_views.py profile   # where a batched batch's time goes, and its eager operations
    python docs/bench_views.py memory    # peak host memory of STL-10's unlabelled split held in memory
    python docs/bench_views.py tf32      # the resampling's error if its matrix products ran in TF32

speed: both paths are built by common.pretrain_loader as training builds them (--dataset synthetic, CIFAR-10's
size, --workers 0: pil is PretrainViews with the sampler in this process) and timed in turns (batched, pil,
batched, ...) so that a change in the machine's load reaches both; the median and range over the turns are
printed with the load average. memory: a 100,000 x 3 x 96 x 96 uint8 stand-in laid out as torchvision's STL10
holds it (the file's bytes, transposed) goes through common.in_memory on the CPU, in a fresh process that
reports its peak resident memory (VmHWM). tf32: PyTorch cannot run TF32 on a CPU, so it is emulated: the inputs
of each matrix product rounded to TF32's 10 mantissa bits (the products and sums stay fp32, as on the GPU).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import acl  # noqa: E402
import common  # noqa: E402


def loader(augment, batch_size, seed=0):
    args, _ = acl.parse_args(["--dataset", "synthetic", "--augment", augment, "--workers", "0", "--device", "cpu",
                              "--batch-size", str(batch_size), "--seed", str(seed)])
    data, sampler = common.pretrain_loader(args, torch.device("cpu"))
    sampler.set_epoch(1)
    return data


def seconds_per_batch(data, batches):
    it = iter(data)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - start) / batches


def speed(args):
    paths = {"batched": loader("batched", args.batch_size), "pil": loader("pil", args.batch_size)}
    seconds_per_batch(paths["batched"], 1)  # first-call costs (allocations, PIL's imports) out of the timing
    times = {name: [] for name in paths}
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores")
    for turn in range(args.turns):
        for name, data in paths.items():
            times[name].append(seconds_per_batch(data, args.batches))
        print(f"turn {turn + 1}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for name, t in times.items():
        print(f"{name}: median {statistics.median(t):.3f} s per batch of {args.batch_size} (range {min(t):.3f} - "
              f"{max(t):.3f}) = {args.batch_size / statistics.median(t):.0f} images/s")
    ratios = [p / b for b, p in zip(times["batched"], times["pil"])]
    print(f"pil / batched: median {statistics.median(ratios):.2f}x (per turn {min(ratios):.2f} - {max(ratios):.2f})")


def profile(args):
    """Time spent in each of the batched path's functions (inclusive: a function's time holds its callees'),
    and the number of eager operations, over `--batches` batches."""
    from torch.utils._python_dispatch import TorchDispatchMode
    spent, calls, ops = {}, {}, [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[0] += 1
            return func(*args, **(kwargs or {}))

    def timed(name, f):
        def g(*a, **k):
            start = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
                calls[name] = calls.get(name, 0) + 1
        return g

    names = ["view_params", "crop_flip_params", "resize_matrix", "resample", "augment", "color_jitter",
             "adjust_hue", "blend", "grayscale"]
    for name in names:
        if hasattr(common, name):
            setattr(common, name, timed(name, getattr(common, name)))
    for name in ("original", "crop_flip"):
        setattr(common.BatchedViews, name, timed(f"BatchedViews.{name}", getattr(common.BatchedViews, name)))
    data = loader("batched", args.batch_size)
    seconds_per_batch(data, 1)
    spent.clear(), calls.clear()
    total = seconds_per_batch(data, args.batches) * args.batches
    timings = {name: (s, calls[name]) for name, s in spent.items()}  # the counted batch below is slower
    with Count():
        seconds_per_batch(data, 1)
    print(f"batched, {args.batch_size} images, 32 px, one thread: {1000 * total / args.batches:.0f} ms per batch, "
          f"{ops[0]} eager operations per batch (host parameter draws included)")
    for name, (s, n) in sorted(timings.items(), key=lambda kv: -kv[1][0]):
        print(f"  {name:24s} {1000 * s / args.batches:7.1f} ms per batch ({100 * s / total:4.1f}%), "
              f"{n / args.batches:.0f} calls")


def stl10_stand_in(n):
    """What torchvision's STL10('unlabeled') holds: np.fromfile's bytes as (n, 3, 96, 96), transposed (0, 1, 3, 2),
    every page written (as reading the file does), and one label -1 per image."""
    data = np.empty(n * 3 * 96 * 96, dtype=np.uint8)
    data[:] = 7
    data = np.transpose(data.reshape(-1, 3, 96, 96), (0, 1, 3, 2))
    return types.SimpleNamespace(data=data, labels=np.asarray([-1] * n))


def peak_rss_gib():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) / 2**20, int(fields["VmRSS"].split()[0]) / 2**20


def memory_child(n):
    before = peak_rss_gib()
    base = stl10_stand_in(n)
    loaded = peak_rss_gib()
    start = time.perf_counter()
    images, labels = common.in_memory(base, torch.device("cpu"))
    seconds = time.perf_counter() - start
    held = peak_rss_gib()
    del base
    print(f"{n:,} x 3 x 96 x 96 uint8 = {n * 3 * 96 * 96 / 2**30:.2f} GiB; "
          f"the process before: {before[1]:.2f} GiB; loaded: peak {loaded[0]:.2f} GiB | in_memory(device=cpu), {seconds:.1f} s: peak {held[0]:.2f} GiB, "
          f"resident {held[1]:.2f} GiB | the loaded array freed: resident {peak_rss_gib()[1]:.2f} GiB; "
          f"images contiguous: {images.is_contiguous()}")


def memory(args):
    """In a fresh process, so that its peak is this measurement's."""
    subprocess.run([sys.executable, os.path.abspath(__file__), "memory-child", "--images", str(args.images)],
                   check=True)


def tf32(x):
    """x with its mantissa rounded to TF32's 10 bits (to nearest, ties to even); the exponent is fp32's."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)


def resample_tf32(images, ry, rx, flip=None):
    """common.resample with the inputs of both matrix products in TF32."""
    if flip is not None:
        rx = torch.where(flip[:, None, None], rx.flip(1), rx)
    rows = tf32(ry[:, None].expand(-1, 3, -1, -1)) @ tf32(images.float() / 255)
    return (tf32(rows) @ tf32(rx[:, None].transpose(-1, -2).expand(-1, 3, -1, -1))).clamp(0, 1)


def photo_patches(size):
    import matplotlib
    from PIL import Image
    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    photo = np.asarray(Image.open(path).convert("RGB"))
    rows, cols = photo.shape[0] // size, photo.shape[1] // size
    patches = [photo[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]
    return torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).contiguous()


def tf32_error(args):
    """|fp32 - TF32| of the resampling in pixel levels (0..255) on real images: the pre-training views (crop,
    resize, flip) at 32 px and at STL-10's 96 px, x0 resized from 96 to 32 px, and supervised.py's crop."""
    digits = torch.from_numpy(common.DigitsImages(train=True, size=32).data).permute(0, 3, 1, 2).contiguous()
    cases = []
    for name, images, size in [("photo 32 px", photo_patches(32), 32), ("digits 32 px", digits, 32),
                               ("photo 96 px", photo_patches(96), 96), ("photo 96 -> 32 px", photo_patches(96), 32)]:
        n, source = len(images), images.shape[2]
        for draw in range(args.draws):
            p = common.view_params(torch.Generator().manual_seed(draw), n, source, source, 1.0)
            ry, rx = (common.resize_matrix(p[a], p[b], source, size) for a, b in (("i", "h"), ("j", "w")))
            exact, emulated = common.resample(images, ry, rx, p["flip"]), resample_tf32(images, ry, rx, p["flip"])
            cases.append((f"views, {name}", (exact - emulated).abs() * 255))
        if source != size:  # x0: Resize(size) of the whole image, and supervised.py's crop after it
            views = common.BatchedViews(images, torch.zeros(n), None, size, 0)
            whole = views.to_size.expand(n, -1, -1)
            cases.append((f"x0, {name}", (views.original(images) - resample_tf32(images, whole, whole)).abs() * 255))
    seen = {}
    for name, err in cases:
        seen.setdefault(name, []).append(err.flatten())
    print(f"| resampling ({args.draws} parameter draws) | mean error (levels) | largest | share > 0.5 level |")
    print("|---|---|---|---|")
    for name, errs in seen.items():
        e = torch.cat(errs)
        print(f"| {name} ({e.numel():,} values) | {e.mean():.4f} | {e.max():.3f} | {(e > 0.5).double().mean():.2e} |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["speed", "profile", "memory", "memory-child", "tf32"])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=2, help="batches per turn (speed) or in all (profile)")
    parser.add_argument("--turns", type=int, default=5, help="speed: turns of batched then pil")
    parser.add_argument("--images", type=int, default=100_000, help="memory: images in the STL-10 stand-in")
    parser.add_argument("--draws", type=int, default=4, help="tf32: parameter draws per image set")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    torch.set_num_threads(args.threads)
    {"speed": speed, "profile": profile, "memory": memory, "memory-child": lambda a: memory_child(a.images),
     "tf32": tf32_error}[args.what](args)
