"""A-InfoNCE: asymmetric InfoNCE (Yu, Ji, Ren, Zhang & Tang, ECCV 2022), ported to ACL's four views.

    L = 1/(4B) sum_u 1/3 sum_{p in P(u)} weight(u, p) * -log( e^{M_up} / (e^{M_up} + Ng(u, p)) )

over Z = [z1; z2; z1_adv; z2_adv] (4B L2-normalised rows). For anchor u, P(u) = the other 3 views
of its image and N(u) = the 4(B-1) views of the other images. Adversarial views are
- inferior positives (IP): a clean-adversarial pair (u, p) uses M = S_sg = Z stopgrad(Z)^T / t, so it
  pulls only its anchor, with weight ip_weight * share for a clean anchor and ip_weight * (1 - share)
  for an adversarial one (share = --clean-grad-share); same-type pairs, and every pair with --no-ip,
  use M = S = Z Z^T / t with weight 1;
- hard negatives (HN, HCL-style): with w_un = exp(beta M_un) / mean_{n in N(u)} exp(beta M_un),
  Ng(u, p) = max( (sum_n w_un e^{M_un} - tau_plus |N| e^{M_up}) / (1 - tau_plus), |N| e^{-1/t} );
  with --no-hn, Ng(u, p) = sum_{n in N(u)} e^{M_un}.
Views, attack and schedule are acl.py's. --dynacl changes only the augmentation strength here.

    python a_infonce.py --dataset cifar10                 # IP + HN, the authors' CIFAR-10 setting
    python a_infonce.py --dataset cifar10 --no-ip --no-hn # plain multi-positive InfoNCE on ACL's views
    torchrun --nproc_per_node 4 a_infonce.py --dataset cifar10 # 4 GPUs, the same run (README: Several GPUs)
    python a_infonce.py --dataset synthetic --width 8 --batch-size 32 --pgd-steps 2 --max-steps 20 --workers 0
"""
import argparse
import math

import torch
import torch.nn.functional as F

from common import (ResNet18, autocast, contrastive_pgd, dynacl_schedule, gather, lr_at, make_optimizer,
                    pretrain_loader, stem_for)
from machinery import Run, add_shared_flags, init_distributed, main_guard, parallel, parse_and_resume

METHOD = "a_infonce"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shared_flags(parser)
    parser.add_argument("--no-ip", dest="ip", action="store_false", help="treat clean-adversarial pairs as ordinary positives")
    parser.add_argument("--no-hn", dest="hn", action="store_false", help="plain negatives instead of hard-negative re-weighting")
    parser.add_argument("--ip-weight", type=float, default=0.7, help="weight of the inferior-positive (clean-adversarial) pairs")
    parser.add_argument("--clean-grad-share", type=float, default=0.2, help="fraction of the clean-adversarial pull that reaches clean views")
    parser.add_argument("--beta", type=float, default=1.0, help="hard-negative concentration beta")
    parser.add_argument("--tau-plus", type=float, default=0.1, help="hard-negative class prior tau+ in [0, 1)")
    return parse_and_resume(parser, argv, METHOD)


# ---------------------------------------------------------------------------------------------
# The method's loss
# ---------------------------------------------------------------------------------------------

def a_infonce_loss(z1, z2, z1_adv, z2_adv, temperature=0.5, ip=True, hn=True, ip_weight=0.7,
                   clean_grad_share=0.2, beta=1.0, tau_plus=0.1, terms=False):
    """A-InfoNCE over the 4B views; raw head outputs in. With terms=True also returns the
    same-type and the clean-adversarial parts of the loss (they add up to it)."""
    z = F.normalize(torch.cat([z1, z2, z1_adv, z2_adv]).float(), dim=1)
    n, b = z.shape[0], z.shape[0] // 4
    row = torch.arange(n, device=z.device)
    image, adversarial = row % b, row >= 2 * b
    negative = image[:, None] != image[None, :]  # N(u): the 4(B-1) views of other images
    n_neg = n - 4
    views = torch.arange(4, device=z.device)[None, :] * b + image[:, None]  # (4B, 4): u's image in each view
    positive = views != row[:, None]  # P(u): the three views that are not u
    cross = adversarial[:, None] != adversarial[views]  # clean-adversarial pairs
    shift = 1 / temperature  # logits are <= 1/t, so exp(M - shift) <= 1 never overflows

    def pair_losses(logits):  # l(u, p) for every anchor u and every view p of its image, (4B, 4)
        e = torch.exp(logits - shift)
        e_pos = e.gather(1, views)
        if hn:  # w_un = exp(beta M_un) / mean_n exp(beta M_un) = |N| softmax over the negatives
            w = n_neg * torch.where(negative, beta * logits, float("-inf")).softmax(1)
            mass = (w * e).sum(1, keepdim=True)
            floor = n_neg * math.exp(-1 / temperature - shift)
            ng = torch.clamp_min((mass - tau_plus * n_neg * e_pos) / (1 - tau_plus), floor)
        else:
            ng = (e * negative).sum(1, keepdim=True)
        return torch.log(e_pos + ng) - (logits.gather(1, views) - shift)

    losses = pair_losses(z @ z.T / temperature)
    weight = positive.float()
    if ip:  # inferior positives: only the anchor's side of a clean-adversarial pair gets gradient
        losses = torch.where(cross, pair_losses(z @ z.detach().T / temperature), losses)
        share = torch.where(adversarial, 1 - clean_grad_share, clean_grad_share)[:, None]
        weight = torch.where(cross, ip_weight * share, 1.0) * positive
    weighted = weight * losses / (3 * n)
    loss = weighted.sum()
    if terms:
        return loss, {"loss_same": torch.where(cross, 0.0, weighted).sum(), "loss_cross": torch.where(cross, weighted, 0.0).sum()}
    return loss


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
        strength, _ = dynacl_schedule(epoch, args.epochs, args.dynacl)  # no omega: one loss, not two streams
        sampler.set_epoch(epoch, strength, start=step % steps_per_epoch)
        for x1, x2, _, _ in loader:
            lr = lr_at(step, args.lr, warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)

            x1_adv, x2_adv = contrastive_pgd(net, x1, x2, eps, alpha, args.pgd_steps, args.temperature, amp)
            with autocast(amp):
                z1, z2 = train_net(torch.cat([x1, x2])).float().chunk(2)
                z1_adv, z2_adv = train_net(torch.cat([x1_adv, x2_adv]), adv=True).float().chunk(2)
            z1, z2, z1_adv, z2_adv = gather(z1, z2, z1_adv, z2_adv)  # the global batch under torchrun
            loss, terms = a_infonce_loss(z1, z2, z1_adv, z2_adv, args.temperature, args.ip, args.hn, args.ip_weight,
                                         args.clean_grad_share, args.beta, args.tau_plus, terms=True)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if run.end_of_step(step, epoch, lr, loss, terms):  # log, non-finite watch, checkpoint, Ctrl-C
                break
    return run.finish()


if __name__ == "__main__":
    main_guard(main)
