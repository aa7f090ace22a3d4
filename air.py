"""AIR: ACL + adversarial invariant regularisation (Xu, Zhang, Liu, Sugiyama & Kankanhalli, NeurIPS 2023).

    L = L_ACL + lambda1 * SIR + lambda2 * AIR,   SIR = KL(p || q),   AIR = KL(P^1 || P^2)

p, q: softmax over the batch of the similarity of each view's z1 / z2 to the original image's z0;
P^u: softmax of z_u_adv's similarity to z0 times softmax of its similarity to z_u (SPEC.md 2.2).
L_ACL is acl.py's loss; everything else (views, attack, schedule, DynACL) is acl.py's too.

    python air.py --dataset cifar10 --dynacl              # DynACL-AIR, the paper's best setting
    python air.py --dataset cifar10 --official-ir         # the released code's arithmetic (see README)
    python air.py --dataset synthetic --width 8 --batch-size 32 --pgd-steps 2 --max-steps 20 --workers 0
"""
import argparse
import os

import torch
import torch.nn.functional as F

from common import (UserError, NonFiniteWatch, Benchmark, RunLog, StopSignal, ResNet18, add_shared_flags, autocast,
                    contrastive_pgd, dynacl_schedule, lr_at, main_guard, make_checkpoint, make_optimizer, nt_xent,
                    parse_and_resume, pick_device, pretrain_loader, run_dir_for, save_checkpoint, set_rng_state,
                    stem_for, write_json)

METHOD = "air"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shared_flags(parser)
    parser.add_argument("--lambda1", type=float, default=0.5, help="weight of SIR, the standard invariant regulariser")
    parser.add_argument("--lambda2", type=float, default=0.5, help="weight of AIR, the adversarial invariant regulariser")
    parser.add_argument("--official-ir", action="store_true", help="compute SIR/AIR as the released code does, not as the paper's KL (README)")
    return parse_and_resume(parser, argv, METHOD)


def check_args(args):
    for name in ("lambda1", "lambda2"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0 (got {getattr(args, name)})")


# ---------------------------------------------------------------------------------------------
# The method's loss
# ---------------------------------------------------------------------------------------------

def invariant_regularizers(z1, z2, z0, z1_adv, z2_adv, temperature=0.5, official=False):
    """(SIR, AIR) of SPEC 2.2. Every distribution is a softmax across the batch index k of per-image
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


def air_loss(z1, z2, z0, z1_adv, z2_adv, omega=0.0, temperature=0.5, lambda1=0.5, lambda2=0.5, official=False):
    """ACL's dual-stream loss (acl.py) plus lambda1 * SIR + lambda2 * AIR: returns (loss, named terms)."""
    loss_clean = nt_xent(z1, z2, temperature)
    loss_adv = nt_xent(z1_adv, z2_adv, temperature)
    sir, air = invariant_regularizers(z1, z2, z0, z1_adv, z2_adv, temperature, official)
    loss = (1 - omega) * loss_clean + (1 + omega) * loss_adv + lambda1 * sir + lambda2 * air
    return loss, {"loss_clean": loss_clean, "loss_adv": loss_adv, "sir": sir, "air": air}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args, checkpoint = parse_args(argv)
    check_args(args)
    device = pick_device(args.device)
    amp = device.type == "cuda" and not args.no_amp  # bf16 autocast for the network, losses in fp32
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(args.seed)

    loader, sampler = pretrain_loader(args, device)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = args.epochs * steps_per_epoch
    stop_step = min(total_steps, args.max_steps or total_steps)
    warmup_steps = args.warmup_epochs * steps_per_epoch
    eps, alpha = args.eps / 255, args.pgd_alpha / 255

    model = ResNet18(args.width, stem_for(args.image_size)).to(device, memory_format=memory_format)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    step = 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        set_rng_state(checkpoint["rng"])
        print(f"resumed {args.resume} at step {step}", flush=True)
    net = torch.compile(model, dynamic=False) if args.compile else model  # the state dict stays the plain model's

    run_dir = run_dir_for(args, METHOD, args.resume)
    write_json(os.path.join(run_dir, "args.json"), vars(args))
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    print(f"{METHOD} on {args.dataset} ({device.type}{', bf16' if amp else ''}): {stop_step - step} steps "
          f"to step {stop_step} of {total_steps}, {steps_per_epoch} per epoch; writing {run_dir}", flush=True)
    names = ["loss", "loss_clean", "loss_adv", "sir", "air"]
    log = RunLog(run_dir, stop_step, step, args.batch_size, device)
    watch = NonFiniteWatch(device)
    stop = StopSignal()
    bench = Benchmark(device, args.batch_size, min(10, max(1, (stop_step - step) // 5))) if args.max_steps else None
    if bench and args.benchmark:
        bench.time_loader(loader, sampler, min(50, steps_per_epoch))

    while step < stop_step:
        epoch = step // steps_per_epoch + 1
        strength, omega = dynacl_schedule(epoch, args.epochs, args.dynacl)
        sampler.set_epoch(epoch, strength, start=step % steps_per_epoch)
        for x1, x2, x0 in loader:
            lr = lr_at(step, args.lr, warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
            x0 = x0.to(device, non_blocking=True, memory_format=memory_format)

            x1_adv, x2_adv = contrastive_pgd(net, x1, x2, eps, alpha, args.pgd_steps, args.temperature, amp)
            with autocast(amp):
                z1, z2 = net(torch.cat([x1, x2])).float().chunk(2)
                z1_adv, z2_adv = net(torch.cat([x1_adv, x2_adv]), adv=True).float().chunk(2)
                z0 = net(x0).float()  # its own clean-BN batch, as in the released code
            loss, terms = air_loss(z1, z2, z0, z1_adv, z2_adv, omega, args.temperature,
                                   args.lambda1, args.lambda2, args.official_ir)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

            terms = torch.stack([loss, *terms.values()]).detach()
            watch.update(step, terms)
            log.accumulate(terms)
            if bench:
                bench.step()
            if step % args.log_every == 0 or step == stop_step:
                watch.check(names, checkpoint_path, model)
                log.write(step, epoch, args.epochs, lr, names)
            epoch_end = step % steps_per_epoch == 0
            if epoch_end or stop.received or step == stop_step or (args.save_every and step % args.save_every == 0):
                watch.check(names, checkpoint_path, model)
                save_checkpoint(checkpoint_path, make_checkpoint(METHOD, args, model, optimizer, epoch, step))
            if stop.received:
                print(f"received {stop.received}: saved {checkpoint_path} at step {step}; continue with "
                      f"--resume {checkpoint_path}", flush=True)
                raise SystemExit(128 + {"SIGINT": 2, "SIGTERM": 15}[stop.received])
            if step == stop_step:
                break

    if bench:
        bench.summary(run_dir, METHOD)
    print(f"done: step {step}, checkpoint {checkpoint_path}", flush=True)
    return run_dir


if __name__ == "__main__":
    main_guard(main)
