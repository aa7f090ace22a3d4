"""How far --augment batched is from --augment pil at the same random parameters (README, Augmentation).

For every image, one parameter set of ACL's augmentation (s = 1) is drawn (common.view_params) and each
op is applied both ways: the PIL path's (torchvision on the PIL uint8 image, as pretrain_transform
does) and the batched path's (common.py, float). Prints the mean and the largest absolute difference
per op, in 1/255 units, for the digits' 1,198 training images (16 px, grey) and for 32 px patches of
a colour photograph (matplotlib's sample grace_hopper.jpg, where saturation and hue act).

    python docs/augment_vs_pil.py
"""
import os
import sys

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def photo_patches(size=32):
    import matplotlib
    photo = np.asarray(Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB"))
    rows, cols = photo.shape[0] // size, photo.shape[1] // size
    return np.stack([photo[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)])


def pil_view(image, p, k, size):
    """pretrain_transform with image k's parameters, on the PIL image: uint8 between the ops."""
    out = TF.resized_crop(image, *(int(p[c][k]) for c in "ijhw"), [size, size], InterpolationMode.BICUBIC)
    out = TF.hflip(out) if p["flip"][k] else out
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for o in p["order"][k].tolist() if p["jitter"][k] else []:
        out = ops[o](out, float(p["factors"][k, o]))
    return TF.to_tensor(TF.rgb_to_grayscale(out, 3) if p["gray"][k] else out)


def differences(data):
    """Per op: (mean, max) |PIL - batched| in 1/255 units over the images `data` (N, H, W, 3) uint8."""
    n, size = len(data), data.shape[1]
    images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    x, pils = images.float() / 255, [Image.fromarray(a) for a in data]
    p = common.view_params(torch.Generator().manual_seed(0), n, size, size, 1.0)
    p["perm"], p["counts"] = common.jitter_groups(p["order"], p["jitter"])
    f = p["factors"][:, :, None, None]
    ours = {
        "resized crop + flip": common.resample(images, common.resize_matrix(p["i"], p["h"], size, size),
                                               common.resize_matrix(p["j"], p["w"], size, size), p["flip"]),
        "brightness": common.blend(x, 0, f[:, 0:1]),
        "contrast": common.blend(x, common.grayscale(x).mean((1, 2, 3), keepdim=True), f[:, 1:2]),
        "saturation": common.blend(x, common.grayscale(x), f[:, 2:3]),
        "hue": common.adjust_hue(x, f[:, 3:4]),
        "grayscale": common.grayscale(x).expand_as(x),
        "whole view": common.augment(images, p, size),
    }
    theirs = {
        "resized crop + flip": [pil_view(im, dict(p, jitter=p["flip"] & False, gray=p["flip"] & False), k, size)
                                for k, im in enumerate(pils)],
        "brightness": [TF.to_tensor(TF.adjust_brightness(im, float(p["factors"][k, 0]))) for k, im in enumerate(pils)],
        "contrast": [TF.to_tensor(TF.adjust_contrast(im, float(p["factors"][k, 1]))) for k, im in enumerate(pils)],
        "saturation": [TF.to_tensor(TF.adjust_saturation(im, float(p["factors"][k, 2]))) for k, im in enumerate(pils)],
        "hue": [TF.to_tensor(TF.adjust_hue(im, float(p["factors"][k, 3]))) for k, im in enumerate(pils)],
        "grayscale": [TF.to_tensor(TF.rgb_to_grayscale(im, 3)) for im in pils],
        "whole view": [pil_view(im, p, k, size) for k, im in enumerate(pils)],
    }
    return {op: ((ours[op] - torch.stack(theirs[op])).abs() * 255) for op in ours}


if __name__ == "__main__":
    torch.set_num_threads(1)
    sets = {"digits (1,198 x 16 px)": common.DigitsImages(train=True, size=16).data, "photo patches": photo_patches()}
    sets = {f"{name.split(' (')[0]} ({len(d):,} x {d.shape[1]} px)" if "photo" in name else name: d for name, d in sets.items()}
    results = {name: differences(data) for name, data in sets.items()}
    print("| op | " + " | ".join(f"{name}: mean / max" for name in results) + " |")
    print("|---|" + "---|" * len(results))
    for op in next(iter(results.values())):
        print(f"| {op} | " + " | ".join(f"{r[op].mean():.3f} / {r[op].max():.1f}" for r in results.values()) + " |")
