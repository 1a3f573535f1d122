"""Per-slide claims: exclusive, taken over only from jobs that are gone, heartbeat, failed slides kept;
the progress record survives torn lines; the slide queue claims lazily."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from extract.batch.claims import ClaimBoard
from extract.batch.progress_record import append_record, latest_by_slide, read_records
from extract.batch.slide_list import SlideQueue
from extract.partial_files import host_name


def _write_claim(path: Path, host: str, pid: int, started: float, status: str = "running") -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "started": started, "status": status}))


@pytest.fixture()
def ended_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_claim_is_exclusive_and_released(tmp_path: Path) -> None:
    with ClaimBoard(tmp_path) as first, ClaimBoard(tmp_path) as second:
        assert first.claim("a") and not second.claim("a") and not first.claim("a")
        assert json.loads(first.path("a").read_text())["pid"] == os.getpid()
        first.release("a")
        assert second.claim("a")


def test_claims_of_ended_jobs_are_taken_over_and_live_ones_kept(tmp_path: Path, ended_pid: int) -> None:
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with ClaimBoard(tmp_path, timeout_s=60) as board:
            _write_claim(board.path("dead"), host_name(), ended_pid, time.time() - 5)
            _write_claim(board.path("live"), host_name(), running.pid, time.time())
            _write_claim(board.path("foreign"), "othernode", 123, time.time())  # another node, heartbeat fresh
            _write_claim(board.path("silent"), "othernode", 456, time.time() - 3600)
            os.utime(board.path("silent"), (time.time() - 120,) * 2)  # no heartbeat for 2 min > 60 s
            assert board.claim("dead") and board.claim("silent")
            assert not board.claim("live") and not board.claim("foreign")
            assert json.loads(board.path("dead").read_text())["pid"] == os.getpid()
    finally:
        running.kill()
        running.wait()


def test_two_jobs_taking_over_one_stale_claim_one_wins(tmp_path: Path, ended_pid: int) -> None:
    with ClaimBoard(tmp_path) as first, ClaimBoard(tmp_path) as second:
        _write_claim(first.path("s"), host_name(), ended_pid, time.time() - 5)
        seen = first.path("s").stat()
        # Both judged it stale; the first to create the takeover marker wins.
        marker = first.path("s").with_name(f"s.claim.takeover-{seen.st_ino}-{seen.st_mtime_ns}")
        marker.touch()
        assert not first.claim("s")  # the marker exists: someone else is taking it over
        marker.unlink()
        assert first.claim("s") and not second.claim("s")
        first.release("s")
        assert not list(tmp_path.glob("s.claim*"))


def test_heartbeat_keeps_a_claim_fresh(tmp_path: Path) -> None:
    with ClaimBoard(tmp_path, timeout_s=0.5) as board:
        assert board.claim("a")
        os.utime(board.path("a"), (time.time() - 100,) * 2)
        time.sleep(0.3)  # beats every 0.05 s
        assert time.time() - board.path("a").stat().st_mtime < 1


def test_a_failed_slide_is_not_retried_while_its_job_lives(tmp_path: Path) -> None:
    first = ClaimBoard(tmp_path)
    assert first.claim("bad") and first.claim("cut")
    first.mark_failed("bad")
    with ClaimBoard(tmp_path) as second:
        assert not second.claim("bad") and not second.claim("cut")
        first.close()  # the job ends: a slide it was still on is released, a failed one kept for the next job
        assert not first.path("cut").exists() and first.path("bad").exists()
        assert second.claim("bad") and second.claim("cut")


def test_the_queue_claims_only_when_reached(tmp_path: Path) -> None:
    asked: list[str] = []

    def take(path: Path) -> bool:
        asked.append(path.name)
        return path.name != "b"  # held by another job

    queue = SlideQueue([Path("a"), Path("b"), Path("c"), Path("d")], take)
    assert queue.get(0) == Path("a") and asked == ["a"]
    assert queue.get(1) == Path("c") and asked == ["a", "b", "c"]
    assert queue.position(Path("c")) == 1 and list(queue) == [Path("a"), Path("c"), Path("d")]
    assert queue.get(3) is None


def test_progress_record_is_appended_and_a_torn_line_ignored(tmp_path: Path) -> None:
    record = tmp_path / "progress.jsonl"
    append_record(record, {"slide": "a.svs", "status": "failed"})
    append_record(record, {"slide": "b.svs", "status": "done"})
    with open(record, "a") as handle:
        handle.write('{"slide": "c.svs", "sta')  # killed inside the write
    append_record(record, {"slide": "a.svs", "status": "done"})
    records = read_records(record)
    assert [r["slide"] for r in records] == ["a.svs", "b.svs", "a.svs"]
    assert {slide: r["status"] for slide, r in latest_by_slide(records).items()} == {"a.svs": "done", "b.svs": "done"}
