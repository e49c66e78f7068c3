"""The Lightning ``CheckpointIO`` plugin's behaviour, shared by ``lightning`` and ``pytorch_lightning``.

This module imports neither package: :mod:`asyncckpt.integrations.lightning` and
:mod:`asyncckpt.integrations.pytorch_lightning` combine :class:`AsyncCheckpointIOBase` with
their package's ``CheckpointIO`` and ``Callback`` classes.

Lightning chooses every name (``epoch=3-step=120.ckpt``, ``last.ckpt``, versioned names) and
every deletion (``save_top_k``); the plugin keeps one :class:`asyncckpt.AsyncCheckpointer` per
directory, with no retention of its own, and writes each checkpoint at the path Lightning gives.
"""

from __future__ import annotations

import atexit
import os
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._tree import key_path
from ..checkpointer import AsyncCheckpointer, WhenBusy
from ..errors import CheckpointError, UnsupportedValueError
from ..loading import LoadResult, load_latest
from ..oneshot import load
from ..saving.options import DEFAULT_BACKGROUND_NICE
from ..saving.readback import VerifyMode

HPARAMS_KEY = "hyper_parameters"
_PLAIN = (str, int, float, bool, bytes, type(None))


class AsyncCheckpointIOBase:
    """Writes Lightning's checkpoints through asyncckpt; see ``AsyncCheckpointIO``."""

    framework = "lightning"

    def __init__(
        self,
        *,
        max_pending: int = 2,
        when_busy: WhenBusy = "wait",
        verify: VerifyMode = "structure",
        fallback: bool = True,
        handle_sigterm: bool = False,
        close_timeout: float | None = None,
        background_nice: int = DEFAULT_BACKGROUND_NICE,
    ) -> None:
        self.max_pending = max_pending
        self.background_nice = background_nice
        self.when_busy: WhenBusy = when_busy
        self.verify: VerifyMode = verify
        self.fallback = fallback
        self.handle_sigterm = handle_sigterm
        self.close_timeout = close_timeout
        self.last_load: LoadResult | None = None
        self._open: dict[Path, AsyncCheckpointer] = {}
        self._trainer: Any = None  # a weak reference, set while attached as a callback

    # ------------------------------------------------------------------ CheckpointIO

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        """Stage ``checkpoint`` and write it at ``path`` in the background.

        Returns once the state is staged. Raises :class:`asyncckpt.UnsupportedValueError`
        naming the key of a value the format cannot store (nothing is written), and
        :class:`asyncckpt.CheckpointWriteError` for an earlier background failure.
        """
        if storage_options is not None:
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by "
                f"{type(self).__name__}"
            )
        target = Path(path)
        _check_hyper_parameters(checkpoint, target)
        step = _int(checkpoint.get("global_step"), default=0)
        metadata = {"framework": self.framework, "epoch": _int(checkpoint.get("epoch"), default=-1)}
        checkpointer = self._checkpointer(target.parent)
        try:
            checkpointer.save(
                step, checkpoint, name=target.name, metadata=metadata, overlap_with=self._live()
            )
        except UnsupportedValueError as exc:
            raise _with_hint(exc, target) from exc

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint; ``path`` may be a file or a directory of checkpoints.

        A directory resumes from its newest usable checkpoint (every ``*.ckpt``, newest step
        first), falling back past broken ones. A broken file falls back the same way to the
        newest usable checkpoint of its directory (unless ``fallback=False``), with a warning
        that names what was skipped; :attr:`last_load` tells which file was loaded and why.
        Nothing is ever unpickled: ``weights_only`` is always true in effect. Raises
        :class:`asyncckpt.NoValidCheckpointError` when nothing is usable, ``FileNotFoundError``
        for a missing path.
        """
        del weights_only  # asyncckpt files hold no pickle; legacy files load weights_only=True
        target = Path(path)
        device = _device(map_location)
        directory = target if target.is_dir() else target.parent
        self._flush(directory)  # a pending save there must land before it can be read
        if target.is_dir():
            return _as_dict(self._rollback(directory, device).state, directory)
        if not target.exists():
            raise FileNotFoundError(f"Checkpoint file not found: {target}")
        try:
            loaded = load(target, map_location=device)
        except CheckpointError as exc:
            if not self.fallback:
                raise
            result = self._rollback(directory, device)
            warnings.warn(
                f"asyncckpt: {target} is not usable ({exc}); resumed from {result.path} (step {result.step})",
                RuntimeWarning,
                stacklevel=2,
            )
            return _as_dict(result.state, Path(result.path))
        self.last_load = LoadResult(
            loaded.state,
            loaded.step,
            target,
            loaded.version,
            "primary",
            [],
            f"loaded {target}",
            loaded.metadata,
        )
        return _as_dict(loaded.state, target)

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete ``path`` once every save queued before this call is done.

        If the save queued just before it fails, the file is kept (an older intact checkpoint
        is worth more than the space); the writer logs the decision and never raises for it.
        """
        target = Path(path)
        self._checkpointer(target.parent).delete(target.name)

    def flush(self) -> None:
        """Block until every pending save is committed; raise the first background failure."""
        for checkpointer in list(self._open.values()):
            checkpointer.flush()

    def teardown(self, *args: Any, **kwargs: Any) -> None:
        """Wait for every pending save and stop the writers; raise the first background failure.

        Lightning calls this at the end of ``fit``/``validate``/``test`` (as the plugin and,
        when attached, as a callback); the next save opens the writers again.
        """
        self._trainer = None
        first: BaseException | None = None
        while self._open:
            _, checkpointer = self._open.popitem()
            try:
                checkpointer.close()
            except BaseException as exc:  # close every writer; raise the first failure after
                first = first or exc
        if first is not None:
            raise first

    # ------------------------------------------------------------------ Callback

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """As a callback: remember the trainer, so saves overlap the parameter and optimizer copies."""
        self._trainer = weakref.ref(trainer)

    # ------------------------------------------------------------------ internals

    def _checkpointer(self, directory: Path) -> AsyncCheckpointer:
        key = directory.absolute()
        checkpointer = self._open.get(key)
        if checkpointer is None:
            checkpointer = AsyncCheckpointer(
                directory,
                keep_last=None,  # Lightning's ModelCheckpoint decides what to delete
                max_pending=self.max_pending,
                when_busy=self.when_busy,
                verify=self.verify,
                handle_sigterm=self.handle_sigterm,
                close_timeout=self.close_timeout,
                background_nice=self.background_nice,
            )
            checkpointer.__enter__()
            self._open[key] = checkpointer
            _close_at_exit(self)
        return checkpointer

    def _flush(self, directory: Path) -> None:
        checkpointer = self._open.get(directory.absolute())
        if checkpointer is not None:
            checkpointer.flush()

    def _rollback(self, directory: Path, device: torch.device) -> LoadResult:
        result = load_latest(
            directory, map_location=device, on_corrupt="fallback" if self.fallback else "fail"
        )
        if result.diagnostics:
            skipped = "; ".join(f"{d.path}: {d.reason}" for d in result.diagnostics)
            warnings.warn(
                f"asyncckpt: resumed from {result.path} (step {result.step}), skipping {skipped}",
                RuntimeWarning,
                stacklevel=3,
            )
        self.last_load = result
        return result

    def _live(self) -> Sequence[Any]:
        """The module and optimizers whose tensors Lightning's state dict shares (attached only)."""
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None:
            return ()
        module = getattr(trainer, "lightning_module", None)
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        return [*([module] if isinstance(module, torch.nn.Module) else []), *optimizers]


