"""The goals a result is judged by: each a row of ``== targets ==`` (issue, goal, measured, met).

Issue #16's rows judge its table (save goals at 1 GiB with 1,000 and 10,000 tensors; loads
against the plain read floor, with the read + CRC32C floor's ratio as information) and its
per-tensor goals; the others are the goals of earlier issues, kept as they were.
"""

from __future__ import annotations

from typing import Any

from .state import format_size
from .stats import median, ratios


def _target(
    issue: str, text: str, value: float | None, limit: float, *, at_least: bool, unit: str = "x"
) -> dict[str, Any]:
    met = None if value is None else (value >= limit if at_least else value <= limit)
    shown = "-" if value is None else f"{value:.3f}{unit}"
    return {"issue": issue, "target": text, "measured": value, "measured_text": shown, "met": met}


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    base = next(iter(result["configs"]), None)
    save = base["save"] if base else {}
    ours = save.get("asyncckpt", {})
    if ours:
        targets.append(
            _target(
                "3,6",
                "stall <= 1.2x plain copy",
                median(ours.get("stall_vs_copy_floor")),
                1.2,
                at_least=False,
            )
        )
        targets.append(
            _target(
                "3,6",
                "stall >= 10x below torch.save",
                median(ours.get("torch_save_stall_over_this")),
                10.0,
                at_least=True,
            )
        )
        targets.append(
            _target(
                "3,6",
                "stall >= 4x below DCP async_save",
                median(ours.get("dcp_async_stall_over_this")),
                4.0,
                at_least=True,
            )
        )
        targets.append(
            _target(
                "3,6",
                "time to durable <= 1.2x write+fsync",
                median(ours.get("durable_vs_write_floor")),
                1.2,
                at_least=False,
            )
        )
    eager = save.get("asyncckpt_eager", {})
    if ours.get("blocked_vs_copy_floor"):
        targets.append(
            _target(
                "3",
                "(info) stall + immediate step wait <= 1.2x copy",
                median(ours.get("blocked_vs_copy_floor")),
                1.2,
                at_least=False,
            )
        )
    if eager:
        targets.append(
            _target(
                "3",
                "(info) overlap=False stall <= 1.2x copy",
                median(eager.get("stall_vs_copy_floor")),
                1.2,
                at_least=False,
            )
        )
    if "asyncckpt_sync" in save:
        targets.append(
            _target(
                "2",
                "sync save <= 1.2x write+fsync",
                median(save["asyncckpt_sync"].get("durable_vs_write_floor")),
                1.2,
                at_least=False,
            )
        )
    targets += save_table_targets(result)
    targets += per_tensor_targets(result)
    targets += load_targets(result.get("load"))
    inter = result.get("interference")
    if inter and "asyncckpt" in inter["methods"]:
        value = median(inter["methods"]["asyncckpt"]["slowdown_pct"])
        targets.append(
            _target(
                "6,16",
                f"interference <= 2% at 1 checkpoint / {inter['every']} steps",
                value,
                2.0,
                at_least=False,
                unit="%",
            )
        )
        targets.append(
            _target(
                "6,16",
                "(info) interference <= 2%, in-run baseline",
                median(inter["methods"]["asyncckpt"].get("in_run_slowdown_pct")),
                2.0,
                at_least=False,
                unit="%",
            )
        )
    memory = result.get("memory")
    if memory:
        growth = memory["rss_growth_bytes"] / (1 << 20)
        targets.append(
            {
                "issue": "6",
                "target": f"RSS flat over {memory['saves']} saves",
                "measured": growth,
                "measured_text": f"{growth:+.1f} MiB",
                "met": memory["flat"],
            }
        )
    return targets


# Issue #16's table, stated at 1 GiB: (figure, method, goal, limit below 10,000 tensors, at 10,000+).
TABLE_BYTES = 1 << 30
SAVE_GOALS = (
    ("stall_vs_copy_floor", "asyncckpt", "save() stall <= {}x copy", 0.2, 0.2),
    ("blocked_vs_copy_floor", "asyncckpt", "stall + immediate step wait <= {}x copy", 1.2, 1.5),
    ("durable_vs_write_floor", "asyncckpt", "time to durable <= {}x write+fsync", 1.1, 1.2),
    ("durable_vs_write_floor", "asyncckpt_sync", "sync save <= {}x write+fsync", 1.1, 1.2),
)


def save_table_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #16's save goals, judged at each tensor count of the 1 GiB configurations."""
    targets = []
    for config in result["configs"]:
        if config["bytes_requested"] != TABLE_BYTES:
            continue
        where = f"{format_size(config['bytes'])}/{config['tensors']}"
        for key, method, goal, few, many in SAVE_GOALS:
            entry = config["save"].get(method, {})
            if key in entry:
                limit = many if config["tensors"] >= 10_000 else few
                text = f"{where}: {goal.format(limit)}"
                targets.append(_target("16", text, median(entry[key]), limit, at_least=False))
    return targets


# Issue #16's load goals, against the plain read floor: (method, temperature, limit).
LOAD_GOALS = (
    ("asyncckpt_load", "warm", 1.2),
    ("asyncckpt_restore", "warm", 1.1),
    ("asyncckpt_load", "cold", 1.1),
    ("asyncckpt_restore", "cold", 1.1),
)


def load_targets(load: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Issue #16's load goals against the plain read floor, and (info) the same figures against
    the read + CRC32C floor: what a loader that checks every byte cannot go below."""
    targets: list[dict[str, Any]] = []
    for method, temp, limit in LOAD_GOALS if load is not None else ():
        entry = load[temp].get(method)
        if not entry:
            continue
        what = f"{temp} {method.removeprefix('asyncckpt_')}"
        value = median(entry.get("vs_read_floor"))
        targets.append(_target("16", f"{what} <= {limit}x plain read", value, limit, at_least=False))
        if "vs_read_crc_floor" in entry:
            value = median(entry["vs_read_crc_floor"])
            text = f"(info) {what} <= {limit}x read + CRC32C"
            targets.append(_target("16", text, value, limit, at_least=False))
    return targets


def per_tensor_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #16's per-tensor goals, judged on the configurations of 10,000 tensors or more."""
    targets = []
    for config in result["configs"]:
        if config["tensors"] < 10_000:
            continue
        where = f"{format_size(config['bytes'])}/{config['tensors']}"
        us = config.get("per_tensor_us", {}).get("save")
        if us is not None:
            targets.append(
                _target("16", f"{where}: save() <= 5 us/tensor", us, 5.0, at_least=False, unit=" us")
            )
        save = config["save"]
        if "asyncckpt_sync" in save and "torch_save" in save:
            ratio = median(ratios(_durations(save["asyncckpt_sync"]), _durations(save["torch_save"])))
            targets.append(
                _target("16", f"{where}: sync save < torch.save + fsync", ratio, 1.0, at_least=False)
            )
        if "asyncckpt" in save:
            value = median(save["asyncckpt"].get("durable_vs_write_floor"))
            targets.append(
                _target("16", f"{where}: time to durable <= 1.5x write+fsync", value, 1.5, at_least=False)
            )
    return targets


def _durations(entry: dict[str, Any]) -> list[float]:
    return list(entry["durable_s"].get("runs", []))
