"""ACL: adversarial contrastive learning (Jiang, Chen, Chen & Wang, NeurIPS 2020), dual-stream variant.

    L = (1 - omega) * NT-Xent(z1, z2) + (1 + omega) * NT-Xent(z1_adv, z2_adv)

x1, x2 are two augmented views; x1_adv, x2_adv their joint contrastive-PGD versions; clean views go
through the clean batch norms, adversarial ones through the adversarial batch norms. omega = 0
unless --dynacl (DynACL, Luo et al., ICLR 2023). --supcon (supervised contrastive ACL, the SCL
scheme of Ghofrani et al.) replaces both NT-Xent terms and the attack's loss by SupCon's L_out
(Khosla et al., NeurIPS 2020), whose positives are all views of the anchor's class. NT-Xent and
SupCon, the attack, the augmentation, LARS and the DynACL schedule are in common.py, each with its
equation.

    python acl.py --dataset cifar10                       # the paper's setting (1000 epochs, batch 512)
    python acl.py --dataset cifar10 --dynacl              # DynACL
    python acl.py --dataset cifar10 --supcon              # supervised contrastive ACL (SCL-AT; --eps 0: SCL-ST)
    torchrun --nproc_per_node 4 acl.py --dataset cifar10  # 4 GPUs, the same run (README: Several GPUs)
    python acl.py --dataset synthetic --width 8 --batch-size 32 --pgd-steps 2 --max-steps 20 --workers 0
"""
import argparse

import torch

from common import (ResNet18, autocast, contrastive_pgd, dynacl_schedule, gather, lr_at, make_optimizer, nt_xent,
                    pretrain_loader, stem_for)
from machinery import Run, add_shared_flags, init_distributed, main_guard, parallel, parse_and_resume

METHOD = "acl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shared_flags(parser)
    return parse_and_resume(parser, argv, METHOD)


# ---------------------------------------------------------------------------------------------
# The method's loss
# ---------------------------------------------------------------------------------------------

def acl_loss(z1, z2, z1_adv, z2_adv, omega=0.0, temperature=0.5, labels=None):
    """ACL's dual-stream loss with DynACL's weights (SupCon terms given labels): returns (loss, named terms)."""
    loss_clean = nt_xent(z1, z2, temperature, labels)
    loss_adv = nt_xent(z1_adv, z2_adv, temperature, labels)
    loss = (1 - omega) * loss_clean + (1 + omega) * loss_adv
    return loss, {"loss_clean": loss_clean, "loss_adv": loss_adv}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args, checkpoint = parse_args(argv)
    device = init_distributed(args)  # under torchrun: join the process group; this process's GPU
    amp = device.type == "cuda" and not args.no_amp  # bf16 autocast for the network, losses in fp32
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(args.seed)

    loader, sampler = pretrain_loader(args, device)  # under torchrun: this process's slice of each batch
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch
    eps, alpha = args.eps / 255, args.pgd_alpha / 255

    model = ResNet18(args.width, stem_for(args.image_size)).to(device, memory_format=memory_format)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    run = Run(METHOD, args, checkpoint, model, optimizer, loader, device, amp)  # resume, run folder, log, checkpoints
    net, train_net = parallel(model, args.compile, device)  # the attack's module; DDP under torchrun
    step = run.step

    while step < run.stop_step:
        epoch = step // steps_per_epoch + 1
        strength, omega = dynacl_schedule(epoch, args.epochs, args.dynacl)
        sampler.set_epoch(epoch, strength, start=step % steps_per_epoch)
        for x1, x2, _, y in loader:
            lr = lr_at(step, args.lr, warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
            labels = gather(y.to(device))[0] if args.supcon else None  # --supcon: the global batch's labels

            x1_adv, x2_adv = contrastive_pgd(net, x1, x2, eps, alpha, args.pgd_steps, args.temperature, amp, labels)
            with autocast(amp):
                z1, z2 = train_net(torch.cat([x1, x2])).float().chunk(2)
                z1_adv, z2_adv = train_net(torch.cat([x1_adv, x2_adv]), adv=True).float().chunk(2)
            z1, z2, z1_adv, z2_adv = gather(z1, z2, z1_adv, z2_adv)  # the global batch under torchrun
            loss, terms = acl_loss(z1, z2, z1_adv, z2_adv, omega, args.temperature, labels)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if run.end_of_step(step, epoch, lr, loss, terms):  # log, non-finite watch, checkpoint, Ctrl-C
                break
    return run.finish()


if __name__ == "__main__":
    main_guard(main)
