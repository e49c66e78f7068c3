"""Train an FSDP2-sharded MLP on several ranks, checkpointed by asyncckpt; rerun it to resume.

    torchrun --nproc-per-node 2 examples/torchrun_fsdp2.py --dir run/ --steps 200

CPU with gloo by default, CUDA with NCCL when there is a GPU per rank. Every rank opens the
checkpointer and calls ``restore()`` and ``save()`` with the same steps: asyncckpt notices
``torch.distributed`` and writes multi-rank steps (one shard file per rank, a commit record
written last) in the background, over a gloo group of its own. Kill the job (any rank, any
time) and start it again: every rank resumes from the same committed step, at any world size.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import asyncckpt


def build_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 1),
    ).to(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", required=True, help="checkpoint directory (shared by every rank)")
    parser.add_argument("--steps", type=int, default=200, help="train up to this step")
    parser.add_argument("--save-every", type=int, default=20, help="checkpoint every this many steps")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = build_model(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1000 + rank)  # each rank draws its own batches (its RNG state is saved per rank)

    with asyncckpt.AsyncCheckpointer(args.dir, keep_last=3) as ckpt:
        restored = ckpt.restore({"model": model, "optimizer": optimizer})  # the same step on every rank
        start = 1
        if restored is not None:
            if restored.state:  # per-rank values come back at the world size that saved them
                asyncckpt.set_rng_state(restored.state["rng"])
            start = restored.step + 1
        loss = torch.zeros(())
        for step in range(start, args.steps + 1):
            x = torch.randn(16, 32, device=device)
            loss = (model(x) - x.sum(dim=1, keepdim=True)).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % args.save_every == 0:
                ckpt.save(step, {"model": model, "optimizer": optimizer, "rng": asyncckpt.rng_state()})
    if rank == 0:
        first = "started fresh" if restored is None else f"resumed from step {restored.step}"
        world = dist.get_world_size()
        print(f"{first}; trained steps {start}-{args.steps} on {world} ranks; loss {loss.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
