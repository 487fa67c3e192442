"""The outbox changes made for the Split push: snapshots in parts, batches by offsets, acknowledgements by range."""

from __future__ import annotations

import pytest

import mixsync.warehouse.outbox as outbox
from mixsync.warehouse import Warehouse
from mixsync.warehouse.outbox import BatchOutcome, FatalPushError, enqueue, outbox_ddl, push


@pytest.mark.parametrize("part_rows", [7, 10**9])  # three snapshot parts, or one
def test_a_failed_push_marks_exactly_the_acknowledged_rows_and_a_rerun_sends_the_rest_once(tmp_path, monkeypatch,
                                                                                          part_rows):
    monkeypatch.setattr(outbox, "SNAPSHOT_PART_ROWS", part_rows)
    store = Warehouse(tmp_path / "w.duckdb")
    with store.write() as con:
        con.execute(outbox_ddl("sync.test_outbox"))
        enqueue(con, "sync.test_outbox", None,
                "SELECT 'id' || range AS id, 'day-' || (range % 3) AS scope, "
                "'{\"n\":' || range || ',\"pad\":\"' || repeat('é', (range % 37)::INT) || '\"}' AS payload FROM range(250)")
    sent: list[bytes] = []
    calls: list[int] = []

    def send(payloads: list[bytes]) -> BatchOutcome:
        calls.append(len(payloads))
        sent.extend(payloads)
        if len(calls) == 1:
            return BatchOutcome(rejected={0: "refused\nby the service", 3: "also refused"})
        if len(calls) == 9:
            raise FatalPushError("stop here")
        return BatchOutcome()

    with pytest.raises(FatalPushError):
        push(store, "sync.test_outbox", send, tmp_path / "work", max_items=10, max_bytes=400, concurrency=1)
    acknowledged = sum(calls[:8])
    with store.read() as con:
        done = {p.encode() for (p,) in con.execute("SELECT payload FROM sync.test_outbox WHERE status <> 'pending'").fetchall()}
        errors = sorted(e for (e,) in con.execute("SELECT error FROM sync.test_outbox WHERE status = 'rejected'").fetchall())
    assert done == set(sent[:acknowledged]) and errors == ["also refused", "refused by the service"]

    again = push(store, "sync.test_outbox", lambda p: (sent.extend(p), BatchOutcome())[1], tmp_path / "work",
                 max_items=10, scopes=["day-0", "day-1", "day-2"])
    assert again.sent == 250 - acknowledged
    assert sorted(set(sent)) == sorted(sent[:acknowledged] + sent[acknowledged + calls[8]:])  # each once, but batch 9
    assert len(sent) == 250 + calls[8]
    assert not list((tmp_path / "work" / "sync_test_outbox").iterdir())
