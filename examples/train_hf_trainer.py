"""The Hugging Face Trainer with asyncckpt: run it, kill it, run it again.

    python examples/train_hf_trainer.py --output runs/hf --steps 60

Three lines differ from the same script without asyncckpt (marked ``# asyncckpt``): the import,
the Trainer class, and ``resume_from_checkpoint``, which resumes from the newest valid
checkpoint (data order, RNG, optimizer, scheduler and TrainerState exactly as if never stopped).
The model is a tiny GPT-2 built from a config: nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from asyncckpt.integrations.transformers import AsyncCheckpointTrainer  # asyncckpt


class RandomTokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 256

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 128, (32,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="runs/hf", help="the Trainer's output_dir")
    parser.add_argument("--steps", type=int, default=60)
    options = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    args = TrainingArguments(
        options.output,
        max_steps=options.steps,
        save_steps=20,
        save_total_limit=2,
        per_device_train_batch_size=8,
        logging_steps=20,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = AsyncCheckpointTrainer(
        model=GPT2LMHeadModel(config), args=args, train_dataset=RandomTokens()
    )  # asyncckpt
    trainer.train(resume_from_checkpoint=trainer.has_checkpoint())  # asyncckpt: False on a fresh run
    print(f"trained to step {trainer.state.global_step}")


if __name__ == "__main__":
    main()
