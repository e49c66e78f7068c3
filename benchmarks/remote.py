#!/usr/bin/env python3
"""Remote storage: time to durable and restore time on an S3 server, against the floor and DCP.

For each size (a flat state of --tensors float32 tensors), round by round (A B C A B C ...),
against one S3 endpoint (by default a moto server this script starts on 127.0.0.1; --endpoint
for any S3-compatible server, credentials from the environment):

  save     asyncckpt  AsyncCheckpointer("s3://...").save(step, state) until its handle says
                      committed (staged, uploaded in parallel parts, read back, commit object
                      written): the time to durable;
           floor      s3fs put_file of one local file holding the same checkpoint bytes;
           dcp        torch.distributed.checkpoint.save with FsspecWriter (its defaults).
  restore  asyncckpt  asyncckpt.restore("s3://...", {"model": module}) into the existing
                      tensors (parallel ranged GETs, every checksum verified);
           floor      s3fs get_file of the same bytes to a local file;
           dcp        torch.distributed.checkpoint.load with FsspecReader into the same tensors.

Medians with [min-max] over --rounds; ratios are taken within a round. Objects are removed after
each round. asyncckpt's checkpointer stays open across rounds (its staging buffers come from an
untimed warm-up save, as in a training run); its upload alone (the writer's write + fsync) is
reported too. Every method gets the same fsspec options. Output: a table on stdout and, with
--out NAME, NAME.json and NAME.md holding the figures, the machine and the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ckptbench import system  # noqa: E402
from ckptbench.state import format_size, parse_size  # noqa: E402
from ckptbench.stats import ratios, summary  # noqa: E402

METHODS = ("asyncckpt", "floor", "dcp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="remote.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    parser.add_argument(
        "--sizes", default="256M,1G", help="checkpoint sizes, comma-separated (default 256M,1G)"
    )
    parser.add_argument("--tensors", type=int, default=1000, help="tensors per checkpoint (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size (default 3)")
    parser.add_argument("--endpoint", help="an S3 endpoint URL (default: start a moto server on 127.0.0.1)")
    parser.add_argument("--bucket", help="bucket to use (default: a new one); must exist with --endpoint")
    parser.add_argument("--parts", default="save,restore", help="save, restore or both (default both)")
    parser.add_argument("--no-dcp", action="store_true", help="skip DCP's FsspecWriter/FsspecReader")
    parser.add_argument(
        "--sign-payloads", action="store_true", help="let botocore SHA-256 every request body (plain http)"
    )
    parser.add_argument("--dir", type=Path, help="local scratch directory (default: a temp directory)")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--render", type=Path, help="only write OUT.md again from this JSON result file")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the server


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a moto S3 server in a child process, with fake credentials."""
    env = {**os.environ, **fake_credentials()}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    port: list[int] = []
    ready = threading.Event()

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            match = re.search(r"Running on http://127\.0\.0\.1:(\d+)", line)
            if match and not port:
                port.append(int(match[1]))
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        if not ready.wait(60) or not port:
            raise RuntimeError("the moto server did not start")
        yield f"http://127.0.0.1:{port[0]}"
    finally:
        process.terminate()
        process.wait(30)


def fake_credentials() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def storage_options(endpoint: str, *, sign_payloads: bool) -> dict[str, Any]:
    """The same fsspec options for every method. Over plain http botocore SHA-256-hashes every
    request body for its signature unless told not to; over https with a checksum it does not,
    so by default the benchmark turns it off (--sign-payloads keeps it)."""
    options: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint}, "use_listings_cache": False}
    if not sign_payloads:
        options["config_kwargs"] = {"s3": {"payload_signing_enabled": False}}
    return options


# --------------------------------------------------------------------------- state and methods


