"""Readable tables on stdout and the optional PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .state import format_size
from .stats import median


def _s(entry: dict[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    if not entry or entry.get("median") is None:
        return "-"
    m, lo, hi = (entry[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def _x(entry: dict[str, Any] | None) -> str:
    value = median(entry)
    return "-" if value is None else f"{value:.2f}x"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def save_table(config: dict[str, Any]) -> str:
    headers = [
        "method",
        "stall s median [min-max]",
        "x copy",
        "x torch.save",
        "stall+step wait s (x copy)",
        "durable s median [min-max]",
        "x write+fsync",
        "peak RSS +MiB",
        "held MiB",
    ]
    rows = []
    for name, m in config["save"].items():
        rows.append(
            [
                name,
                _s(m["stall_s"]),
                _x(m.get("stall_vs_copy_floor")),
                _x(m.get("stall_vs_torch_save")),
                f"{_s(m['blocked_s'])} ({_x(m.get('blocked_vs_copy_floor'))})" if "blocked_s" in m else "-",
                _s(m["durable_s"]),
                _x(m.get("durable_vs_write_floor")),
                f"{m['peak_extra_rss_bytes'] / (1 << 20):.0f}",
                f"{m.get('held_bytes', 0) / (1 << 20):.0f}",
            ]
        )
    title = (
        f"== save: {format_size(config['bytes'])} in {config['tensors']} tensors, "
        f"{config['repeat']} interleaved rounds =="
    )
    note = (
        "(stall+step wait: stall plus the wait of an optimizer step that comes at once, with no "
        "forward/backward to overlap the background copy)"
    )
    return title + "\n" + _table(headers, rows) + "\n" + note


def per_tensor_table(configs: list[dict[str, Any]]) -> str:
    """Microseconds per tensor of each configuration (medians; see ``per_tensor`` in the JSON)."""
    headers = [
        "state",
        "save() stall",
        "copy floor",
        "writer",
        "sync save",
        "torch.save+fsync",
        "warm load",
        "read floor",
        "read+CRC floor",
    ]
    keys = [
        "save",
        "copy_floor",
        "writer",
        "sync_save",
        "torch_save_fsync",
        "load_warm",
        "read_floor_warm",
        "read_crc_floor_warm",
    ]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = [
        [
            f"{format_size(c['bytes'])} / {c['tensors']}",
            *(cell(c.get("per_tensor_us", {}).get(k)) for k in keys),
        ]
        for c in configs
    ]
    return "== microseconds per tensor (median) ==\n" + _table(headers, rows)


def load_table(load: dict[str, Any]) -> str:
    headers = [
        "method",
        "cold s median [min-max]",
        "x read",
        "x read+CRC",
        "warm s median [min-max]",
        "x read",
        "x read+CRC",
        "vs torch.load",
        "peak RSS +MiB",
    ]
    rows = []
    for name in load["cold"]:
        cold, warm = load["cold"][name], load["warm"][name]
        rows.append(
            [
                name,
                _s(cold["seconds"]),
                _x(cold.get("vs_read_floor")),
                _x(cold.get("vs_read_crc_floor")),
                _s(warm["seconds"]),
                _x(warm.get("vs_read_floor")),
                _x(warm.get("vs_read_crc_floor")),
                _x(cold.get("torch_load_over_this")) + " / " + _x(warm.get("torch_load_over_this")),
                f"{load['peak_extra_rss_bytes'].get(name, 0) / (1 << 20):.0f}",
            ]
        )
    title = (
        f"== load: {format_size(load['bytes'])} in {load['tensors']} tensors, cold (page cache "
        f"dropped via {load['page_cache_control']}) and warm =="
    )
    note = (
        "(x read: / the plain read floor; x read+CRC: / the read + CRC32C floor, the least a loader "
        "that checks every byte takes; vs torch.load: torch.load time / this method's, cold / warm; "
        "> 1 means faster)"
    )
    return title + "\n" + _table(headers, rows) + "\n" + note


def interference_table(result: dict[str, Any]) -> str:
    headers = [
        "method",
        "steps/s median [min-max]",
        "slowdown % median [min-max]",
        "in-run slowdown %",
        "stall per save ms",
        "writer ms (first write to commit)",
    ]
    rows = [["none", _s(result["baseline"]["steps_per_s"], digits=2), "-", "-", "-", "-"]]
    for name, m in result["methods"].items():
        rows.append(
            [
                name,
                _s(m["steps_per_s"], digits=2),
                _s(m["slowdown_pct"], digits=1),
                _s(m.get("in_run_slowdown_pct"), digits=1),
                _s(m["stall_s"], 1e3, 1),
                _s(m.get("writer_s"), 1e3, 0),
            ]
        )
    title = (
        f"== training interference: CPU MLP {result['model']}, {result['step_ms']:.0f} ms/step, "
        f"state {format_size(result['state_bytes'])}, a checkpoint every {result['every']} steps =="
    )
    note = (
        "(slowdown: against the no-checkpoint run of the same round; in-run: against the same run's "
        "own iterations with no save started or in flight, which the drift between runs does not reach)"
    )
    return title + "\n" + _table(headers, rows) + "\n" + note


def targets_table(targets: list[dict[str, Any]]) -> str:
    headers = ["issue", "target", "measured", "met"]
    rows = [
        [str(t["issue"]), t["target"], t["measured_text"], {True: "yes", False: "NO", None: "n/a"}[t["met"]]]
        for t in targets
    ]
    return "== targets ==\n" + _table(headers, rows)


def plot(result: dict[str, Any], path: Path) -> None:
    """Stall and time-to-durable per method against size and against tensor count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_tensors = result["config"]["base_tensors"]
    base_bytes = result["config"]["base_bytes"]
    by_size = sorted((c for c in result["configs"] if c["tensors"] == base_tensors), key=lambda c: c["bytes"])
    by_count = sorted(
        (c for c in result["configs"] if c["bytes_requested"] == base_bytes), key=lambda c: c["tensors"]
    )
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    panels = [
        (axes[0][0], by_size, "bytes", "stall_s", f"stall vs size ({base_tensors} tensors)"),
        (axes[0][1], by_size, "bytes", "durable_s", f"time to durable vs size ({base_tensors} tensors)"),
        (axes[1][0], by_count, "tensors", "stall_s", f"stall vs tensor count ({format_size(base_bytes)})"),
        (
            axes[1][1],
            by_count,
            "tensors",
            "durable_s",
            f"time to durable vs tensor count ({format_size(base_bytes)})",
        ),
    ]
    for ax, configs, xkey, ykey, title in panels:
        if not configs:
            ax.set_visible(False)
            continue
        for name in configs[0]["save"]:
            xs, ys = [], []
            for c in configs:
                m = c["save"].get(name)
                if m and m[ykey]["median"] is not None:
                    xs.append(c[xkey] / (1 << 20) if xkey == "bytes" else c[xkey])
                    ys.append(m[ykey]["median"])
            style = "--" if name.endswith("floor") else "-"
            ax.plot(xs, ys, style, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("MiB" if xkey == "bytes" else "tensors")
        ax.set_ylabel("seconds (median)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"asyncckpt write overhead — {result['machine'].get('cpu_model', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gpu_text(gpu: dict[str, Any]) -> str:
    lines = [f"== gpu: {gpu.get('device')} =="]
    band = gpu.get("bandwidth", {})
    if "error" in band or not band:
        lines.append(f"bandwidth: {band.get('error', 'not run')}")
    else:
        staging = _s(band["asyncckpt_staging_gb_s"], digits=1)
        enqueue = _s(band["asyncckpt_enqueue_ms"], digits=1)
        per_tensor = _s(band["per_tensor_pinned_copy_gb_s"], digits=1)
        single = _s(band["single_pinned_copy_gb_s"], digits=1)
        lines.append(
            f"D2H of {format_size(band['bytes'])} in {band['tensors']} tensors: asyncckpt staging {staging} "
            f"GB/s (enqueue {enqueue} ms), per-tensor pinned copy_ {per_tensor} GB/s, one pinned copy_ "
            f"(PCIe floor) {single} GB/s; ours/floor {_x(band['ratio_to_floor'])}"
        )
    over = gpu.get("overlap", {})
    if "error" in over or not over:
        lines.append(f"overlap: {over.get('error', 'not run')}")
    else:
        extra, call = over["extra_ms_per_checkpoint"], over["save_call_ms"]
        lines.append(
            f"overlap on {over['model']} (state {format_size(over['state_bytes'])}, copy "
            f"{over['copy_ms_single_pinned']:.1f} ms, forward+backward {over['forward_backward_ms']:.1f} ms, "
            f"step {over['step_ms']:.1f} ms): extra wall time per checkpoint, lazy pre-hook "
            f"{_s(extra['lazy'], digits=1)} ms vs eager synchronized copy {_s(extra['eager'], digits=1)} ms; "
            f"save() call {_s(call['lazy'], digits=1)} ms vs {_s(call['eager'], digits=1)} ms"
        )
    rest = gpu.get("restore", {})
    if "error" in rest or not rest:
        lines.append(f"restore: {rest.get('error', 'not run')}")
    else:
        lines.append(
            f"warm restore of {format_size(rest['bytes'])} ({rest['tensors']} tensors) into a CUDA model + "
            f"optimizer: asyncckpt.restore {_s(rest['asyncckpt_restore_s'])} s vs torch.load(cuda) + "
            f"load_state_dict {_s(rest['torch_load_restore_s'])} s: {_x(rest['speedup'])} faster"
        )
    return "\n".join(lines)


def markdown(result: dict[str, Any], tables: str, *, title: str, note: str | None = None) -> str:
    """The result's .md: the exact command, the machine, the tables."""
    m = result["machine"]
    facts = [f"- {note}"] if note else []
    facts += [
        f"- command: `{result['command']}`",
        f"- started: {result.get('started')} UTC, took {result.get('elapsed_s')} s",
        f"- machine: {m.get('cpus')} CPUs ({m.get('cpu_model')}), {m.get('mem_total_gib')} GiB RAM, "
        f"{m.get('platform')}; GPU: {m.get('cuda') or 'none'}",
        f"- directory: {m.get('directory')} ({m.get('filesystem')}); page cache dropped via "
        f"{m.get('page_cache_control')}",
        f"- python {m.get('python')}, torch {m.get('torch')} ({m.get('torch_threads')} intra-op threads), "
        f"asyncckpt {m.get('asyncckpt')} at commit {m.get('git_commit') or 'unknown'}",
        f"- load average at start / end: {m.get('loadavg_start')} / {m.get('loadavg_end')}",
    ]
    return (
        f"# {title}\n\n"
        + "\n".join(facts)
        + "\n\nMedians with [min-max] over interleaved rounds; every ratio is taken within one round "
        "(see benchmarks/README.md for what each figure means).\n\n```\n" + tables + "\n```\n"
    )
