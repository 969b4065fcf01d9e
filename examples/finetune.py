"""Fine-tune a gated model on one or several processes with PyTorch's own engine (DDP, or FSDP2
with --fsdp), on synthetic data, and save it with se_inject.save.

    python examples/finetune.py                                   # one process
    torchrun --nproc_per_node 2 examples/finetune.py              # DDP, 2 processes (CPU: gloo)
    torchrun --nproc_per_node 2 examples/finetune.py --fsdp       # FSDP2 (fully_shard)

The gates start as the identity (init="identity"), so step 0 computes what the plain model did.
Each rank sees its own slice of a synthetic 4-class set whose class sets the channel means.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F

import se_inject


def gate_vector(model: torch.nn.Module, sharded: bool) -> torch.Tensor:
    """Every gate parameter, flattened into one CPU vector (FSDP2's shards gathered whole)."""
    params = [p for name, p in model.named_parameters() if ".se_gate" in name]
    if sharded:
        params = [p.full_tensor() for p in params]   # DTensor shards -> whole
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in params])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="per process")
    ap.add_argument("--size", type=int, default=32, help="image height and width")
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    ap.add_argument("--out", default="finetuned_se.safetensors")
    args = ap.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)                       # every rank builds the same model and gates
    model = timm.create_model(args.model, pretrained=False, num_classes=4)
    se_inject.apply(model, init="identity", input_size=(3, args.size, args.size))
    model.to(device)
    if distributed and args.fsdp:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
        net = model
    elif distributed:
        net = torch.nn.parallel.DistributedDataParallel(model)
    else:
        net = model
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sharded = bool(args.fsdp and distributed)
    at_zero = gate_vector(model, sharded) == 0  # the excitation weights identity init zeroed

    g = torch.Generator().manual_seed(1)       # the same data set on every rank
    pattern = torch.randn(4, 3, 1, 1, generator=g)
    n = args.batch * world * 4
    labels = torch.randint(0, 4, (n,), generator=g)
    images = 2 * torch.randn(n, 3, args.size, args.size, generator=g) + pattern[labels]
    mine = torch.arange(rank, n, world)        # this rank's slice

    start = time.perf_counter()
    net.train()
    for step in range(args.steps):
        idx = mine[torch.randint(0, len(mine), (args.batch,), generator=g)]
        x, y = images[idx].to(device), labels[idx].to(device)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}  "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    flat = gate_vector(model, sharded)
    if distributed:
        everyone = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(everyone, flat.to(device) if cuda else flat)
        same = all(torch.equal(e.cpu(), flat) for e in everyone)
    else:
        same = True
    moved = bool(at_zero.any() and flat[at_zero].abs().sum() > 0)

    if sharded:                                # gather the shards into a whole state_dict
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    else:
        state = None
    if rank == 0:
        if state is not None:
            plain = timm.create_model(args.model, pretrained=False, num_classes=4)
            se_inject.apply(plain, init="identity", input_size=(3, args.size, args.size))
            plain.load_state_dict(state)
            to_save = plain
        else:
            to_save = model
        se_inject.save(to_save.cpu(), args.out, force=True)
        engine = "FSDP2" if sharded else "DDP" if distributed else "none"
        print(f"processes: {world}, engine: {engine}")
        print(f"gate parameters identical across ranks: {same}")
        print(f"gates learned (excitation weights left zero): {moved}")
        print(f"saved {args.out}; load it with se_inject.load({args.out!r})")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
