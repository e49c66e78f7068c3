"""Trainer integrations: PyTorch Lightning and the Hugging Face ``Trainer``.

Each lives in its own module and imports its framework only there, so ``import asyncckpt``
never imports a framework:

- :mod:`asyncckpt.integrations.lightning`: ``AsyncCheckpointIO`` for ``lightning`` 2.x
  (:mod:`asyncckpt.integrations.pytorch_lightning` for the ``pytorch_lightning`` package);
- :mod:`asyncckpt.integrations.transformers`: ``AsyncCheckpointTrainer`` and
  ``AsyncCheckpointMixin`` for ``transformers``' ``Trainer``.
"""
