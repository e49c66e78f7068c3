"""Direct writes (O_DIRECT) of long aligned runs: the bytes on disk are the bytes given, and every
way the kernel can refuse or fail one ends in a correct file or the write error, never a torn one."""

from __future__ import annotations

import errno
import mmap
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt import CheckpointWriteError
from asyncckpt.saving.buffers import aligned_zeros, destination
from asyncckpt.storage.direct import ALIGN, BOUNCE, DIRECT_MIN, HAVE_DIRECT, direct_capable
from asyncckpt.storage.posix import FileOps, PosixStorage
from asyncckpt.testing import RecordingOps

pytestmark = pytest.mark.skipif(not HAVE_DIRECT, reason="no O_DIRECT on this platform")


class CountingOps(FileOps):
    """Real calls; direct writes counted, and the n-th one answered by ``answer`` when set."""

    def __init__(self, *, answer: str | None = None, nth: int = 1) -> None:
        self.direct_calls = 0
        self.direct_bytes = 0
        self.answer = answer
        self.nth = nth

    def write_direct(self, fd: int, data: memoryview, offset: int) -> int:
        self.direct_calls += 1
        if self.direct_calls == self.nth and self.answer == "einval":
            raise OSError(errno.EINVAL, "injected EINVAL")
        if self.direct_calls == self.nth and self.answer == "eio":
            raise OSError(errno.EIO, "injected EIO")
        if self.direct_calls == self.nth and self.answer == "short":
            data = data[: len(data) // 2 + 100]  # a short, unaligned count
        count = super().write_direct(fd, data, offset)
        self.direct_bytes += count
        return count


def aligned_buffer(nbytes: int) -> memoryview:
    """``nbytes`` of recognizable bytes in page-aligned memory (an anonymous map)."""
    area = mmap.mmap(-1, nbytes)
    pattern = bytes(range(251)) * (nbytes // 251 + 1)  # 251: prime, so offsets show
    area[:] = pattern[:nbytes]
    return memoryview(area)


def written(storage: PosixStorage, pieces: list[memoryview | bytes]) -> bytes:
    def body(sink: object) -> int:
        for piece in pieces:
            sink.write(piece)  # type: ignore[attr-defined]
        return sum(len(p) for p in pieces)

    done = storage.write("f", body)
    storage.commit(done)
    return (storage.root / "f").read_bytes()


def test_long_aligned_runs_go_direct_and_the_file_holds_every_byte(tmp_path: Path) -> None:
    ops = CountingOps()
    data = aligned_buffer(3 * DIRECT_MIN + 5 * ALIGN)
    pieces: list[memoryview | bytes] = [
        b"prelude" * 10,
        bytes(ALIGN - 70),
        data[: 2 * DIRECT_MIN + 123],
        data[-5000:],
    ]
    got = written(PosixStorage(tmp_path, ops=ops, direct=True), pieces)
    assert got == b"".join(bytes(p) for p in pieces)
    assert ops.direct_calls >= 1
    assert ops.direct_bytes >= 2 * DIRECT_MIN - ALIGN  # the aligned middle of the long run


def test_direct_off_writes_nothing_directly(tmp_path: Path) -> None:
    ops = CountingOps()
    data = aligned_buffer(2 * DIRECT_MIN)
    assert written(PosixStorage(tmp_path, ops=ops, direct=False), [data]) == bytes(data)
    assert ops.direct_calls == 0


def test_environment_switch_turns_direct_writes_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCCKPT_DIRECT_IO", "0")
    assert not PosixStorage(tmp_path, ops=CountingOps()).direct
    monkeypatch.setenv("ASYNCCKPT_DIRECT_IO", "1")
    assert PosixStorage(tmp_path, ops=CountingOps()).direct


def test_fault_injecting_ops_see_every_byte_through_write() -> None:
    # RecordingOps overrides write (faults are injected there): direct writes would bypass it.
    assert not direct_capable(RecordingOps())
    assert direct_capable(FileOps())
    assert direct_capable(CountingOps())


@pytest.mark.parametrize("nth", [1, 2])  # the bounce buffer's block before the run; the run
@pytest.mark.parametrize("answer", ["einval", "short"])
def test_a_refused_or_short_direct_write_falls_back_to_the_page_cache(
    tmp_path: Path, answer: str, nth: int
) -> None:
    ops = CountingOps(answer=answer, nth=nth)
    data = aligned_buffer(4 * (8 << 20) + 3 * ALIGN + 17)[100:]  # several direct pieces, and
    got = written(PosixStorage(tmp_path, ops=ops, direct=True), [b"x" * 100, data])  # aligned
    assert got == b"x" * 100 + bytes(data)
    assert ops.direct_calls == nth  # refused or short: no more direct writes


@pytest.mark.parametrize("answer", [None, "einval", "short"])
def test_many_small_pieces_are_gathered_into_whole_blocks(tmp_path: Path, answer: str | None) -> None:
    # Pieces of 4,001 bytes filling three halves of the bounce buffer and some (it fills and
    # drains; the last block is partial); a refusal in the second drain sends the rest, and the
    # partial block, buffered.
    ops = CountingOps(answer=answer, nth=2)
    count = (BOUNCE // 2 * 3 + 12345) // 4001
    pieces: list[memoryview | bytes] = [bytes([i % 256]) * 4001 for i in range(count)]
    got = written(PosixStorage(tmp_path, ops=ops, direct=True), pieces)
    assert got == b"".join(bytes(p) for p in pieces)
    assert ops.direct_calls == 2 if answer else ops.direct_calls >= 1


def test_an_io_error_in_a_direct_write_is_the_write_error_and_publishes_nothing(tmp_path: Path) -> None:
    ops = CountingOps(answer="eio")
    storage = PosixStorage(tmp_path, ops=ops, direct=True)
    with pytest.raises(CheckpointWriteError, match="injected EIO"):
        written(storage, [aligned_buffer(2 * DIRECT_MIN)])
    assert list(tmp_path.iterdir()) == []  # no file, no temp file left


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_an_io_error_in_a_background_drain_fails_the_write_and_leaves_no_thread(
    tmp_path: Path, nth: int
) -> None:
    # Three and a half halves' worth of small pieces: the bounce buffer's halves are written by
    # the sink's thread while the caller fills the other; the error of the nth such write
    # reaches the caller.
    ops = CountingOps(answer="eio", nth=nth)
    storage = PosixStorage(tmp_path, ops=ops, direct=True)
    pieces = (BOUNCE // 2 * 7 // 2) // 4001
    with pytest.raises(CheckpointWriteError, match="injected EIO"):
        written(storage, [bytes([i % 256]) * 4001 for i in range(pieces)])
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("asyncckpt-direct")]


def test_a_filesystem_refusing_o_direct_gets_buffered_writes(tmp_path: Path) -> None:
    class NoDirect(CountingOps):
        def open_direct(self, path: Path) -> int | None:
            return None

    ops = NoDirect()
    data = aligned_buffer(2 * DIRECT_MIN)
    assert written(PosixStorage(tmp_path, ops=ops, direct=True), [data]) == bytes(data)
    assert ops.direct_calls == 0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3 * ALIGN), st.integers(0, 2 * DIRECT_MIN + 3 * ALIGN)),
        min_size=1,
        max_size=6,
    )
)
def test_any_sequence_of_runs_is_written_exactly(
    tmp_path_factory: pytest.TempPathFactory, runs: list[tuple[int, int]]
) -> None:
    """Runs starting at any memory offset and file position, of any length: the file is their
    concatenation (direct middles, buffered heads and tails, each at the right offset)."""
    source = aligned_buffer(3 * ALIGN + 2 * DIRECT_MIN + 3 * ALIGN)
    pieces: list[memoryview | bytes] = [source[start : start + length] for start, length in runs]
    ops = CountingOps()
    got = written(PosixStorage(tmp_path_factory.mktemp("d"), ops=ops, direct=True), pieces)
    assert got == b"".join(bytes(p) for p in pieces)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 3 * ALIGN), st.integers(0, 300_000), st.booleans()), max_size=30),
        min_size=1,
        max_size=8,
    )
)
def test_any_batches_of_buffers_are_written_exactly(
    tmp_path_factory: pytest.TempPathFactory, batches: list[list[tuple[int, int, bool]]]
) -> None:
    """``writev`` batches of small and large buffers, bytes or memory views (some of float
    format, whose ``len`` is not their size in bytes): the file is their concatenation."""
    source = aligned_buffer(3 * ALIGN + 300_000)
    floats = memoryview(bytes(source)).cast("f")
    expected = b""

    def body(sink: object) -> int:
        nonlocal expected
        for batch in batches:
            buffers: list[memoryview | bytes] = []
            for start, length, as_bytes in batch:
                piece = source[start : start + length]
                if as_bytes:
                    buffers.append(bytes(piece) if length % 2 else floats[start // 4 : (start + length) // 4])
                else:
                    buffers.append(piece)
            expected += b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
            sink.writev(buffers)  # type: ignore[attr-defined]
        return len(expected)

    storage = PosixStorage(tmp_path_factory.mktemp("v"), ops=CountingOps(), direct=True)
    storage.commit(storage.write("f", body))
    assert (storage.root / "f").read_bytes() == expected


def test_staging_buffers_start_on_a_page_and_their_views_see_the_right_bytes() -> None:
    data = aligned_zeros(3 * ALIGN + 10, pin_memory=False)
    assert data.data_ptr() % ALIGN == 0 and data.numel() == 3 * ALIGN + 10
    view = destination(data, ALIGN, torch.float32, (4,))
    view.copy_(torch.arange(4, dtype=torch.float32))
    assert data[ALIGN : ALIGN + 16].view(torch.float32).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert data[:ALIGN].count_nonzero() == 0


@pytest.mark.parametrize("answer", ["einval", "short"])
def test_every_write_after_a_fallback_lands_at_its_own_offset(tmp_path: Path, answer: str) -> None:
    """Once a direct write is refused, each later write goes through the page cache after the
    one before it (they once all landed at the offset of the first)."""
    ops = CountingOps(answer=answer, nth=1)
    big = aligned_buffer(2 * DIRECT_MIN + 3 * ALIGN)
    pieces: list[memoryview | bytes] = [bytes([i % 251]) * (1000 + 37 * i) for i in range(300)]
    # First a page-aligned run: its direct write is made (and refused) on the caller's thread.
    pieces[:0] = [big[: DIRECT_MIN + ALIGN], b"x" * 77, big[ALIGN:]]

    def body(sink: object) -> int:
        sink.writev(pieces[:150])  # type: ignore[attr-defined]
        for piece in pieces[150:]:
            sink.write(piece)  # type: ignore[attr-defined]
        return sum(len(p) for p in pieces)

    storage = PosixStorage(tmp_path, ops=ops, direct=True)
    storage.commit(storage.write("f", body))
    assert (tmp_path / "f").read_bytes() == b"".join(bytes(p) for p in pieces)
    assert ops.direct_calls == 1  # the refused one


def test_an_asynchronous_save_writes_its_staging_buffer_directly(tmp_path: Path) -> None:
    ops = CountingOps()
    state = {f"w{i}": torch.randn(300_000 + 13 * i) for i in range(8)}  # ~9.6 MB
    with asyncckpt.AsyncCheckpointer(tmp_path, ops=ops) as ckpt:
        ckpt.save(1, state).result()
    assert ops.direct_bytes > 8 << 20
    loaded = asyncckpt.load_latest(tmp_path).state
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


AT_EXIT = """
import atexit, sys
from asyncckpt.storage.posix import PosixStorage

def save() -> None:  # at exit no new thread may start: the drains are written on this thread
    pieces = [bytes([i % 256]) * 4001 for i in range(3000)]
    storage = PosixStorage(sys.argv[1], direct=True)
    done = storage.write("f", lambda sink: (sink.writev(pieces), sum(map(len, pieces)))[1])
    storage.commit(done)

atexit.register(save)
"""


def test_a_write_from_an_atexit_hook_completes(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "at_exit.py"
    script.write_text(AT_EXIT)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=60)
    assert (tmp_path / "f").read_bytes() == b"".join(bytes([i % 256]) * 4001 for i in range(3000))


def test_a_file_smaller_than_half_the_bounce_buffer_hands_nothing_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncckpt.storage import direct

    handed: list[int] = []
    real = direct.submit_or_run

    def counting(*args: object) -> object:
        handed.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(direct, "submit_or_run", counting)
    ops = CountingOps()
    pieces: list[memoryview | bytes] = [bytes([i]) * 4001 for i in range(100)]  # 400 KB
    assert written(PosixStorage(tmp_path, ops=ops, direct=True), pieces) == b"".join(pieces)
    assert handed == [] and ops.direct_calls == 1  # the whole blocks, written at finish, here


class HeldOps(FileOps):
    """The first direct write waits for ``release``; ``queued`` is set once a second one is handed
    to the sink's thread while the first is still held."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def write_direct(self, fd: int, data: memoryview, offset: int) -> int:
        self.calls += 1
        if self.calls == 1:
            assert self.release.wait(30), "the test never released the first write"
        return super().write_direct(fd, data, offset)


def test_a_filled_half_is_queued_behind_the_write_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncckpt.storage import direct

    ops = HeldOps()
    handed = threading.Semaphore(0)
    real = direct.submit_or_run

    def counting(*args: object) -> object:
        future = real(*args)  # type: ignore[arg-type]
        handed.release()
        return future

    monkeypatch.setattr(direct, "submit_or_run", counting)
    half = direct.BOUNCE // 2
    pieces: list[memoryview | bytes] = [bytes([i % 256]) * 4001 for i in range(2 * half // 4001 + 50)]
    result: list[bytes] = []
    writer = threading.Thread(
        target=lambda: result.append(written(PosixStorage(tmp_path, ops=ops, direct=True), pieces))
    )
    writer.start()
    try:
        # Both halves are handed over while the first half's write is still held: the second
        # waits in the sink's queue instead of in the caller, which waits for the first.
        assert handed.acquire(timeout=30)
        assert handed.acquire(timeout=10), "the second half was not handed over before the first was written"
        assert ops.calls <= 1
    finally:
        ops.release.set()
        writer.join(60)
    assert result == [b"".join(pieces)]


class ExitingOps(FileOps):
    """Every direct write refused (EINVAL). The sink's thread's refusal waits until the caller
    was refused a thread; its fallback write then waits (a moment) for the caller's own."""

    def __init__(self) -> None:
        self.refused = threading.Event()  # the caller's pool refused the second half
        self.in_pool = threading.Event()  # the sink's thread is in its fallback write
        self.caller_wrote = threading.Event()
        self.held = False

    def write_direct(self, fd: int, data: memoryview, offset: int) -> int:
        if threading.current_thread().name.startswith("asyncckpt-direct"):
            assert self.refused.wait(30), "the second half was never handed over"
        raise OSError(errno.EINVAL, "injected EINVAL")

    def write(self, fd: int, data: memoryview | bytes) -> int:
        if not threading.current_thread().name.startswith("asyncckpt-direct"):
            self.in_pool.wait(5)  # (after its seek: the two threads' writes would interleave)
            count = super().write(fd, data)
            self.caller_wrote.set()
            return count
        if not self.held:
            self.held = True
            self.in_pool.set()
            self.caller_wrote.wait(1)  # a correct sink writes nothing meanwhile: times out
        return super().write(fd, data)


def test_a_half_written_here_at_exit_waits_for_the_write_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At interpreter exit the pool takes the first half's write, then refuses the second (run
    on the caller's thread): it must not run beside the first, whose fallback seeks and writes
    the same plain descriptor (the two writes landed at each other's offsets)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from asyncckpt.storage import direct

    ops = ExitingOps()

    class ExitingPool(ThreadPoolExecutor):
        taken = 0

        def submit(self, fn: object, /, *args: object, **kwargs: object) -> Future[object]:
            ExitingPool.taken += 1
            if ExitingPool.taken > 1:
                ops.refused.set()
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            return super().submit(fn, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(direct, "ThreadPoolExecutor", ExitingPool)
    half = direct.BOUNCE // 2
    pieces: list[memoryview | bytes] = [bytes([i % 251]) * 4001 for i in range(2 * half // 4001 + 50)]
    assert written(PosixStorage(tmp_path, ops=ops, direct=True), pieces) == b"".join(pieces)


def test_a_bounce_buffer_is_reused_by_the_next_storage_of_the_process(tmp_path: Path) -> None:
    """A one-shot save opens a storage per call: its bounce buffer is the one the last storage
    returned (a fresh one costs a page fault per page), and at most a few are kept."""
    from asyncckpt.storage import direct

    first, second = direct.BouncePool(), direct.BouncePool()
    with first.lend() as lent:
        where = direct.address(lent)
    with second.lend() as again:
        assert direct.address(again) == where
    held = [direct.BouncePool().lend() for _ in range(direct._SPARE_MAX + 2)]
    for lending in held:
        lending.__enter__()
    for lending in held:
        lending.__exit__(None, None, None)
    assert len(direct._spare) == direct._SPARE_MAX
