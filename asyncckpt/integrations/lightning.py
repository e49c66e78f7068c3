"""PyTorch Lightning (``lightning`` 2.x): checkpoints through asyncckpt with one plugin.

::

    from asyncckpt.integrations.lightning import AsyncCheckpointIO

    trainer = L.Trainer(plugins=[AsyncCheckpointIO()], callbacks=[ModelCheckpoint(...)])
    trainer.fit(model, ckpt_path="last")  # or a checkpoint directory: its newest usable checkpoint

Every checkpoint Lightning writes (``ModelCheckpoint``, ``trainer.save_checkpoint``) is staged
and written in the background, durable, checksummed and pickle-free, at the path Lightning
chooses. See docs/integrations/lightning.md. Importing this module imports ``lightning``.
"""

from __future__ import annotations

from ._optional import missing_framework

try:
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # the optional extra is not installed
    raise missing_framework(exc, __name__, "pip install 'asyncckpt[lightning]'") from exc

from ._lightning import AsyncCheckpointIOBase, load_checkpoint, resume_path

__all__ = ["AsyncCheckpointIO", "load_checkpoint", "resume_path"]


class AsyncCheckpointIO(AsyncCheckpointIOBase, CheckpointIO, Callback):
    """A ``CheckpointIO`` plugin that writes Lightning's checkpoints through asyncckpt.

    ``Trainer(plugins=[AsyncCheckpointIO()])`` is all it takes. Pass the same object in
    ``callbacks=`` too and ``save_checkpoint`` also knows the module and optimizers whose
    tensors Lightning's state dict shares: their copies then overlap the next forward and
    backward instead of stalling training (the next optimizer step waits for them).

    Options (keyword-only): ``max_pending`` (checkpoints in flight; 2 lets a ``ModelCheckpoint``
    save and its ``last.ckpt`` go without waiting), ``when_busy`` (``"wait"`` or ``"skip"``),
    ``verify`` (read each file back before it is committed: ``"structure"``, ``"full"``,
    ``"none"``), ``fallback`` (a broken checkpoint falls back to the newest usable one of its
    directory), ``handle_sigterm``, ``close_timeout``, ``background_nice`` (as for
    :class:`asyncckpt.AsyncCheckpointer`).
    """
