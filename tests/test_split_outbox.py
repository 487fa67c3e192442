"""The shared outbox: batches within both limits, acknowledgements journaled by id, crash recovery without resending."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from waiting import reap

import mixsync.warehouse.outbox as outbox
from mixsync.http import OutcomeUnknown
from mixsync.warehouse import Warehouse
from mixsync.warehouse.outbox import BatchOutcome, FatalPushError, enqueue, outbox_ddl, push, recover

TABLE = "sync.test_outbox"


def make_outbox(tmp_path, rows: int = 250) -> Warehouse:
    store = Warehouse(tmp_path / "w.duckdb")
    with store.write() as con:
        con.execute(outbox_ddl(TABLE))
        # Multi-byte text, quotes and commas (which a CSV writer would want to quote), and one payload larger
        # than any batch may be.
        enqueue(con, TABLE, None,
                "SELECT 'id' || range AS id, 'day-' || (range % 3) AS scope, "
                "json_object('n', range, 'pad', repeat('é,\"', (range % 37)::INT), "
                "            'big', CASE WHEN range = 77 THEN repeat('x', 700) END)::VARCHAR AS payload "
                f"FROM range({rows})")
    return store


def rows(store: Warehouse) -> dict[str, tuple]:
    with store.read() as con:
        return {payload: (status, error, attempts) for payload, status, error, attempts in con.execute(
            f"SELECT payload, status, error, attempts FROM {TABLE}").fetchall()}


def body_size(payloads: list[bytes]) -> int:
    return len(b"[" + b",".join(payloads) + b"]")


@pytest.mark.parametrize("read_chunk", [97, outbox.READ_CHUNK])  # batches straddling many reads, or one read
def test_batches_are_as_full_as_both_limits_allow_and_each_row_is_sent_once(tmp_path, monkeypatch, read_chunk):
    monkeypatch.setattr(outbox, "READ_CHUNK", read_chunk)
    store = make_outbox(tmp_path)
    batches: list[list[bytes]] = []
    report = push(store, TABLE, lambda p: (batches.append(p), BatchOutcome())[1], tmp_path / "work",
                  max_items=10, max_bytes=400, concurrency=1)
    sent = [p for batch in batches for p in batch]
    assert sorted(p.decode() for p in sent) == sorted(rows(store)) and len(set(sent)) == 250
    assert (report.considered, report.sent, report.batches) == (250, 250, len(batches))
    assert all(len(b) <= 10 and (body_size(b) <= 400 or len(b) == 1) for b in batches)
    assert any(body_size(b) > 400 for b in batches)  # the oversized payload went alone
    # Each batch stopped only because the next payload would not fit (one sender: batches arrive in order).
    assert all(len(b) == 10 or body_size(b + following[:1]) > 400 for b, following in itertools.pairwise(batches))
    assert {s for s, _, _ in rows(store).values()} == {"sent"}
    assert not list((tmp_path / "work" / "sync_test_outbox").iterdir())
    assert push(store, TABLE, lambda p: pytest.fail("nothing is pending"), tmp_path / "work").considered == 0


@pytest.mark.parametrize("apply_lines", [7, outbox.APPLY_LINES])  # applied in windows across batches, or at once
def test_a_failed_push_marks_exactly_the_acknowledged_rows_and_a_rerun_sends_the_rest_once(tmp_path, monkeypatch,
                                                                                            apply_lines):
    monkeypatch.setattr(outbox, "APPLY_LINES", apply_lines)
    store = make_outbox(tmp_path)
    sent: list[bytes] = []
    calls: list[int] = []

    def send(payloads: list[bytes]) -> BatchOutcome:
        calls.append(len(payloads))
        sent.extend(payloads)
        if len(calls) == 1:
            return BatchOutcome(rejected={0: "refused\nby the\tservice", 3: "also refused"})
        if len(calls) == 9:
            raise FatalPushError("stop here")
        return BatchOutcome()

    with pytest.raises(FatalPushError):
        push(store, TABLE, send, tmp_path / "work", max_items=10, max_bytes=400, concurrency=1)
    acknowledged = sum(calls[:8])
    state = rows(store)
    assert {p for p, (s, _, _) in state.items() if s != "pending"} == {p.decode() for p in sent[:acknowledged]}
    assert sorted(e for s, e, _ in state.values() if s == "rejected") == ["also refused", "refused by the service"]
    assert {state[sent[0].decode()][0], state[sent[1].decode()][0]} == {"rejected", "sent"}

    again = push(store, TABLE, lambda p: (sent.extend(p), BatchOutcome())[1], tmp_path / "work",
                 max_items=10, scopes=["day-0", "day-1", "day-2"])
    assert again.sent == 250 - acknowledged and again.recovered_sent == 0
    assert sorted(set(sent)) == sorted(sent[:acknowledged] + sent[acknowledged + calls[8]:])  # each once, but batch 9
    assert len(sent) == 250 + calls[8]
    assert {s for s, _, _ in rows(store).values()} == {"sent", "rejected"}
    assert {a for _, _, a in rows(store).values()} == {1}


KILLED_PUSH = """
import json, os, sys, threading
from pathlib import Path
from mixsync.http import OutcomeUnknown
from mixsync.warehouse import Warehouse
from mixsync.warehouse.outbox import BatchOutcome, push

