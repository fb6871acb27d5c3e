"""state.json, written by several threads of the delivering process at once."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from cio_logging.state_record import STATE_FILE, read_state, write_state


def test_two_threads_writing_never_leave_a_torn_record(tmp_path: Path) -> None:
    """The sender's loop and its send pool (a breaker transition) both write the record.

    With one temporary file per process, one thread unlinked the other's and renamed
    a half-written file into place: readers saw torn JSON.
    """
    filler = "x" * 50_000  # long enough that a write is still going when the other starts
    stop = threading.Event()
    torn: list[int] = []
    whole = 0

    def write(thread: int) -> None:
        for number in range(500):
            write_state(tmp_path, {"thread": thread, "number": number, "filler": filler})

    def read() -> None:
        nonlocal whole
        while not stop.is_set():
            try:
                text = (tmp_path / STATE_FILE).read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            try:
                json.loads(text)
            except ValueError:
                torn.append(len(text))
            else:
                whole += 1

    writers = [threading.Thread(target=write, args=(thread,)) for thread in range(2)]
    reader = threading.Thread(target=read)
    reader.start()
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    stop.set()
    reader.join(60)
    assert torn == []
    assert whole > 0
    final = read_state(tmp_path)
    assert final is not None
    assert final["number"] == 499
    assert sorted(path.name for path in tmp_path.iterdir()) == [STATE_FILE]  # nothing left aside
