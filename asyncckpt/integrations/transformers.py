"""Hugging Face ``Trainer``: checkpoints through asyncckpt by changing the class.

::

    from asyncckpt.integrations.transformers import AsyncCheckpointTrainer

    trainer = AsyncCheckpointTrainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=trainer.has_checkpoint())

Each checkpoint the ``Trainer`` decides to take (``save_strategy``, ``save_steps``) is one
asyncckpt file in ``<output_dir>/asyncckpt/``: model, optimizer, LR scheduler, gradient scaler,
RNG states and ``TrainerState``, staged and written in the background, durable, checksummed and
pickle-free. ``resume_from_checkpoint=True`` resumes from the newest usable one, falling back
past broken ones. A subclass of ``Trainer`` of your own gets the same with
:class:`AsyncCheckpointMixin`. See docs/integrations/transformers.md. Importing this module
imports ``transformers``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ._optional import missing_framework

try:
    import transformers
    from transformers import Trainer
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # the optional extra is not installed
    raise missing_framework(exc, __name__, "pip install 'asyncckpt[transformers]'") from exc

from ..checkpointer import AsyncCheckpointer
from ..errors import CheckpointError, UsageError
from ..loading import LoadResult, load_latest
from ..oneshot import load
from ..rng import rng_state, set_rng_state
from ..saving.options import DEFAULT_BACKGROUND_NICE
from ..saving.readback import VerifyMode

__all__ = ["AsyncCheckpointMixin", "AsyncCheckpointTrainer", "CHECKPOINT_SUBDIR"]

CHECKPOINT_SUBDIR = "asyncckpt"
TRAINER_STATE_NAME = "trainer_state.json"  # what Trainer.train reads from a checkpoint directory
_RESUME_PREFIX = "asyncckpt-resume-"


class AsyncCheckpointMixin:
    """Makes a ``transformers.Trainer`` (sub)class checkpoint through asyncckpt.

    ``class MyTrainer(AsyncCheckpointMixin, SFTTrainer): ...``. Keyword-only options, taken
    before the ``Trainer``'s own: ``checkpoint_dir`` (default ``<output_dir>/asyncckpt``),
    ``max_pending``, ``verify``, ``close_timeout``, ``background_nice`` (10 slowed a quiet 2-core
    run 4.5% instead of 18.6%, but far more with other processes busy:
    docs/integrations/transformers.md) and ``overlap`` (as for
    :class:`asyncckpt.AsyncCheckpointer`; default False here: every tensor is copied inside the
    save, which on a 2-core CPU run slowed training 11% at a checkpoint per 20 steps, as the
    Trainer's own saving did, where overlapping the copies with forward and backward slowed it
    27% for a 5 ms instead of 12 ms stall). ``args.save_total_limit`` is the number of
    checkpoints kept (the newest valid one is never deleted).

    Resume: ``train(resume_from_checkpoint=True)`` (or the checkpoint directory, or one
    ``.ckpt`` file) loads the newest usable checkpoint, falling back past broken ones with a
    warning that names them, and restores the model, optimizer, scheduler, scaler, RNG states and
    ``TrainerState``, so data order and every later step are those of an uninterrupted run. A
    Hugging Face checkpoint directory (``checkpoint-500/``) still resumes the ``Trainer``'s own way.
    """

    def __init__(
        self,
        *args: Any,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        max_pending: int = 1,
        verify: VerifyMode = "structure",
        close_timeout: float | None = None,
        overlap: bool = False,
        background_nice: int = DEFAULT_BACKGROUND_NICE,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.asyncckpt_background_nice = background_nice
        self.asyncckpt_overlap = overlap
        self.asyncckpt_max_pending = max_pending
        self.asyncckpt_verify: VerifyMode = verify
        self.asyncckpt_close_timeout = close_timeout
        self.asyncckpt_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.last_load: LoadResult | None = None
        self._checkpointer: AsyncCheckpointer | None = None
        self._resume_dir: str | None = None  # the directory Trainer.train reads TrainerState from

    @property
    def checkpointer(self) -> AsyncCheckpointer | None:
        """The open checkpointer while ``train()`` runs (for ``stats()``, ``flush()``), else None."""
        return self._checkpointer

    def checkpoint_directory(self, trial: Any = None) -> Path:
        """Where the checkpoints go: ``checkpoint_dir``, or ``asyncckpt/`` in the run's output directory."""
        if self.asyncckpt_dir is not None:
            return self.asyncckpt_dir
        return Path(self._get_output_dir(trial=trial)) / CHECKPOINT_SUBDIR  # type: ignore[attr-defined]

    def has_checkpoint(self) -> bool:
        """Whether the checkpoint directory holds a checkpoint to resume from (valid or not)."""
        root = self.checkpoint_directory()
        return root.is_dir() and any(
            entry.is_file() and entry.suffix == ".ckpt" and not entry.name.startswith(".")
            for entry in root.iterdir()
        )

    # ------------------------------------------------------------------ train

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; an asyncckpt checkpoint to resume from is loaded first (see the class).

        Raises :class:`asyncckpt.NoValidCheckpointError` when ``resume_from_checkpoint=True``
        and no checkpoint is usable (its ``diagnostics`` say why), ``FileNotFoundError`` for a
        path that does not exist, and, when training ends,
        :class:`asyncckpt.CheckpointWriteError` for a save that failed in the background.
        """
        self._check_supported()
        resume = self._prepare_resume(resume_from_checkpoint)
        try:
            output = super().train(resume, *args, **kwargs)  # type: ignore[misc]
        except BaseException as exc:
            self._finish(exc)
            raise
        self._finish(None)
        return output

    def _check_supported(self) -> None:
        args: Any = self.args  # type: ignore[attr-defined]
        unsupported = [
            ("several processes (world_size > 1)", args.world_size > 1),
            ("DeepSpeed", bool(getattr(self, "is_deepspeed_enabled", False))),
            ("FSDP", bool(getattr(self, "is_fsdp_enabled", False))),
            ("load_best_model_at_end=True", bool(args.load_best_model_at_end)),
        ]
        for what, present in unsupported:
            if present:
                raise UsageError(
                    f"{type(self).__name__} does not support {what} yet; use transformers' own Trainer for it"
                )

    def _prepare_resume(self, resume: str | bool | None) -> str | bool | None:
        """Load an asyncckpt checkpoint and lay out the one file ``Trainer.train`` reads itself."""
        self.last_load = None
        if resume is None or resume is False:
            return None
        if resume is True:
            result = self._load(self.checkpoint_directory())
        elif os.path.isfile(os.path.join(resume, TRAINER_STATE_NAME)):
            return resume  # a Hugging Face checkpoint directory: the Trainer's own way
        elif not os.path.exists(resume):
            raise FileNotFoundError(f"Checkpoint not found: {resume}")
        else:
            result = self._load(Path(resume))
        state = result.state
        if not isinstance(state, dict) or not isinstance(state.get("trainer_state"), str):
            raise CheckpointError(
                "not a Trainer checkpoint (no trainer_state)", path=result.path, step=result.step
            )
        self.last_load = result
        self._resume_dir = tempfile.mkdtemp(prefix=_RESUME_PREFIX)
        Path(self._resume_dir, TRAINER_STATE_NAME).write_text(state["trainer_state"], encoding="utf-8")
        return self._resume_dir

    def _load(self, target: Path) -> LoadResult:
        if target.is_file():
            try:
                loaded = load(target)
            except CheckpointError as exc:
                warnings.warn(f"asyncckpt: {target} is not usable ({exc})", RuntimeWarning, stacklevel=4)
                return self._rollback(target.parent)
            return LoadResult(
                loaded.state, loaded.step, target, loaded.version, "primary", [], "", loaded.metadata
            )
        return self._rollback(target)

    def _rollback(self, directory: Path) -> LoadResult:
        result = load_latest(directory, expect={"model": self.model})  # type: ignore[attr-defined]
        if result.diagnostics:
            skipped = "; ".join(f"{d.path}: {d.reason}" for d in result.diagnostics)
            warnings.warn(
                f"asyncckpt: resuming from {result.path} (step {result.step}), skipping {skipped}",
                RuntimeWarning,
                stacklevel=5,
            )
        return result

    def _finish(self, error: BaseException | None) -> None:
        """Flush and close the checkpointer (a failure never hides the training's own error)."""
        checkpointer, self._checkpointer = self._checkpointer, None
        resume_dir, self._resume_dir = self._resume_dir, None
        if resume_dir is not None:
            shutil.rmtree(resume_dir, ignore_errors=True)
        if checkpointer is not None:
            checkpointer.__exit__(type(error) if error else None, error, None)

    # ------------------------------------------------------------------ saving

    def _save_checkpoint(self, model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
        """One asyncckpt checkpoint of the training state at ``state.global_step`` (replaces the
        ``checkpoint-N/`` directory; ``save_model()`` still exports the model the usual way)."""
        trainer: Any = self
        if trainer.hp_search_backend is None and trial is None:
            trainer.store_flos()
        if not trainer.args.should_save:
            return
        self._export_callback_states()
        state, metadata = self._checkpoint_state()
        self._open(trial).save(trainer.state.global_step, state, metadata=metadata)

    def _checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The state one checkpoint holds, and its metadata."""
        trainer: Any = self
        state: dict[str, Any] = {"model": trainer.model}
        if not trainer.args.save_only_model:
            state["optimizer"] = trainer.optimizer
            state["lr_scheduler"] = trainer.lr_scheduler
            scaler = getattr(trainer.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler
            state["rng"] = rng_state()
        state["trainer_state"] = (
            json.dumps(dataclasses.asdict(trainer.state), indent=2, sort_keys=True) + "\n"
        )
        return state, {"framework": "transformers", "transformers_version": transformers.__version__}

    def _export_callback_states(self) -> None:
        """What ``Trainer._save_checkpoint`` does before it writes ``trainer_state.json``."""
        trainer: Any = self
        handler = trainer.callback_handler
        for callback in [*handler.callbacks, trainer.control]:
            if not isinstance(callback, ExportableState):
                continue
            name = type(callback).__name__
            if isinstance(trainer.state.stateful_callbacks.get(name), list):
                trainer.state.stateful_callbacks[name].append(callback.state())
            else:
                trainer.state.stateful_callbacks[name] = callback.state()

    def _open(self, trial: Any) -> AsyncCheckpointer:
        directory = self.checkpoint_directory(trial)
        if self._checkpointer is not None and self._checkpointer.directory == directory:
            return self._checkpointer
        if self._checkpointer is not None:
            self._checkpointer.close()
        limit = self.args.save_total_limit  # type: ignore[attr-defined]
        checkpointer = AsyncCheckpointer(
            directory,
            keep_last=limit or None,
            max_pending=self.asyncckpt_max_pending,
            verify=self.asyncckpt_verify,
            close_timeout=self.asyncckpt_close_timeout,
            background_nice=self.asyncckpt_background_nice,
            overlap=self.asyncckpt_overlap,
        )
        self._checkpointer = checkpointer.__enter__()
        return checkpointer

    # ------------------------------------------------------------------ resuming (Trainer's hooks)

    def _resuming(self, checkpoint: Any) -> dict[str, Any] | None:
        """The loaded state when ``checkpoint`` is the directory :meth:`_prepare_resume` made."""
        if self._resume_dir is None or checkpoint is None or self.last_load is None:
            return None
        if os.path.abspath(checkpoint) != os.path.abspath(self._resume_dir):
            return None
        state: dict[str, Any] = self.last_load.state
        return state

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        state = self._resuming(resume_from_checkpoint)
        if state is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
            return
        target = model if model is not None else self.model  # type: ignore[attr-defined]
        target.load_state_dict(state["model"], strict=True)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        state = self._resuming(checkpoint)
        if state is None:
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
            return
        trainer: Any = self
        if "optimizer" in state:
            trainer.optimizer.load_state_dict(state["optimizer"])
        if "lr_scheduler" in state:
            with warnings.catch_warnings():  # torch warns about saving/loading the optimizer too
                warnings.simplefilter("ignore", UserWarning)
                trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        state = self._resuming(checkpoint)
        if state is None:
            parent = getattr(super(), "_load_scaler", None)
            if parent is not None:
                parent(checkpoint)
            return
        scaler = getattr(self.accelerator, "scaler", None)  # type: ignore[attr-defined]
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])

    def _load_rng_state(self, checkpoint: str | None) -> None:
        state = self._resuming(checkpoint)
        if state is None:
            super()._load_rng_state(checkpoint)  # type: ignore[misc]
            return
        if "rng" in state:
            set_rng_state(state["rng"])


class AsyncCheckpointTrainer(AsyncCheckpointMixin, Trainer):
    """``transformers.Trainer`` with asyncckpt checkpoints (see :class:`AsyncCheckpointMixin`)."""