db, table, work, log = sys.argv[1:5]
lock, second_in_flight, calls = threading.Lock(), threading.Event(), []

def send(payloads):
    with lock:
        calls.append(1)
        n = len(calls)
    Path(log, f"{n}.json").write_text(json.dumps([p.decode() for p in payloads]))
    if n == 4:
        second_in_flight.wait(30)
        os._exit(17)  # killed with batches 4 and 5 sent but not acknowledged
    if n == 5:
        second_in_flight.set()
        threading.Event().wait()
    return BatchOutcome(rejected={2: "bad value"} if n == 1 else {})

push(Warehouse(db), table, send, Path(work), max_items=10, max_bytes=1 << 20, concurrency=2)
"""


def kill_a_push(tmp_path):
    """An outbox and a child pushing it that dies (os._exit, no clean-up) with batches 4 and 5 in flight; returns
    the outbox and the ids each of the five batches held."""
    store = make_outbox(tmp_path)
    log = tmp_path / "calls"
    log.mkdir()
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_PUSH), str(store.path), TABLE,
                             str(tmp_path / "work"), str(log)], capture_output=True, timeout=120)
    assert killed.returncode == 17, killed.stderr.decode()[-2000:]
    return store, {n: json.loads(log.joinpath(f"{n}.json").read_text()) for n in range(1, 6)}


def test_a_killed_push_is_recovered_counting_what_was_in_flight_and_never_resending_what_was_acknowledged(tmp_path):
    store, batch = kill_a_push(tmp_path)
    assert {s for s, _, _ in rows(store).values()} == {"pending"}  # nothing was applied before the kill
    journal = next((tmp_path / "work" / "sync_test_outbox").glob("*.journal"))
    kept = tmp_path / "journal.copy"
    shutil.copy(journal, kept)

    recovered = recover(store, TABLE, tmp_path / "work")
    assert (recovered.recovered_sent, recovered.recovered_rejected, recovered.in_flight_at_crash) == (29, 1, 20)
    state = rows(store)
    acknowledged = set(batch[1] + batch[2] + batch[3])
    assert {p for p, (s, _, _) in state.items() if s != "pending"} == acknowledged
    assert state[batch[1][2]] == ("rejected", "bad value", 1)
    assert not list((tmp_path / "work" / "sync_test_outbox").iterdir())  # journal and snapshot are gone

    shutil.copy(kept, journal)  # applying the same journal again changes nothing
    recover(store, TABLE, tmp_path / "work")
    assert rows(store) == state

    resent: list[str] = []
    report = push(store, TABLE, lambda p: (resent.extend(x.decode() for x in p), BatchOutcome())[1], tmp_path / "work")
    assert report.sent == 220 and report.in_flight_at_crash == 0
    assert sorted(resent) == sorted(set(state) - acknowledged)
    assert set(batch[4] + batch[5]) <= set(resent)  # in flight at the kill: sent again
    assert {s for s, _, _ in rows(store).values()} == {"sent", "rejected"}


def test_at_most_once_a_killed_push_holds_what_was_in_flight_in_doubt_and_never_sends_it_again(tmp_path):
    store, batch = kill_a_push(tmp_path)

    recovered = recover(store, TABLE, tmp_path / "work", at_most_once=True)
    assert (recovered.recovered_sent, recovered.in_flight_at_crash, recovered.recovered_in_doubt) == (29, 20, 20)
    state = rows(store)
    assert {p for p, (s, _, _) in state.items() if s == "in_doubt"} == set(batch[4] + batch[5])
    assert all("in flight" in state[p][1] for p in batch[4])

    resent: list[str] = []
    report = push(store, TABLE, lambda p: (resent.extend(x.decode() for x in p), BatchOutcome())[1],
                  tmp_path / "work", at_most_once=True)
    assert report.sent == 200 and not set(resent) & set(batch[4] + batch[5])
    assert {s for s, _, _ in rows(store).values()} == {"sent", "rejected", "in_doubt"}


def test_an_unknown_outcome_holds_its_batch_in_doubt_and_stops_sending_new_batches(tmp_path):
    store = make_outbox(tmp_path)
    calls: list[list[bytes]] = []

    def send(payloads: list[bytes]) -> BatchOutcome:
        calls.append(payloads)
        if len(calls) == 3:
            raise OutcomeUnknown("ReadTimeout after sending: timed out")
        return BatchOutcome()

    report = push(store, TABLE, send, tmp_path / "work", max_items=10, concurrency=1, at_most_once=True)
    assert (report.sent, report.in_doubt, len(calls)) == (20, 10, 3)
    state = rows(store)
    assert {p.decode() for p in calls[2]} == {p for p, (s, _, _) in state.items() if s == "in_doubt"}
    assert {e for s, e, _ in state.values() if s == "in_doubt"} == {"ReadTimeout after sending: timed out"}
    assert sum(s == "pending" for s, _, _ in state.values()) == 220
    again = push(store, TABLE, lambda p: BatchOutcome(), tmp_path / "work", at_most_once=True)
    assert again.considered == 220 and again.in_doubt == 0


def test_a_body_sender_gets_each_batch_as_one_json_array_of_the_payloads_within_both_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox, "READ_CHUNK", 97)  # batches straddling many reads
    store = make_outbox(tmp_path)
    bodies: list[tuple[bytes, int]] = []
    report = push(store, TABLE, outbox.BodySender(lambda body, count: (bodies.append((body, count)), BatchOutcome())[1]),
                  tmp_path / "work", max_items=10, max_bytes=400, concurrency=1, at_most_once=True)
    arrays = [json.loads(body) for body, _ in bodies]
    assert [len(a) for a in arrays] == [count for _, count in bodies]
    sent = [json.dumps(item, ensure_ascii=False, separators=(",", ":")) for array in arrays for item in array]
    assert sorted(json.loads(s)["n"] for s in sent) == list(range(250))
    assert all(len(a) <= 10 and (len(body) <= 400 or len(a) == 1) for (body, _), a in zip(bodies, arrays, strict=True))
    assert (report.sent, report.batches) == (250, len(bodies))
    assert {s for s, _, _ in rows(store).values()} == {"sent"}


def test_a_payload_with_a_newline_fails_the_push_clearly_and_nothing_is_marked_for_it(tmp_path):
    store = make_outbox(tmp_path, rows=30)
    with store.write() as con:
        con.execute(f"UPDATE {TABLE} SET payload = '{{\"n\":' || chr(10) || '7}}' WHERE id = 'id7'")
    sent: list[bytes] = []
    with pytest.raises(Exception, match="id7 has a newline in its payload"):
        push(store, TABLE, lambda p: (sent.extend(p), BatchOutcome())[1], tmp_path / "work", max_items=10)
    state = rows(store)
    assert state['{"n":\n7}'][0] == "pending"
    assert {p for p, (s, _, _) in state.items() if s == "sent"} == {p.decode() for p in sent}
    assert not list((tmp_path / "work" / "sync_test_outbox").iterdir())


def test_a_journal_of_the_previous_format_left_by_a_crash_is_still_applied(tmp_path):
    store = make_outbox(tmp_path, rows=6)
    work = tmp_path / "work" / "sync_test_outbox"
    work.mkdir(parents=True)
    # One line an id: two settled batches (one item refused) and one in flight at the crash.
    work.joinpath("20261101T000000-old.journal").write_text(
        "id0\tinflight\t0\nid1\tinflight\t0\nid0\tsent\nid1\trejected\tbad value\nsent 0 2\n"
        "id2\tinflight\t1\nid3\tinflight\t1\n")
    recovered = recover(store, TABLE, tmp_path / "work", at_most_once=True)
    assert (recovered.recovered_sent, recovered.recovered_rejected, recovered.recovered_in_doubt) == (1, 1, 2)
    with store.read() as con:
        state = dict(con.execute(f"SELECT id, status FROM {TABLE}").fetchall())
    assert state == {"id0": "sent", "id1": "rejected", "id2": "in_doubt", "id3": "in_doubt", "id4": "pending",
                     "id5": "pending"}
    assert not list(work.iterdir())


def test_each_batch_is_marked_by_the_ids_of_the_payloads_it_carried_across_many_row_groups(tmp_path, monkeypatch):
    # Enough rows for DuckDB to scan the table in parallel (several row groups of 122,880 rows): the snapshot's
    # ids and payloads must still come out in the same order, or a batch's outcome lands on other rows.
    monkeypatch.setattr(outbox, "APPLY_LINES", 70_001)  # windows of the apply that cut batches
    store = make_outbox(tmp_path, rows=300_000)
    calls: list[list[bytes]] = []

    def send(payloads: list[bytes]) -> BatchOutcome:
        calls.append(payloads)
        if len(calls) == 2:
            return BatchOutcome(rejected={5: "refused"})
        if len(calls) == 200:
            raise OutcomeUnknown("ReadTimeout after sending: timed out")
        return BatchOutcome()

    report = push(store, TABLE, send, tmp_path / "work", max_items=1000, concurrency=1, at_most_once=True)
    assert (report.sent, report.rejected, report.in_doubt) == (198_999, 1, 1000)
    state = rows(store)
    status = {payload.decode(): status for payload, status in zip(
        [p for batch in calls for p in batch],
        ["sent"] * 1005 + ["rejected"] + ["sent"] * 197_994 + ["in_doubt"] * 1000, strict=True)}
    assert {p: s for p, (s, _, _) in state.items() if s != "pending"} == status
    assert sum(s == "pending" for s, _, _ in state.values()) == 100_000


PUSH_TO_SPLIT = """
import sys
from pathlib import Path
import mixsync.warehouse.outbox as outbox
from mixsync.settings import Secret
from mixsync.split.assets import batch_sender
from mixsync.split.client import SplitEventsClient
from mixsync.split.settings import SplitSettings
from mixsync.warehouse import Warehouse

