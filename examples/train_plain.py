"""A plain PyTorch training loop with asyncckpt: run it, kill it, run it again.

    python examples/train_plain.py --dir runs/plain --steps 300

Five lines differ from the same loop without asyncckpt (marked ``# asyncckpt``). Every 50 steps
the model, optimizer, scheduler and RNG states are staged and written in the background; a
restart resumes from the newest valid checkpoint, falling back past broken ones.
"""

from __future__ import annotations

import argparse

import torch

import asyncckpt  # asyncckpt


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default="runs/plain", help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    options = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.steps)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    with asyncckpt.AsyncCheckpointer(options.dir, keep_last=3) as ckpt:  # asyncckpt
        resumed = ckpt.restore(state)  # asyncckpt: None on a fresh run
        start = 0 if resumed is None else resumed.step
        if resumed is not None:
            asyncckpt.set_rng_state(resumed.state["rng"])  # asyncckpt
        for step in range(start + 1, options.steps + 1):
            inputs = torch.randn(64, 32)
            loss = (model(inputs) - inputs.sum(1, keepdim=True)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step % options.every == 0:
                ckpt.save(step, {**state, "rng": asyncckpt.rng_state()})  # asyncckpt
    print(f"trained steps {start + 1}-{options.steps}, final loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
