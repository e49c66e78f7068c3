"""benchmarks/write_overhead.py runs a tiny configuration end to end and writes the JSON it promises.

This checks that the script works, not how fast anything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "write_overhead.py"

TINY = [
    "--base", "2M:40",
    "--sizes", "1M",
    "--tensors", "20",
    "--extra", "1M:60",
    "--repeat", "1",
    "--scaling-repeat", "1",
    "--warmup", "0",
    "--parts", "save,load,interference,memory",
    "--steps", "4",
    "--every", "2",
    "--interference-repeat", "1",
    "--mlp-batch", "2",
    "--mlp-width", "32",
    "--mlp-depth", "2",
    "--memory-saves", "3",
    "--memory-size", "1M",
]  # fmt: skip


def _run(
    tmp_path: Path, *args: str, script: Path = SCRIPT, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=env,
        check=False,
    )


def test_help_lists_the_options(tmp_path: Path) -> None:
    done = _run(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--sizes", "--tensors", "--repeat", "--dir", "--out", "--plot"):
        assert option in done.stdout


def test_tiny_configuration_writes_the_expected_json(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = _run(tmp_path, *TINY, "--dir", str(tmp_path / "work"), "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "== targets ==" in done.stdout
    result = json.loads(out.read_text())

    for key in ("command", "machine", "config", "configs", "load", "interference", "memory", "targets"):
        assert key in result, key
    assert [(c["bytes_requested"], c["tensors"]) for c in result["configs"]] == [
        (2 << 20, 40),
        (1 << 20, 40),
        (2 << 20, 20),
        (1 << 20, 60),
    ]
    save = result["configs"][0]["save"]
    for method in (
        "copy_floor",
        "write_floor",
        "asyncckpt",
        "asyncckpt_sync",
        "torch_save",
        "torch_save_thread",
        "asyncckpt_budget4",
        "asyncckpt_budget16",
    ):
        assert method in save, method
        assert save[method]["stall_s"]["median"] is not None
    ours = save["asyncckpt"]
    for key in ("stall_vs_copy_floor", "durable_vs_write_floor", "stall_vs_torch_save", "staging_bytes"):
        assert key in ours, key
    assert ours["staging_bytes"] >= result["configs"][0]["bytes"]
    assert save["asyncckpt_budget4"]["staging_bytes"] <= result["configs"][0]["bytes"] // 4
    per_tensor = result["configs"][0]["per_tensor_us"]
    assert per_tensor["save"] is not None and per_tensor["load_warm"] is not None

    load = result["load"]
    for temperature in ("cold", "warm"):
        for method in (
            "read_floor",
            "read_crc_parallel",
            "read_crc_sliced",
            "read_crc_pipelined",
            "read_crc_floor",
            "asyncckpt_load",
            "asyncckpt_restore",
            "torch_load",
            "torch_restore",
        ):
            assert load[temperature][method]["seconds"]["median"] is not None, (temperature, method)
        assert "torch_load_over_this" in load[temperature]["asyncckpt_restore"]
        for method in ("asyncckpt_load", "asyncckpt_restore"):
            for floor in ("vs_read_floor", "vs_read_crc_floor"):
                assert load[temperature][method][floor]["median"] is not None, (temperature, method, floor)
        parallel, sliced, pipelined, floor = (
            load[temperature][name]["seconds"]["runs"]
            for name in ("read_crc_parallel", "read_crc_sliced", "read_crc_pipelined", "read_crc_floor")
        )
        assert floor == [min(a, b, c) for a, b, c in zip(parallel, sliced, pipelined, strict=True)]
    assert per_tensor["read_crc_floor_warm"] is not None

    assert "asyncckpt" in result["interference"]["methods"]
    assert "slowdown_pct" in result["interference"]["methods"]["asyncckpt"]
    assert "in_run_slowdown_pct" in result["interference"]["methods"]["asyncckpt"]
    assert result["memory"]["saves"] == 3
    assert result["memory"]["staging_allocations"] == 1
    assert {t["target"] for t in result["targets"]} >= {
        "stall <= 1.2x plain copy",
        "time to durable <= 1.2x write+fsync",
        "warm load <= 1.2x plain read",
        "cold restore <= 1.1x plain read",
        "(info) warm load <= 1.2x read + CRC32C",
    }
    assert "x read+CRC" in done.stdout
    assert not list((tmp_path / "work").iterdir()), "the benchmark leaves no files behind"


def test_loads_everywhere_gives_the_loader_per_tensor_at_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "loads.json"
    argv = ["--parts", "load", "--base", "1M:20", "--sizes", "", "--tensors", "", "--extra", "1M:60"]
    argv += ["--methods", "write_floor,asyncckpt", "--repeat", "1", "--scaling-repeat", "1", "--warmup", "0"]
    done = _run(tmp_path, *argv, "--loads-everywhere", "--dir", str(tmp_path / "work"), "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [c["tensors"] for c in result["configs"]] == [20, 60]
    for config in result["configs"]:
        per_tensor = config["per_tensor_us"]
        assert per_tensor["load_warm"] is not None and per_tensor["read_crc_floor_warm"] is not None
    assert done.stdout.count(" tensors, cold (page cache dropped") == 2  # a load table for each


def test_read_crc_floor_reads_every_byte_once_in_parts() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from ckptbench.loading import plan_parts
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    sizes = [3, 1, 10, 2, 4, 4]
    views = [memoryview(bytearray(n)) for n in sizes]
    parts = plan_parts(views, 4)
    # small views share a part up to 4 bytes; the 10-byte view is cut into 4 + 4 + 2
    assert [(offset, [len(v) for v in vs]) for offset, vs in parts] == [
        (0, [3, 1]),
        (4, [4]),
        (8, [4]),
        (12, [2]),
        (14, [2]),
        (16, [4]),
        (20, [4]),
    ]
    # at most 1,024 buffers per part (one preadv): Linux refuses more with EINVAL
    many = plan_parts([memoryview(bytearray(1)) for _ in range(2500)], 1 << 20)
    assert [(offset, len(vs)) for offset, vs in many] == [(0, 1024), (1024, 1024), (2048, 452)]


def test_issue_16_save_goals_are_judged_at_each_tensor_count_of_1_gib() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from ckptbench.targets import save_table_targets
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def config(nbytes: int, tensors: int, durable: float) -> dict[str, object]:
        figure = {"median": durable}
        ours = {"stall_vs_copy_floor": {"median": 0.1}, "durable_vs_write_floor": figure}
        return {"bytes_requested": nbytes, "bytes": nbytes, "tensors": tensors, "save": {"asyncckpt": ours}}

    result = {
        "configs": [config(1 << 30, 1000, 1.15), config(1 << 30, 10_000, 1.15), config(32 << 20, 10_000, 9.0)]
    }
    judged = {t["target"]: t["met"] for t in save_table_targets(result)}
    assert judged == {
        "1G/1000: save() stall <= 0.2x copy": True,
        "1G/1000: time to durable <= 1.1x write+fsync": False,
        "1G/10000: save() stall <= 0.2x copy": True,
        "1G/10000: time to durable <= 1.2x write+fsync": True,
    }


def test_unknown_method_is_refused(tmp_path: Path) -> None:
    done = _run(tmp_path, "--methods", "asyncckpt,nope")
    assert done.returncode == 2
    assert "unknown methods" in done.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS and page-cache control are Linux-only")
def test_rss_helpers_read_proc() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from ckptbench import system
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert system.rss_bytes() > 0
    assert system.peak_rss_bytes() >= system.rss_bytes() // 2


def test_integrations_benchmark_has_help(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "integrations.py"
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    for option in ("--frameworks", "--steps", "--every", "--repeat", "--out", "--dir"):
        assert option in done.stdout


def test_integrations_benchmark_refuses_an_unknown_configuration(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "integrations.py"
    argv = [sys.executable, str(script), "--frameworks", "transformers", "--configs", "none,lightning-async"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert "unknown configurations ['lightning-async']" in done.stderr


def test_integrations_benchmark_names_the_writer_priority() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import integrations
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert integrations.split_nice("asyncckpt-overlap-nice10") == (
        "asyncckpt-overlap",
        {"background_nice": 10},
    )
    assert integrations.split_nice("asyncckpt") == ("asyncckpt", {})
    assert integrations.split_nice("none") == ("none", {})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_priority_share_benchmark_runs(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "priority_share.py"
    out = tmp_path / "share.json"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--nice",
            "0,5",
            "--saves",
            "1",
            "--batch",
            "4",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"0", "5"}
    assert all(0.0 <= run["train_share"] <= 1.0 for runs in result["runs"].values() for run in runs)
    assert "background_nice" in out.with_suffix(".md").read_text()


def test_load_ab_benchmark_has_help(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "load_ab.py"
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    for option in ("--tree", "--size", "--tensors", "--what", "--rounds", "--state", "--out"):
        assert option in done.stdout


def test_page_touch_benchmark_runs(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "page_touch.py"
    done = subprocess.run(
        [sys.executable, str(script), "--size", "4M", "--saves", "3", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line[:1].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["0", "1", "2"]
    for row in rows:
        write, touch = (cell.split(", ") for cell in row.split(" | ")[1:])
        assert float(write[0]) >= 0.0 and float(touch[1]) >= 0.0
    assert list(tmp_path.iterdir()) == []  # its files are gone


def test_changing_numbers_benchmark_runs_a_checkout(tmp_path: Path) -> None:
    out = tmp_path / "changing.md"
    done = _run(
        tmp_path,
        *("--tree", f"here={ROOT}", "--size", "1M", "--tensors", "40", "--saves", "2", "--rounds", "1"),
        *("--dir", str(tmp_path), "--out", str(out)),
        script=ROOT / "benchmarks" / "changing_numbers.py",
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    row = next(line for line in out.read_text().splitlines() if line.startswith("| here |"))
    figures = [float(cell) for cell in row.strip("| ").split(" | ")[1:]]
    assert len(figures) == 4 and all(figure > 0 for figure in figures)


def test_load_ab_loads_a_state_of_large_tensors_in_a_checkout(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "load_ab.py"
    out = tmp_path / "ab.md"
    state = ("--tree", f"here={ROOT}", "--state", "large", "--size", "2M", "--tensors", "2")
    runs = ("--rounds", "1", "--calls", "1", "--dir", str(tmp_path))
    done = _run(tmp_path, *state, "--what", "load", *runs, "--out", str(out), script=script, timeout=180)
    assert done.returncode == 0, done.stderr
    row = next(line for line in out.read_text().splitlines() if line.startswith("| load | here |"))
    assert float(row.split(" | ")[2]) > 0  # wall ms
    refused = _run(tmp_path, *state, "--what", "restore", *runs, script=script, timeout=120)
    assert refused.returncode == 2 and "no model to restore into" in refused.stderr


def test_unlink_cost_benchmark_runs(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "unlink_cost.py"
    done = _run(
        tmp_path, "--sizes", "1M,2M", "--rounds", "2", "--dir", str(tmp_path), script=script, timeout=120
    )
    assert done.returncode == 0, done.stderr
    rows = [
        line.split(" | ")
        for line in done.stdout.splitlines()
        if line.startswith("| 1M") or line.startswith("| 2M")
    ]
    assert [row[0] for row in rows] == ["| 1M", "| 2M"]
    assert all(float(row[1]) >= 0 and float(row[2].rstrip(" |")) >= 0 for row in rows)
    assert list(tmp_path.iterdir()) == []  # its files and folder are gone


def test_overwrite_cost_benchmark_runs_a_checkout(tmp_path: Path) -> None:
    out = tmp_path / "overwrite.md"
    done = _run(
        tmp_path,
        *("--tree", f"here={ROOT}", "--sizes", "1M", "--tensors", "4", "--rounds", "2"),
        *("--dir", str(tmp_path), "--out", str(out)),
        script=ROOT / "benchmarks" / "overwrite_cost.py",
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    row = next(line for line in out.read_text().splitlines() if line.startswith("| 1M | here |"))
    fresh, overwrite, ratio, dropped = row.strip("| ").split(" | ")[2:]
    assert float(fresh) > 0 and float(overwrite) > 0 and float(ratio.rstrip("x")) > 0
    assert float(dropped) >= 0
    # its files are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overwrite.json", "overwrite.md"]