db, table, work, url, key = sys.argv[1:6]
# Small windows, applied while later batches are sent; UPDATE windows that cut batches.
outbox.OVERLAP_LINES, outbox.APPLY_LINES = 1000, 700
settings = SplitSettings(sdk_key=Secret(key), events_url=url, traffic_type="user", environment=None, mapping_file=None,
                         batch_size=100, max_batch_bytes=1 << 20, concurrency=2)
with SplitEventsClient(settings) as client:
    outbox.push(Warehouse(db), table, batch_sender(client), Path(work), max_items=100, concurrency=2, at_most_once=True)
"""


def test_a_push_killed_after_it_applied_windows_leaves_every_row_as_split_recorded_it(tmp_path, sandbox):
    import orjson

    rows_count, answered_batches = 6000, 40
    store = Warehouse(tmp_path / "w.duckdb")
    with store.write() as con:
        con.execute(outbox_ddl(TABLE))
        enqueue(con, TABLE, None,
                "SELECT 'id' || range AS id, 'day' AS scope, json_object('eventTypeId', 'checkout', "
                "'trafficTypeName', 'user', 'key', 'user-' || range, 'timestamp', 1767225600000 + range, "
                "'value', NULL, 'properties', json_object('n', range))::VARCHAR AS payload FROM range($rows)",
                {"rows": rows_count})
    split = sandbox.split
    split.hold_from_request, split.hold_seconds = answered_batches + 1, 120  # later requests: received, no answer
    child = subprocess.Popen([sys.executable, "-c", PUSH_TO_SPLIT, str(store.path), TABLE, str(tmp_path / "work"),
                              sandbox.env()["SPLIT_EVENTS_URL"], split.sdk_key],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Killed once Split holds two batches (the push's concurrency) and the push applied windows of the 40
        # answered ones to the table itself, while those two were in flight.
        deadline = time.monotonic() + 120
        while True:
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the push never applied a window while sending"
            if split.bulk_requests >= answered_batches + 2:
                with store.read() as con:
                    applied = con.execute(f"SELECT count(*) FROM {TABLE} WHERE status = 'sent'").fetchone()[0]
                if applied >= answered_batches * 100 - 1000:
                    break
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        reap(child)
        split.hold_from_request = None
        split.release()
    assert applied < rows_count  # applied during the push: it never reached the end
    assert list((tmp_path / "work" / "sync_test_outbox").glob("*.journal"))  # killed before its final apply

    recovered = recover(store, TABLE, tmp_path / "work", at_most_once=True)
    assert recovered.in_flight_at_crash == recovered.recovered_in_doubt == 200
    # Requests are numbered as Split accepts them and their events kept in that order: the first 40 were answered.
    answered = {split.identity(e) for e in split.events[:answered_batches * 100]}
    held = {split.identity(e) for e in split.events[answered_batches * 100:]}
    assert len(answered) == answered_batches * 100 and len(held) == 200 and split.duplicates() == 0
    with store.read() as con:
        status = {split.identity(orjson.loads(p)): s for p, s in con.execute(f"SELECT payload, status FROM {TABLE}")
                  .fetchall()}
    assert {i for i, s in status.items() if s == "sent"} == answered
    assert {i for i, s in status.items() if s == "in_doubt"} == held
    assert sum(s == "pending" for s in status.values()) == rows_count - len(answered) - len(held)

    # The next push sends exactly the rows Split never received, once.
    from mixsync.settings import Secret
    from mixsync.split.assets import batch_sender
    from mixsync.split.client import SplitEventsClient
    from mixsync.split.settings import SplitSettings

    settings = SplitSettings(sdk_key=Secret(split.sdk_key), events_url=sandbox.env()["SPLIT_EVENTS_URL"],
                             traffic_type="user", environment=None, mapping_file=None, batch_size=100,
                             max_batch_bytes=1 << 20, concurrency=2)
    with SplitEventsClient(settings) as client:
        report = push(store, TABLE, batch_sender(client), tmp_path / "work", max_items=100, at_most_once=True)
    assert report.sent == rows_count - len(answered) - len(held)
    assert split.duplicates() == 0 and set(split.received()) == set(status)


MOVE_ROWS = """
import sys
from mixsync.warehouse import Warehouse

