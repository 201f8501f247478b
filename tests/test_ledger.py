"""The ledger and its records: JSON lines in the form every store has used, typed in memory."""

import json

from seglab.pipeline.core.ledger import (
    ArrayRecord,
    Failure,
    Ledger,
    Receipt,
    StorageProblem,
    Task,
    entry_from_json,
    parse_entry,
)
from seglab.pipeline.core.store import Store


def done_line(unit: str, outputs: dict[str, ArrayRecord] | None = None) -> Receipt:
    """A receipt as a worker makes one for a finished unit."""
    return Receipt(
        unit=unit,
        outputs=outputs if outputs is not None else {"f": ArrayRecord("0" * 64, (3,), "<f8")},
        inputs="i",
        signature="s",
    )


def failed_line(unit: str) -> Failure:
    return Failure(unit, type="RuntimeError", message="boom")


# lines as stores written before the typed records hold them (seglab 0.1.0, issue 17's runs)
OLD_DONE = (
    '{"unit":"images__a.png","status":"done","outputs":{"image":{"sha256":"' + "a" * 64 + '","shape":[60,80,3],'
    '"dtype":"|u1"}},"info":{"source":"/data/images/a.png"},"seconds":0.0123,"inputs":"d1","signature":"s1",'
    '"time":1764633600.5}'
)
OLD_ADOPTED = (
    '{"unit":"u","status":"done","outputs":{},"info":{},"seconds":0.5,"inputs":"d","signature":"s",'
    '"adopted":true,"time":1.0}'
)
OLD_FAILED = (
    '{"unit":"images__b.png","status":"failed","error":{"type":"InputError","message":"/data/b.png: not an image",'
    '"transient":false,"detail":"Traceback ..."},"inputs":"d2","signature":"s1",'
    '"info":{"source":"/data/images/b.png"},"time":2.0}'
)
OLD_STORAGE = (
    '{"unit":"u","status":"failed","error":{"type":"OSError","message":"OSError: full","transient":false,'
    '"detail":"x","storage":{"path":"/store/a","problem":"the disk is full"}},"time":3.0}'
)
OLD_CORRUPT = (
    '{"unit":"u","status":"failed","error":{"type":"CorruptOutput","message":"damaged","transient":false},"time":4.0}'
)
OLD_CORRUPT_INPUT = (
    '{"unit":"u","status":"failed","error":{"type":"CorruptOutput","message":"damaged","transient":false,'
    '"detail":"x","corrupt":["embed/lab"]},"inputs":"d","signature":"s","info":{"source":"/x.png"},"time":5.0}'
)


def test_old_lines_read_as_records_and_write_back_unchanged():
    for line in (OLD_DONE, OLD_ADOPTED, OLD_FAILED, OLD_STORAGE, OLD_CORRUPT, OLD_CORRUPT_INPUT):
        record = parse_entry(line)
        assert record is not None and record.to_json() == json.loads(line), line
    done = parse_entry(OLD_DONE)
    assert isinstance(done, Receipt) and done.source == "/data/images/a.png" and done.seconds == 0.0123
    assert done.outputs["image"] == ArrayRecord("a" * 64, (60, 80, 3), "|u1")
    failed = parse_entry(OLD_FAILED)
    assert isinstance(failed, Failure) and failed.source == "/data/images/b.png" and not failed.transient
    storage = parse_entry(OLD_STORAGE)
    assert isinstance(storage, Failure) and storage.storage == StorageProblem("/store/a", "the disk is full")
    corrupt = parse_entry(OLD_CORRUPT_INPUT)
    assert isinstance(corrupt, Failure) and corrupt.corrupt == ("embed/lab",)


def test_a_receipt_is_made_as_a_task_only_with_both_its_digests():
    receipt = done_line("a")
    assert receipt.made_as(Task("i", "s", {"ingest/image": "x"}))
    assert not receipt.made_as(Task("i", "other")) and not receipt.made_as(Task("other", "s"))


def test_a_failure_ledgered_for_its_task_carries_the_digests_and_its_image():
    failure = failed_line("a").for_task(Task("d", "s"), "/data/a.png")
    assert failure.to_json()["inputs"] == "d" and failure.to_json()["info"] == {"source": "/data/a.png"}
    assert entry_from_json(failure.to_json()) == failure


def test_ledger_last_line_wins_and_torn_lines_are_ignored(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True)
    ledger = store.ledger("embed")
    ledger.append([failed_line("a"), done_line("b")])
    with open(ledger.path, "a") as f:
        f.write('{"unit": "c", "sta')  # the driver died mid-append
    ledger.append([done_line("a")])
    entries = ledger.load()
    assert {u: e.status for u, e in entries.items()} == {"a": "done", "b": "done"}
    assert all(json.loads(line) for line in ledger.path.read_text().splitlines()[:2])
    assert store.problems == {}  # a torn line closed by the next append is a kill, not damage


def test_appended_entries_are_stamped_with_the_time_unless_they_have_one(tmp_path):
    ledger = Ledger(tmp_path / "x.jsonl")
    ledger.append([done_line("a"), parse_entry(OLD_FAILED)])
    lines = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    assert lines[0]["time"] > 1e9 and lines[1]["time"] == 2.0
    assert ledger.load()["a"].time == lines[0]["time"]


def test_malformed_ledger_lines_count_as_absent_and_are_reported_with_their_line(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True)
    ledger = store.ledger("embed")
    ledger.append([done_line("a"), done_line("b"), failed_line("c")])
    with open(ledger.path, "ab") as f:
        f.write(b'{"unit": "d", "status": "done"\xff}\n')  # a non-UTF-8 byte
        f.write(json.dumps({**done_line("e").to_json(), "unit": ["e"]}).encode() + b"\n")
        f.write(json.dumps({**done_line("a").to_json(), "outputs": "x"}).encode() + b"\n")
        f.write(json.dumps({"unit": "b", "status": "failed"}).encode() + b"\n")
    entries = ledger.load()
    assert sorted(entries) == ["a", "b", "c"] and entries["a"].outputs == done_line("a").outputs
    problems = store.problems_of("embed")
    assert [p.split(": line ")[1].split(":")[0] for p in problems] == ["4", "5", "6", "7"]
    assert "not UTF-8" in problems[0] and "'unit' is not a non-empty string" in problems[1]
    assert "'outputs' is not a mapping" in problems[2] and "failed line without an 'error'" in problems[3]
    ledger.load()
    assert len(store.problems) == 4  # each reported once however often the ledger is read


def test_a_commit_record_of_another_unit_or_a_failure_is_no_commit(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True)
    store.commit_unit("select", done_line("a"))
    assert store.committed("select", "a") == done_line("a")
    folder = store.path / "_commits" / "select"
    (folder / "b.json").write_text(json.dumps(done_line("a").to_json()))  # names unit 'a'
    (folder / "c.json").write_text(json.dumps(failed_line("c").to_json()))
    assert store.committed("select", "b") is None and store.committed("select", "c") is None
