"""benchmarks/hf_step_cost.py's accounting and benchmarks/plain_writer.py's floors (no Trainer run)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import ROOT

BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture
def benchmarks() -> Iterator[tuple[ModuleType, ModuleType]]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import hf_step_cost
        import plain_writer

        yield hf_step_cost, plain_writer
    finally:
        sys.path.remove(str(BENCHMARKS))


def synthetic_run(saves: list[tuple[int, str]]) -> dict[str, list]:  # type: ignore[type-arg]
    """12 steps of 100 ms (0.2 s of training-thread CPU each) and 1 ms gaps; the checkpoint at
    step 6 takes 30 ms between steps 6 and 7, step 7 then takes 160 ms and step 8 120 ms, with
    40 ms more training CPU and 50 ms of CPU on other threads; the training threads wait 10 ms
    on a run queue each step, 35 ms in step 8."""
    begins, ends, cpu, train, queued = [], [], [], [], []
    now = process = trained = waited = 0.0
    for step in range(1, 13):
        begins.append(now)
        duration = {7: 0.160, 8: 0.120}.get(step, 0.100)
        extra = 0.040 if step == 7 else 0.0
        other = 0.050 if step == 7 else 0.0
        cpu.append((process, process + 0.2 + extra + other))
        train.append((trained, trained + 0.2 + extra))
        wait = 0.010 + (0.025 if step == 8 else 0.0)
        queued.append((waited, waited + wait))
        waited += wait
        process += 0.2 + extra + other
        trained += 0.2 + extra
        now += duration
        ends.append(now)
        now += 0.030 if step == 6 else 0.001
    return {"begins": begins, "ends": ends, "cpu": cpu, "train": train, "queued": queued, "saves": saves}


def test_a_checkpoint_is_charged_its_gap_and_the_slower_steps_after_it(
    benchmarks: tuple[ModuleType, ModuleType],
) -> None:
    hf_step_cost, _ = benchmarks
    charged = hf_step_cost.charges(synthetic_run([(6, "asyncckpt")]), window=3, baseline=4)
    (row,) = charged["asyncckpt"]
    assert row["gap"] == pytest.approx(0.030)
    assert row["first"] == pytest.approx(0.060)
    assert row["rest"] == pytest.approx(0.020)
    assert row["total"] == pytest.approx(0.110)
    assert row["train_cpu"] == pytest.approx(0.040)
    assert row["other_cpu"] == pytest.approx(0.050)
    assert row["queued"] == pytest.approx(0.025)
    assert row["base"] == pytest.approx(0.100)


def test_the_control_is_charged_nothing(benchmarks: tuple[ModuleType, ModuleType]) -> None:
    hf_step_cost, _ = benchmarks
    (row,) = hf_step_cost.charges(synthetic_run([(2, "nothing")]), window=3, baseline=1)["nothing"]
    assert row["gap"] == pytest.approx(0.001)
    assert row["first"] == pytest.approx(0.0)
    assert row["train_cpu"] == pytest.approx(0.0)
    assert row["other_cpu"] == pytest.approx(0.0)
    assert row["queued"] == pytest.approx(0.0)


def test_the_copy_floor_copies_into_one_reused_buffer(benchmarks: tuple[ModuleType, ModuleType]) -> None:
    _, plain_writer = benchmarks
    tensors = [torch.randn(3, 4), torch.arange(5, dtype=torch.int64), torch.ones(2, dtype=torch.bfloat16)]
    copy = plain_writer.Copy()
    first = copy(tensors)
    buffer = copy.buffer
    tensors[0].add_(1.0)
    second = copy(tensors)
    assert copy.buffer is buffer
    for original, copied in zip(tensors, second, strict=True):
        assert torch.equal(original, copied)
        assert copied.data_ptr() != original.data_ptr()
    assert first[0].data_ptr() == second[0].data_ptr()


def test_the_checksumming_floor_writes_the_same_bytes(
    benchmarks: tuple[ModuleType, ModuleType], tmp_path: Path
) -> None:
    _, plain_writer = benchmarks
    tensors = [torch.randn(64), torch.arange(10, dtype=torch.int32)]
    expected = b"".join(bytes(t.view(torch.uint8).numpy()) for t in tensors)
    for name, checksum in (("plain", False), ("crc", True)):
        writer = plain_writer.PlainWriter(tmp_path / name, checksum=checksum)
        writer.save(3, tensors)
        writer.join()
        assert (tmp_path / name / "plain-0000000003.bin").read_bytes() == expected
        assert len(writer.cpu_s) == 1


def test_step_cost_benchmark_has_help(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "hf_step_cost.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for option in ("--methods", "--rounds", "--every", "--window", "--baseline", "--out"):
        assert option in done.stdout
    assert "copy-plain-crc" in done.stdout