db, table = sys.argv[1:3]
with Warehouse(db).write() as con:  # as a run re-mapping its days does, then a checkpoint that compacts the table
    con.execute(f"DELETE FROM {table} WHERE scope <> 'day-1'")
    con.execute("CHECKPOINT")
"""


def test_rows_renumbered_by_another_process_during_a_push_get_the_outcome_of_the_payload_they_carried(
        tmp_path, monkeypatch):
    # The apply finds a line's row by the row number the snapshot saw, checked against its id. Here another process
    # deletes two thirds of the outbox and checkpoints while the push sends, so DuckDB compacts the table and the
    # pushed rows get other row numbers: every outcome must still land on the row whose payload was sent.
    monkeypatch.setattr(outbox, "OVERLAP_LINES", 20_000)  # windows applied while sending, after the move
    monkeypatch.setattr(outbox, "APPLY_LINES", 7_001)  # UPDATE windows that cut batches
    store = make_outbox(tmp_path, rows=300_000)
    with store.read() as con:
        row_numbers = dict(con.execute(f"SELECT id, rowid FROM {TABLE} WHERE scope = 'day-1'").fetchall())
    calls: list[list[bytes]] = []

    def send(payloads: list[bytes]) -> BatchOutcome:
        calls.append(payloads)
        if len(calls) == 1:
            subprocess.run([sys.executable, "-c", MOVE_ROWS, str(store.path), TABLE], check=True, timeout=300)
        if len(calls) == 2:
            return BatchOutcome(rejected={5: "refused"})
        if len(calls) == 60:
            raise OutcomeUnknown("ReadTimeout after sending: timed out")
        return BatchOutcome()

    report = push(store, TABLE, send, tmp_path / "work", scope="day-1", max_items=1000, concurrency=1,
                  at_most_once=True)
    assert (report.sent, report.rejected, report.in_doubt) == (58_999, 1, 1000)
    with store.read() as con:
        now_numbered = dict(con.execute(f"SELECT id, rowid FROM {TABLE}").fetchall())
    assert now_numbered.keys() == row_numbers.keys()
    assert sum(now_numbered[i] != row_numbers[i] for i in row_numbers) > 90_000  # the rows did move: the outcomes below were not found by the old row numbers
    state = rows(store)
    expected = dict(zip([p.decode() for batch in calls for p in batch],
                        ["sent"] * 1005 + ["rejected"] + ["sent"] * 57_994 + ["in_doubt"] * 1000, strict=True))
    assert {p: s for p, (s, _, _) in state.items() if s != "pending"} == expected
    assert [e for p, (s, e, _) in state.items() if s == "rejected"] == ["refused"]
    assert {a for s, _, a in state.values() if s != "pending"} == {1}
    assert sum(s == "pending" for s, _, _ in state.values()) == 40_000


def test_a_journal_whose_ids_file_has_no_row_numbers_is_applied_by_id(tmp_path):
    # Left by a push of the previous version killed before its apply: its ids file holds ids only.
    store = make_outbox(tmp_path, rows=6)
    work = tmp_path / "work" / "sync_test_outbox"
    work.mkdir(parents=True)
    with store.read() as con:
        con.execute(f"COPY (SELECT id FROM {TABLE} ORDER BY id DESC) TO $path (FORMAT parquet)",
                    {"path": str(work / "20261101T000000-old.ids.parquet")})
    work.joinpath("20261101T000000-old.journal").write_text(
        "inflight\t0\t0\t2\t\t.\nrejected\t0\t1\t\tbad value\t.\nsent\t0\t\t\t\t.\ninflight\t1\t2\t2\t\t.\n")
    recovered = recover(store, TABLE, tmp_path / "work", at_most_once=True)
    assert (recovered.recovered_sent, recovered.recovered_rejected, recovered.recovered_in_doubt) == (1, 1, 2)
    with store.read() as con:
        state = dict(con.execute(f"SELECT id, status FROM {TABLE}").fetchall())
    assert state == {"id5": "sent", "id4": "rejected", "id3": "in_doubt", "id2": "in_doubt", "id1": "pending",
                     "id0": "pending"}
    assert not list(work.iterdir())


HELD_PUSH = """
import logging, sys
from pathlib import Path
from mixsync.warehouse import Warehouse
from mixsync.warehouse.outbox import BatchOutcome, push

