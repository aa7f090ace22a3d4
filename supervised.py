"""Supervised training: cross-entropy, standard or PGD adversarial (Madry et al., ICLR 2018).

    --eps 0:    L = CE(f(x; clean BN), y)                                      (SL-ST, standard training)
    otherwise:  L = CE(f(x; clean BN), y) + CE(f(x_adv; adversarial BN), y)    (SL-AT)

The supervised baseline of every ACL paper and the SL scheme of Ghofrani, Yaghouti & Jamshidi,
"Rethinking Robust Contrastive Learning from the Adversarial Perspective". f is the dual-BN
ResNet-18 of the other method files with a linear classifier on the pooled feature in place of the
projection head; x is a labelled training image under RandomCrop(size, padding 4) + flip; x_adv is
PGD on CE(f(.; adversarial BN), y) from a uniform random start in the L-inf eps-ball, the model in
eval mode, input gradients only, as in the authors' released SL-AT code. The loop, flags, run
folder, checkpoint, resume and torchrun are acl.py's; `diff acl.py supervised.py` shows the rest.

Defaults are the usual CIFAR PGD-AT settings, not ACL's: SGD with momentum 0.9, lr 0.1 at batch 128
with a per-iteration cosine decay and no warm-up, weight decay 5e-4, 100 epochs, PGD-10 (--pgd-steps
10, eps 8/255, step 2/255). --temperature, --dynacl and --supcon have no use here and are refused. The
checkpoint's model is the backbone in the released ACL layout plus classifier.weight and
classifier.bias, so eval_linear.py reads it as a pre-training checkpoint (an --eps 0 run trains only
the clean batch norms, so eval_linear.py evaluates that copy of it unless --bn says otherwise).

    python supervised.py --dataset cifar10                # SL-AT: PGD-10 adversarial training, 100 epochs
    python supervised.py --dataset cifar10 --eps 0        # SL-ST: standard training
    torchrun --nproc_per_node 4 supervised.py --dataset cifar10  # 4 GPUs, the same run (README: Several GPUs)
    python supervised.py --dataset synthetic --width 8 --batch-size 32 --pgd-steps 2 --max-steps 20 --workers 0
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (NUM_CLASSES, ResNet18, attack_mode, autocast, gather, lr_at, make_optimizer, pgd_attack,
                    pretrain_loader, stem_for)
from machinery import Run, add_shared_flags, init_distributed, main_guard, parallel, parse_and_resume

METHOD = "supervised"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shared_flags(parser)
    parser.set_defaults(epochs=100, batch_size=128, lr=0.1, optimizer="sgd", weight_decay=5e-4, warmup_epochs=0,
                        pgd_steps=10)  # the usual CIFAR PGD-AT settings (module docstring)
    return parse_and_resume(parser, argv, METHOD)


# ---------------------------------------------------------------------------------------------
# The method's network, attack and loss
# ---------------------------------------------------------------------------------------------

class Classifier(ResNet18):
    """The dual-BN ResNet-18 without its projection head, plus a linear classifier on the pooled
    feature: model(x, adv) gives the logits. State dict: the released ACL backbone's keys + classifier.*"""

    def __init__(self, width, stem, num_classes):
        super().__init__(width, stem, head=False)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x, adv=False):
        return self.classifier(self.features(x, adv))


def adversarial_examples(model, x, y, eps, alpha, steps, amp=False):
    """x_adv = PGD on CE(f(.; adversarial BN), y) from a uniform random start, the model in eval mode,
    input gradients only; None at eps = 0 (standard training does no attack work). Under torchrun
    each process attacks its own slice, with no gather: in eval mode an image's loss depends on that
    image alone, and the slice mean's gradient is the global mean's times a positive constant, so the
    sign steps are the one-process ones; the random start is this process's slice of the
    one-process draw (common.pgd_attack)."""
    if eps == 0:
        return None
    with attack_mode(model):
        return pgd_attack(lambda v: model(v, adv=True), x, y, eps, alpha, steps, amp)


def supervised_loss(logits, logits_adv, y):
    """CE(f(x; clean BN), y) + CE(f(x_adv; adversarial BN), y), batch means; the clean term alone when
    logits_adv is None (--eps 0): returns (loss, named terms)."""
    loss_clean = F.cross_entropy(logits, y)
    if logits_adv is None:
        return loss_clean, {"loss_clean": loss_clean}
    loss_adv = F.cross_entropy(logits_adv, y)
    return loss_clean + loss_adv, {"loss_clean": loss_clean, "loss_adv": loss_adv}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args, checkpoint = parse_args(argv)
    device = init_distributed(args)  # under torchrun: join the process group; this process's GPU
    amp = device.type == "cuda" and not args.no_amp  # bf16 autocast for the network, losses in fp32
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(args.seed)

    loader, sampler = pretrain_loader(args, device, supervised=True)  # labelled training split, one view per image
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch
    eps, alpha = args.eps / 255, args.pgd_alpha / 255
    num_classes = NUM_CLASSES.get(args.dataset) or len(loader.dataset.base.classes)  # imagefolder: its class folders

    model = Classifier(args.width, stem_for(args.image_size), num_classes).to(device, memory_format=memory_format)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    run = Run(METHOD, args, checkpoint, model, optimizer, loader, device, amp)  # resume, run folder, log, checkpoints
    net, train_net = parallel(model, args.compile, device, find_unused=eps == 0)  # --eps 0: adversarial BN unused
    step = run.step

    while step < run.stop_step:
        epoch = step // steps_per_epoch + 1
        sampler.set_epoch(epoch, start=step % steps_per_epoch)  # one augmentation throughout: no DynACL schedule
        for x, y in loader:
            lr = lr_at(step, args.lr, warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)

            x_adv = adversarial_examples(net, x, y, eps, alpha, args.pgd_steps, amp)  # None at --eps 0
            with autocast(amp):
                logits = train_net(x).float()
                logits_adv = None if x_adv is None else train_net(x_adv, adv=True).float()
            # Under torchrun every process computes (and rank 0 logs) the global batch's loss, as in acl.py; the
            # gather's backward and DDP's averaging make the step the one-process step (common.gather).
            logits, y = gather(logits)[0], gather(y)[0]
            logits_adv = None if logits_adv is None else gather(logits_adv)[0]
            loss, terms = supervised_loss(logits, logits_adv, y)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if run.end_of_step(step, epoch, lr, loss, terms):  # log, non-finite watch, checkpoint, Ctrl-C
                break
    return run.finish()


if __name__ == "__main__":
    main_guard(main)
