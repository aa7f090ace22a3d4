"""AIR: ACL + adversarial invariant regularisation (Xu, Zhang, Liu, Sugiyama & Kankanhalli, NeurIPS 2023).

    L = L_ACL + lambda1 * SIR + lambda2 * AIR,   SIR = KL(p || q),   AIR = KL(P^1 || P^2)

p, q: softmax over the batch of the similarity of each view's z1 / z2 to the original image's z0;
P^u: softmax of z_u_adv's similarity to z0 times softmax of its similarity to z_u.
L_ACL is acl.py's loss; everything else (views, attack, schedule, DynACL, --supcon) is acl.py's too.

    python air.py --dataset cifar10 --dynacl              # DynACL-AIR, the paper's best setting
    python air.py --dataset cifar10 --official-ir         # the released code's arithmetic (see README)
    torchrun --nproc_per_node 4 air.py --dataset cifar10  # 4 GPUs, the same run (README: Several GPUs)
    python air.py --dataset synthetic --width 8 --batch-size 32 --pgd-steps 2 --max-steps 20 --workers 0
"""
import argparse

import torch
import torch.nn.functional as F

from common import (ResNet18, autocast, contrastive_pgd, dynacl_schedule, gather, lr_at, make_optimizer, nt_xent,
                    pretrain_loader, stem_for)
from machinery import Run, add_shared_flags, init_distributed, main_guard, parallel, parse_and_resume

METHOD = "air"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shared_flags(parser)
    parser.add_argument("--lambda1", type=float, default=0.5, help="weight of SIR, the standard invariant regulariser")
    parser.add_argument("--lambda2", type=float, default=0.5, help="weight of AIR, the adversarial invariant regulariser")
    parser.add_argument("--official-ir", action="store_true", help="compute SIR/AIR as the released code does, not as the paper's KL (README)")
    return parse_and_resume(parser, argv, METHOD)


# ---------------------------------------------------------------------------------------------
# The method's loss
# ---------------------------------------------------------------------------------------------

def invariant_regularizers(z1, z2, z0, z1_adv, z2_adv, temperature=0.5, official=False):
    """(SIR, AIR) as defined in the module docstring. Every distribution is a softmax across the batch index k of per-image
    similarities. official=True reproduces the released code, which passes probabilities where
    kl_div expects log-probabilities and swaps its arguments (README, "AIR: paper vs code")."""
    z1, z2, z0, z1_adv, z2_adv = (F.normalize(z.float(), dim=1) for z in (z1, z2, z0, z1_adv, z2_adv))
    sim = lambda u, v: (u * v).sum(1) / temperature  # noqa: E731  per-image <u_k, v_k> / t
    log_p, log_q = F.log_softmax(sim(z1, z0), 0), F.log_softmax(sim(z2, z0), 0)
    # P^u = softmax(c^u) * softmax(d^u), a product of two distributions, not renormalised
    log_p1 = F.log_softmax(sim(z1_adv, z0), 0) + F.log_softmax(sim(z1_adv, z1), 0)
    log_p2 = F.log_softmax(sim(z2_adv, z0), 0) + F.log_softmax(sim(z2_adv, z2), 0)
    if official:  # sum_k q_k (log q_k - p_k) and sum_k P2_k (log P2_k - P1_k)
        sir = (log_q.exp() * (log_q - log_p.exp())).sum()
        air = (log_p2.exp() * (log_p2 - log_p1.exp())).sum()
    else:  # the paper: KL(p || q) and KL(P1 || P2)
        sir = (log_p.exp() * (log_p - log_q)).sum()
        air = (log_p1.exp() * (log_p1 - log_p2)).sum()
    return sir, air


def air_loss(z1, z2, z0, z1_adv, z2_adv, omega=0.0, temperature=0.5, lambda1=0.5, lambda2=0.5, official=False, labels=None):
    """ACL's dual-stream loss (acl.py) plus lambda1 * SIR + lambda2 * AIR: returns (loss, named terms)."""
    loss_clean = nt_xent(z1, z2, temperature, labels)
    loss_adv = nt_xent(z1_adv, z2_adv, temperature, labels)
    sir, air = invariant_regularizers(z1, z2, z0, z1_adv, z2_adv, temperature, official)
    loss = (1 - omega) * loss_clean + (1 + omega) * loss_adv + lambda1 * sir + lambda2 * air
    return loss, {"loss_clean": loss_clean, "loss_adv": loss_adv, "sir": sir, "air": air}


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
        for x1, x2, x0, y in loader:
            lr = lr_at(step, args.lr, warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
            x0 = x0.to(device, non_blocking=True, memory_format=memory_format)
            labels = gather(y.to(device))[0] if args.supcon else None  # --supcon: the global batch's labels

            x1_adv, x2_adv = contrastive_pgd(net, x1, x2, eps, alpha, args.pgd_steps, args.temperature, amp, labels)
            with autocast(amp):
                z1, z2 = train_net(torch.cat([x1, x2])).float().chunk(2)
                z1_adv, z2_adv = train_net(torch.cat([x1_adv, x2_adv]), adv=True).float().chunk(2)
                z0 = train_net(x0).float()  # its own clean-BN batch, as in the released code
            z1, z2, z0, z1_adv, z2_adv = gather(z1, z2, z0, z1_adv, z2_adv)  # the global batch under torchrun
            loss, terms = air_loss(z1, z2, z0, z1_adv, z2_adv, omega, args.temperature,
                                   args.lambda1, args.lambda2, args.official_ir, labels)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if run.end_of_step(step, epoch, lr, loss, terms):  # log, non-finite watch, checkpoint, Ctrl-C
                break
    return run.finish()


if __name__ == "__main__":
    main_guard(main)