db, table, work, sent_log, run_log, hold = sys.argv[1:7]
logging.basicConfig(filename=run_log, level=logging.INFO)
held = [hold == "hold"]

def send(payloads):
    with open(sent_log, "a") as out:
        out.write("".join(p.decode() + "\\n" for p in payloads))
    if held[0]:  # the service keeps the first request until the test says "go" on stdin
        held[0] = False
        sys.stdin.readline()
    return BatchOutcome()

push(Warehouse(db), table, send, Path(work), max_items=10, max_bytes=1 << 20, concurrency=1)
"""


def test_a_second_push_of_the_same_outbox_waits_for_the_live_one_and_nothing_is_sent_twice(tmp_path):
    """Two runs pushing one outbox at once (an instance without pools): the second neither takes the live push's
    journal for an interrupted one's nor sends its pending rows; it waits, then finds nothing left to send."""
    from waiting import poll

    store = make_outbox(tmp_path)
    logs = {name: (tmp_path / f"{name}.sent", tmp_path / f"{name}.log") for name in ("first", "second")}

    def start(name: str, hold: str) -> subprocess.Popen:
        sent, run = logs[name]
        return subprocess.Popen([sys.executable, "-c", HELD_PUSH, str(store.path), TABLE, str(tmp_path / "work"),
                                 str(sent), str(run), hold], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start("first", "hold")
    try:
        poll(lambda: logs["first"][0].exists(), 60, "the first push's first request")
        second = start("second", "no")
        try:
            waiting_logged = lambda: (logs["second"][1].exists()  # noqa: E731
                                      and "another push of this outbox is running" in logs["second"][1].read_text())
            poll(lambda: waiting_logged() or second.poll() is not None, 60, "the second push to wait or end")
            assert not logs["second"][0].exists()  # it sent nothing while the first was live
            assert second.poll() is None and waiting_logged()
            assert first.poll() is None
            first.communicate("go\n", timeout=120)
            assert first.returncode == 0
            _, errors = second.communicate(timeout=120)
            assert second.returncode == 0, errors[-2000:]
        finally:
            reap(second)
    finally:
        reap(first)
    sent = logs["first"][0].read_text().splitlines()
    sent += logs["second"][0].read_text().splitlines() if logs["second"][0].exists() else []
    assert len(sent) == len(set(sent)) == 250  # each row once
    assert {status for status, _, _ in rows(store).values()} == {"sent"}
