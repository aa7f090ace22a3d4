"""ACL: adversarial contrastive learning (Jiang, Chen, Chen & Wang, NeurIPS 2020), dual-stream variant.

    L = (1 - omega) * NT-Xent(z1, z2) + (1 + omega) * NT-Xent(z1_adv, z2_adv)

x1, x2 are two augmented views; x1_adv, x2_adv their joint contrastive-PGD versions; clean views go
through the clean batch norms, adversarial ones through the adversarial batch norms. omega = 0
unless --dynacl (DynACL, Luo et al., ICLR 2023). The equations are SPEC.md 1.2-1.6 and 2.1.

    python acl.py --dataset cifar10                       # the paper's setting (1000 epochs, batch 512)
    python acl.py --dataset cifar10 --dynacl              # DynACL
    python acl.py --dataset synthetic --width 8 --batch-size 32 --pgd-steps 2 --max-steps 20 --workers 0
"""
import argparse
import os

import torch

from common import (NonFiniteWatch, Benchmark, RunLog, StopSignal, ResNet18, add_shared_flags, autocast,
                    contrastive_pgd, dynacl_schedule, lr_at, main_guard, make_checkpoint, make_optimizer, nt_xent,
                    parse_and_resume, pick_device, pretrain_loader, run_dir_for, save_checkpoint, set_rng_state,
                    stem_for, write_json)

METHOD = "acl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shared_flags(parser)
    return parse_and_resume(parser, argv, METHOD)


def check_args(args):
    """ACL has no flags of its own; the shared ones are checked in common.parse_and_resume."""


# ---------------------------------------------------------------------------------------------
# The method's loss
# ---------------------------------------------------------------------------------------------

def acl_loss(z1, z2, z1_adv, z2_adv, omega=0.0, temperature=0.5):
    """ACL's dual-stream loss with DynACL's weights (SPEC 2.1): returns (loss, named terms)."""
    loss_clean = nt_xent(z1, z2, temperature)
    loss_adv = nt_xent(z1_adv, z2_adv, temperature)
    loss = (1 - omega) * loss_clean + (1 + omega) * loss_adv
    return loss, {"loss_clean": loss_clean, "loss_adv": loss_adv}


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
    names = ["loss", "loss_clean", "loss_adv"]
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
        for x1, x2, _ in loader:
            lr = lr_at(step, args.lr, warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)

            x1_adv, x2_adv = contrastive_pgd(net, x1, x2, eps, alpha, args.pgd_steps, args.temperature, amp)
            with autocast(amp):
                z1, z2 = net(torch.cat([x1, x2])).float().chunk(2)
                z1_adv, z2_adv = net(torch.cat([x1_adv, x2_adv]), adv=True).float().chunk(2)
            loss, terms = acl_loss(z1, z2, z1_adv, z2_adv, omega, args.temperature)

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