class Flat(torch.nn.Module):
    """``n`` float32 parameters holding ``total`` bytes between them."""

    def __init__(self, total: int, n: int, *, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        numel = max(total // 4 // n, 1)
        self.params = torch.nn.ParameterList(
            [
                torch.nn.Parameter(torch.rand(numel, generator=generator), requires_grad=False)
                for _ in range(n)
            ]
        )


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


class Run:
    """One size: a checkpointer kept open across rounds (its staging buffers are allocated once,
    by an untimed warm-up save, as in a training run), and each round's objects."""

    def __init__(self, fs: Any, bucket: str, options: dict[str, Any], scratch: Path, module: Flat) -> None:
        import asyncckpt

        self.fs = fs
        self.options = options
        self.module = module
        self.scratch = scratch
        self.prefix = f"{bucket}/bench-{uuid.uuid4().hex[:8]}"
        self.events = scratch / "events.jsonl"
        self.ckpt = asyncckpt.AsyncCheckpointer(
            f"s3://{self.prefix}/asyncckpt", storage_options=options, keep_last=1000, event_log=self.events
        )
        self.ckpt.__enter__()
        self.ckpt.save(0, {"model": module}).result()  # warm-up: staging buffers, connections
        self.step = 0

    def close(self) -> None:
        self.ckpt.close()
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.prefix, recursive=True)

    def url(self, method: str) -> str:
        return f"s3://{self.prefix}/{method}"

    def save(self, method: str) -> float:
        if method == "asyncckpt":
            self.step += 1
            return timed(lambda: self.ckpt.save(self.step, {"model": self.module}).result())
        if method == "floor":
            local = self.local_file()
            return timed(lambda: self.fs.put_file(str(local), f"{self.prefix}/floor/file.ckpt"))
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer = FsspecWriter(self.url(f"dcp/{self.step}"), **self.options)
        return timed(
            lambda: dcp.save({"model": self.module.state_dict()}, storage_writer=writer, no_dist=True)
        )

    def upload_share(self) -> float:
        """Seconds of the last asyncckpt save spent uploading (the writer's write + fsync)."""
        for line in reversed(self.events.read_text().splitlines()):
            event = json.loads(line)
            if event.get("event") == "checkpoint.save.committed":
                return float(event["write_ms"] + event["fsync_ms"]) / 1000.0
        return float("nan")

    def restore(self, method: str) -> float:
        import asyncckpt

        if method == "asyncckpt":
            url = self.url(method)
            log = lambda *_, **__: None  # noqa: E731 - the summary is not what is measured
            return timed(
                lambda: asyncckpt.restore(url, {"model": self.module}, storage_options=self.options, log=log)
            )
        if method == "floor":
            target = self.scratch / "floor-get.ckpt"
            try:
                return timed(lambda: self.fs.get_file(f"{self.prefix}/floor/file.ckpt", str(target)))
            finally:
                target.unlink(missing_ok=True)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        reader = FsspecReader(self.url(f"dcp/{self.step}"), **self.options)
        state = {"model": self.module.state_dict()}
        return timed(lambda: dcp.load(state, storage_reader=reader, no_dist=True))

    def local_file(self) -> Path:
        """The checkpoint's bytes in one local file (written once per size, outside the timing)."""
        import asyncckpt

        path = self.scratch / "floor.ckpt"
        if not path.exists():
            asyncckpt.save(path, {"model": self.module}, step=1)
        return path

    def clean_round(self) -> None:
        """Remove this round's objects (but the newest asyncckpt step, which a restore reads)."""
        from asyncckpt.catalog import checkpoint_name

        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(f"{self.prefix}/floor", recursive=True)
            self.fs.rm(f"{self.prefix}/dcp", recursive=True)
        storage = self.ckpt._storage
        storage.delete([checkpoint_name(step) for step in range(self.step)])


def run_size(
    fs: Any, bucket: str, options: dict[str, Any], scratch: Path, size: int, args: argparse.Namespace
) -> dict[str, Any]:
    module = Flat(size, args.tensors, seed=size)
    nbytes = sum(p.numel() * 4 for p in module.parameters())
    methods = [m for m in METHODS if not (args.no_dcp and m == "dcp")]
    parts = args.parts.split(",")
    times: dict[str, dict[str, list[float]]] = {part: {m: [] for m in methods} for part in parts}
    uploads: list[float] = []
    run = Run(fs, bucket, options, scratch, module)
    try:
        for number in range(args.rounds):
            for method in methods:
                seconds = run.save(method)  # a restore needs the save either way
                if "save" in parts:
                    times["save"][method].append(seconds)
            uploads.append(run.upload_share())
            if "restore" in parts:
                for method in methods:
                    times["restore"][method].append(run.restore(method))
            run.clean_round()
            done = {part: {m: round(v[-1], 3) for m, v in t.items() if v} for part, t in times.items()}
            print(f"  {format_size(nbytes)} round {number + 1}/{args.rounds}: {done}", flush=True)
    finally:
        run.close()
    (scratch / "floor.ckpt").unlink(missing_ok=True)
    found: dict[str, Any] = {"size": format_size(size), "bytes": nbytes, "tensors": args.tensors}
    found["loadavg_end"] = system.loadavg()
    found |= {p: _part(times[p], nbytes) for p in parts}
    if "save" in found:
        found["save"]["asyncckpt_upload"] = summary(uploads)
    return found


def _part(times: dict[str, list[float]], nbytes: int) -> dict[str, Any]:
    found: dict[str, Any] = {m: summary(v) for m, v in times.items()}
    for method, values in times.items():
        found[method]["mb_s"] = round(nbytes / 1e6 / found[method]["median"], 1) if values else None
    found["asyncckpt_vs_floor"] = ratios(times["asyncckpt"], times["floor"])
    if "dcp" in times:
        found["asyncckpt_vs_dcp"] = ratios(times["asyncckpt"], times["dcp"])
    return found


# --------------------------------------------------------------------------- report


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| size | part | asyncckpt s | floor s | DCP s | asyncckpt / floor | asyncckpt / DCP |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for part in ("save", "restore"):
            if part not in result:
                continue
            row = result[part]
            cells = [_cell(row.get(m)) for m in METHODS]
            vs_dcp = _ratio(row.get("asyncckpt_vs_dcp"))
            size = f"{result['size']} in {result['tensors']} tensors"
            lines.append(
                f"| {size} | {part} | {' | '.join(cells)} | {_ratio(row['asyncckpt_vs_floor'])} | {vs_dcp} |"
            )
    return "\n".join(lines)


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("median") is None:
        return "-"
    return f"{entry['median']:.2f} [{entry['min']:.2f}-{entry['max']:.2f}] ({entry['mb_s']} MB/s)"


def _ratio(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("median") is None:
        return "-"
    return f"{entry['median']:.2f}x"


def write_results(out: Path, document: dict[str, Any], *, json_too: bool = True) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if json_too:
        out.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    machine = document["machine"]
    text = [
        f"# Remote storage: {document['server']}",
        "",
        f"Command: `{document['command']}`",
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['mem_total_gib']} GiB, "
        f"torch {machine['torch']}, asyncckpt {machine.get('asyncckpt')} ({machine.get('git_commit')}); "
        f"{document['when']}. Times in seconds: median [min-max] of {document['rounds']} rounds.",
        "",
        table(document["results"]),
        "",
        "asyncckpt's save is the time to durable: staging, the upload, the read-back before the",
        "commit (two ranged GETs) and the commit. The upload alone (the writer's write + fsync) took",
        "; ".join(
            f"{r['size']}: {r['save']['asyncckpt_upload']['median']:.2f} s"
            for r in document["results"]
            if "save" in r
        )
        + " (medians).",
        "",
        f"Load average at the start {machine['loadavg_start']}, after each size "
        + ", ".join(str(r["loadavg_end"]) for r in document["results"])
        + f" ({machine['cpus']} CPUs shared with the server and other work).",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        write_results(
            args.out or args.render.with_suffix(""), json.loads(args.render.read_text()), json_too=False
        )
        return 0
    warnings.filterwarnings("ignore", category=UserWarning)  # DCP without a process group
    for name, value in fake_credentials().items():
        if args.endpoint is None:
            os.environ[name] = value
    import s3fs

    with contextlib.ExitStack() as stack:
        endpoint = args.endpoint or stack.enter_context(moto_server())
        options = storage_options(endpoint, sign_payloads=args.sign_payloads)
        fs = s3fs.S3FileSystem(**options)
        bucket = args.bucket or f"bench-{uuid.uuid4().hex[:12]}"
        if args.bucket is None:
            fs.call_s3("create_bucket", Bucket=bucket)
        scratch = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="remote-bench-")))
        machine = system.machine(scratch)
        results = []
        for size in (parse_size(s) for s in args.sizes.split(",")):
            print(f"{format_size(size)} in {args.tensors} tensors against {endpoint}", flush=True)
            results.append(run_size(fs, bucket, options, scratch, size, args))
    document = {
        "command": shlex.join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "server": "an S3 endpoint" if args.endpoint else "moto server on 127.0.0.1 (same machine)",
        "rounds": args.rounds,
        "machine": machine,
        "results": results,
    }
    print(table(results))
    if args.out is not None:
        write_results(args.out, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
