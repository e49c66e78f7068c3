"""``asyncckpt logs``: rendering, filters, bad lines, --follow across appends, truncation, replacement."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncckpt.cli.logs import EventFilter, parse_event
from asyncckpt.errors import EXIT_FAILURE, EXIT_OK

from .helpers import ENV, run


def test_logs_renders_console_lines(run_dir: Path) -> None:
    result = run("logs", run_dir)
    assert result.exit_code == EXIT_OK, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert re.match(
        r"^\d{4}-\d\d-\d\dT\S+Z \[info\s+\] checkpoint\.save\.committed\s+step=10 bytes=1234", lines[1]
    )
    assert "[warning  ] checkpoint.save.skipped" in lines[2]
    assert "reason='all 1 staging slots busy'" in lines[2]
    assert "[error    ] checkpoint.save.failed" in lines[3]
    assert "\x1b[" not in result.stdout  # no colors when not a terminal


def test_logs_filters_by_event_glob_and_level(run_dir: Path) -> None:
    names = lambda result: [json.loads(line)["event"] for line in result.stdout.splitlines()]  # noqa: E731
    assert names(run("logs", run_dir, "--json", "--event", "checkpoint.save.*")) == [
        "checkpoint.save.committed",
        "checkpoint.save.skipped",
        "checkpoint.save.failed",
    ]
    assert names(run("logs", run_dir, "--json", "-e", "*.skipped", "-e", "*.started")) == [
        "checkpoint.writer.started",
        "checkpoint.save.skipped",
    ]
    assert names(run("logs", run_dir, "--json", "--level", "warning")) == [
        "checkpoint.save.skipped",
        "checkpoint.save.failed",
    ]


def test_logs_skips_lines_that_are_not_json_and_the_half_written_last_line(run_dir: Path) -> None:
    events = run_dir / "events.jsonl"
    with events.open("a") as file:
        file.write('not json\n{"event": "checkpoint.pruned", "level": "info"}\n{"event": "half')
    result = run("logs", run_dir, "--json")
    assert result.exit_code == EXIT_OK
    assert json.loads(result.stdout.splitlines()[-1])["event"] == "checkpoint.pruned"
    assert "half" not in result.stdout
    assert "skipped a line that is not a JSON object: not json" in result.stderr


def test_logs_directory_without_events_file(tmp_path: Path) -> None:
    result = run("logs", tmp_path)
    assert result.exit_code == EXIT_FAILURE
    assert "no events.jsonl" in result.stderr


def test_logs_follow_in_process_stops_on_its_hooks(run_dir: Path) -> None:
    result = run("logs", run_dir, "--follow", "--json", "--max-lines", "2")
    assert result.exit_code == EXIT_OK
    assert len(result.stdout.splitlines()) == 2
    result = run("logs", run_dir, "--follow", "--json", "--idle-timeout", "0.1", "--poll-interval", "0.01")
    assert result.exit_code == EXIT_OK
    assert len(result.stdout.splitlines()) == 4


class LineReader:
    """Reads a child's stdout in a thread so the test can wait for a line with a deadline."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(process,), daemon=True)
        self.thread.start()

    def _pump(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float = 60.0) -> str:
        line = self.lines.get(timeout=timeout)
        assert line is not None, "the follower exited"
        return line


@pytest.fixture
def follower(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], LineReader]]:
    events = tmp_path / "events.jsonl"
    events.touch()
    process = subprocess.Popen(
        [sys.executable, "-m", "asyncckpt", "logs", str(events), "--follow", "--json"]
        + ["--poll-interval", "0.02", "--max-lines", "4", "--idle-timeout", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV},
    )
    yield process, LineReader(process)
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def event_line(name: str, **fields: Any) -> str:
    return json.dumps({"event": name, "level": "info", "timestamp": "2024-01-01T00:00:00Z", **fields})


def test_logs_follow_survives_half_lines_truncation_and_recreation(
    tmp_path: Path, follower: tuple[subprocess.Popen[str], LineReader]
) -> None:
    process, reader = follower
    events = tmp_path / "events.jsonl"
    writer = subprocess.Popen(
        [sys.executable, "-c", APPENDER, str(events)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def write(op: str, text: str) -> None:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.write(json.dumps([op, text]) + "\n")
        writer.stdin.flush()
        assert writer.stdout.readline() == "ok\n"

    a, b = event_line("checkpoint.save.staged", step=1), event_line("checkpoint.save.committed", step=1)
    c, d = event_line("c", step=2), event_line("d", step=3)
    try:
        write("append", a + "\n" + b[:25])  # one whole line and the first part of the next
        assert reader.next() == a  # the follower has read the file, half line included
        write("append", b[25:] + "\n")
        assert reader.next() == b  # printed once, whole
        write("truncate", c + "\n")  # shorter than before: the follower starts from the top
        assert reader.next() == c
        write("replace", d + "\n")  # a new file under the same name
        assert reader.next() == d
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait(timeout=30)
    assert process.wait(timeout=60) == EXIT_OK  # --max-lines 4
    assert reader.lines.get(timeout=30) is None  # nothing else was printed


def test_logs_follow_waits_for_the_events_file_of_a_directory(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "asyncckpt", "logs", str(tmp_path), "--follow", "--json", "--max-lines", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV},
    )
    try:
        assert process.stderr is not None and process.stdout is not None
        assert process.stderr.readline().strip() == f"waiting for {tmp_path / 'events.jsonl'} to appear"
        line = event_line("checkpoint.writer.started")
        (tmp_path / "events.jsonl").write_text(line + "\n")
        assert process.stdout.readline().rstrip("\n") == line
        assert process.wait(timeout=60) == EXIT_OK
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


APPENDER = r"""
import json, os, sys
path = sys.argv[1]
for command in sys.stdin:
    op, text = json.loads(command)
    data = text.encode()
    if op == "append":
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(fd, data)
        os.close(fd)
    elif op == "truncate":
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(data)
    elif op == "replace":
        with open(path + ".new", "wb") as f:
            f.write(data)
        os.replace(path + ".new", path)
    print("ok", flush=True)
"""


def test_event_filter_and_parse_event() -> None:
    assert parse_event('{"event": "a", "level": "info"}') == {"event": "a", "level": "info"}
    assert parse_event("[1, 2]") is None and parse_event("not json") is None
    keep = EventFilter(("checkpoint.save.*",), "warning")
    assert keep.matches({"event": "checkpoint.save.failed", "level": "error"})
    assert keep.matches({"event": "checkpoint.save.failed", "level": "exception"})  # counts as error
    assert not keep.matches({"event": "checkpoint.save.committed", "level": "info"})
    assert not keep.matches({"event": "checkpoint.pruned", "level": "error"})
    assert EventFilter().matches({"event": "anything", "level": "no-such-level"})