_AT_EXIT: weakref.WeakSet[AsyncCheckpointIOBase] = weakref.WeakSet()


def _close_at_exit(plugin: AsyncCheckpointIOBase) -> None:
    """Have ``plugin``'s writers closed at the interpreter's exit, if still open then.

    Lightning tears the plugin down at the end of ``fit``/``validate``/``test`` only: a
    ``trainer.save_checkpoint()`` after that reopens a writer that nothing else would close,
    and its pending save would be lost when the script ends. A failure then is printed by
    ``atexit`` (never lost without a word).
    """
    atexit.unregister(_teardown_all)  # registered once, however many plugins
    atexit.register(_teardown_all)
    _AT_EXIT.add(plugin)


def _teardown_all() -> None:
    plugins = list(_AT_EXIT)
    _AT_EXIT.clear()
    atexit.unregister(_teardown_all)
    first: BaseException | None = None
    for plugin in plugins:
        try:
            plugin.teardown()
        except BaseException as exc:  # close every plugin's writers; raise the first failure after
            first = first or exc
    if first is not None:
        raise first


def resume_path(directory: str | os.PathLike[str]) -> str | None:
    """``directory`` when it holds a checkpoint to resume from, else None (a fresh start).

    For ``trainer.fit(model, ckpt_path=resume_path("checkpoints/"))``: Lightning loads nothing
    for ``None``, and for a directory the plugin resumes from its newest usable checkpoint.
    """
    root = Path(directory)
    if not root.is_dir():
        return None
    found = any(
        entry.is_file() and entry.suffix == ".ckpt" and not entry.name.startswith(".")
        for entry in root.iterdir()
    )
    return str(root) if found else None


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Lightning's checkpoint dict from a file (or the newest usable one of a directory).

    What ``torch.load`` gives for Lightning's own files, e.g. to build a model from
    ``ckpt["hyper_parameters"]`` and ``ckpt["state_dict"]``. Raises what
    :func:`asyncckpt.load` and :func:`asyncckpt.load_latest` raise.
    """
    target = Path(path)
    if target.is_dir():
        return _as_dict(load_latest(target, map_location=map_location).state, target)
    return _as_dict(load(target, map_location=map_location).state, target)


def _check_hyper_parameters(checkpoint: Mapping[str, Any], path: Path) -> None:
    """Hyper-parameters are rebuilt into constructor arguments: objects with ``state_dict()``
    (modules, optimizers) would come back as dicts, so they are refused before anything is
    written, as the format refuses every value it cannot rebuild exactly."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((HPARAMS_KEY,), checkpoint.get(HPARAMS_KEY))]
    while stack:
        where, value = stack.pop()
        if isinstance(value, Mapping):
            stack.extend(((*where, k), v) for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack.extend(((*where, i), v) for i, v in enumerate(value))
        elif not isinstance(value, _PLAIN) and callable(getattr(value, "state_dict", None)):
            key = key_path(where)
            raise UnsupportedValueError(
                f"{key}: a {type(value).__qualname__} in the hyper-parameters cannot be rebuilt from a "
                f"checkpoint; {_HPARAMS_HINT.format(name=where[1] if len(where) > 1 else '...')}",
                key=key,
                path=path,
            )


_HPARAMS_HINT = (
    "it is a hyper-parameter: `self.save_hyperparameters(ignore=[{name!r}])` leaves it out "
    "(modules and optimizers are saved with their own state anyway)"
)


def _with_hint(exc: UnsupportedValueError, path: Path) -> UnsupportedValueError:
    key = exc.key or ""
    if not key.startswith(f"state[{HPARAMS_KEY!r}]"):
        return UnsupportedValueError(exc.reason, key=exc.key, path=path)
    name = key.removeprefix(f"state[{HPARAMS_KEY!r}][").split("]")[0].strip("'\"")
    return UnsupportedValueError(f"{exc.reason}; {_HPARAMS_HINT.format(name=name)}", key=exc.key, path=path)


def _as_dict(state: Any, path: Path) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise CheckpointError(f"not a Lightning checkpoint: the state is a {type(state).__name__}", path=path)
    return state


def _int(value: Any, *, default: int) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value.item())
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default


def _device(map_location: Any) -> torch.device:
    """Lightning passes callables and dicts too; those (and None) load to the CPU, and Lightning
    moves the tensors where the model is."""
    if isinstance(map_location, str | torch.device):
        return torch.device(map_location)
    return torch.device("cpu")
