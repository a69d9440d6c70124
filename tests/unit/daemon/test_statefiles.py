"""The daemon's own state files, corrupted every way a disk, a crash or a person can: each is
refused in one line, moved aside as ``<name>.corrupt-<UTC time>``, and never raises.

The daemon end to end (start, stay up, answer) is tests/integration/daemon/test_fault_injection.py,
for a representative few of the variants here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from faultwatch.runtime.daemon.outbox import FaultJournal, parse_journal
from faultwatch.runtime.daemon.snapshot import FILENAME, load_snapshot, save_snapshot
from faultwatch.runtime.daemon.statefiles import read_state_file, set_aside

SHA = "ab" * 32


def snapshot_arrays(devices: int = 3) -> dict[str, np.ndarray]:
    """What an engine's export_state gives, in kind: per-device rows and the device ids."""
    rng = np.random.default_rng(0)
    return {"state_0": rng.normal(size=(devices, 8)).astype(np.float32),
            "last_ts": np.arange(devices, dtype=np.float64), "has_prev": np.ones(devices, bool),
            "devices": np.array([f"pump-{i}" for i in range(devices)], dtype=str)}


def aside(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f"{name}.corrupt-"))


def corrupt_variants(good: bytes) -> dict[str, bytes]:
    """Truncated at every 10 %, one byte flipped at every 10 %, empty, and text in its place."""
    out = {f"truncated-{pct}%": good[:len(good) * pct // 100] for pct in range(0, 100, 10)}
    for pct in range(0, 100, 10):
        at = len(good) * pct // 100
        out[f"flipped-{pct}%"] = good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:]
    out["text"] = b"not a snapshot\n"
    return out


def test_a_sound_snapshot_round_trips(tmp_path):
    save_snapshot(tmp_path, snapshot_arrays(), SHA)
    loaded = load_snapshot(tmp_path, SHA)
    assert loaded is not None and list(loaded["devices"]) == ["pump-0", "pump-1", "pump-2"]


def test_every_corruption_of_a_snapshot_is_set_aside_or_loads_intact(tmp_path, caplog):
    save_snapshot(tmp_path / "good", snapshot_arrays(), SHA)
    good = (tmp_path / "good" / FILENAME).read_bytes()
    outcomes = {}
    for name, data in corrupt_variants(good).items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / FILENAME).write_bytes(data)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="faultwatch"):
            loaded = load_snapshot(folder, SHA)  # never raises
        if loaded is None:
            assert not (folder / FILENAME).exists(), name
            assert len(aside(folder, FILENAME)) == 1, name
            assert any("moved aside" in r.getMessage() and "\n" not in r.getMessage()
                       for r in caplog.records), name
            outcomes[name] = "aside"
        else:  # a flip in a field nothing reads (a zip timestamp): the arrays are the saved ones
            assert name.startswith("flipped"), name
            assert all(np.array_equal(loaded[k], v) for k, v in snapshot_arrays().items()), name
            outcomes[name] = "intact"
    assert all(outcomes[f"truncated-{pct}%"] == "aside" for pct in range(0, 100, 10))
    assert outcomes["text"] == "aside"
    assert list(outcomes.values()).count("aside") >= 15, outcomes


@pytest.mark.parametrize("arrays, why", [
    ({"_format": np.array([1, 1, 1])}, "no integer _format"),
    ({"_format": np.array("1")}, "no integer _format"),
    ({"_format": np.array(99)}, "format 99"),
    ({"_model_sha256": np.array(7)}, "no _model_sha256"),
    ({"devices": np.array([[1, 2]])}, "no devices array"),
    ({"devices": np.array(["a", "a", "b"])}, "appears twice"),
    ({"state_0": np.zeros((2, 8), np.float32)}, "not one row per device"),
    ({"last_ts": np.array(3.0)}, "not one row per device"),
    ({"last_ts": np.array(["x", "y", "z"])}, "not numbers"),
    ({"last_ts": np.array([0.0, np.nan, 1.0])}, "'last_ts' holds NaN or +inf"),
    ({"last_ts": np.array([0.0, np.inf, 1.0])}, "'last_ts' holds NaN or +inf"),
    ({"state_0": np.full((3, 8), np.nan, np.float32)}, "'state_0' holds NaN or infinite"),
])
def test_a_snapshot_with_wrong_arrays_is_set_aside_naming_the_fault(tmp_path, caplog, arrays, why):
    good = snapshot_arrays()
    written = {"_format": np.array(1), "_model_sha256": np.array(SHA)} | good | arrays
    with (tmp_path / FILENAME).open("wb") as f:
        np.savez(f, **written)
    with caplog.at_level(logging.ERROR, logger="faultwatch"):
        assert load_snapshot(tmp_path, SHA) is None
    assert len(aside(tmp_path, FILENAME)) == 1
    assert why in caplog.text


def test_a_folder_in_place_of_the_snapshot_is_moved_aside_and_the_next_snapshot_is_written(tmp_path):
    (tmp_path / FILENAME).mkdir()
    assert load_snapshot(tmp_path, SHA) is None
    assert len(aside(tmp_path, FILENAME)) == 1
    save_snapshot(tmp_path, snapshot_arrays(), SHA)  # the way is clear again
    assert load_snapshot(tmp_path, SHA) is not None


def test_a_snapshot_of_another_model_is_discarded_not_set_aside(tmp_path):
    save_snapshot(tmp_path, snapshot_arrays(), SHA)
    assert load_snapshot(tmp_path, "cd" * 32) is None
    assert (tmp_path / FILENAME).exists() and aside(tmp_path, FILENAME) == []


def test_set_aside_picks_a_free_name_within_one_second(tmp_path):
    names = []
    for _ in range(3):
        (tmp_path / "x").write_text("bad")
        names.append(set_aside(tmp_path / "x", "thing", "bad", now=lambda: 0.0).name)
    assert names == ["x.corrupt-19700101T000000Z", "x.corrupt-19700101T000000Z-1",
                     "x.corrupt-19700101T000000Z-2"]


def test_a_missing_state_file_is_no_news(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="faultwatch"):
        assert read_state_file(tmp_path / "none", bytes.decode, "thing") is None
    assert caplog.text == ""


# -- the fault journal ------------------------------------------------------------------------

EVENT = json.dumps({"topic": "faultwatch/p1/fault", "payload": '{"state": "raised"}'})


@pytest.mark.parametrize("line", [
    '{"topic": "#", "payload": "x"}', '{"topic": "", "payload": "x"}',
    '{"topic": "faultwatch/+/fault", "payload": "x"}', '{"topic": "a\\u0000b", "payload": "x"}',
    '{"topic": 7, "payload": "x"}', '{"topic": "a/b", "payload": 7}', '["a/b", "x"]',
    '{"topic": "a/b"}', '{"topic": "faultwatch/p1/fau', "\x00\xff garbage",
])
def test_a_journal_line_that_cannot_be_published_is_skipped_and_the_file_set_aside(tmp_path, line):
    path = tmp_path / "outbox.jsonl"
    path.write_text(f"{EVENT}\n{line}\n{EVENT}\n")
    journal = FaultJournal(path, max_entries=100)
    assert [t for _, t, _ in journal.unsent()] == ["faultwatch/p1/fault"] * 2  # the sound ones stay
    assert journal.counters["journal_bad_lines"] == 1
    assert len(aside(tmp_path, "outbox.jsonl")) == 1
    assert path.read_text().count("\n") == 2  # rewritten with the sound events only


@pytest.mark.parametrize("content", [b"", b"#\n", b"\xff" * 64, b'{"topic": "#", "payload": ""}\n'])
def test_a_journal_with_nothing_sound_is_set_aside_and_the_journal_starts_empty(tmp_path, content):
    path = tmp_path / "outbox.jsonl"
    path.write_bytes(content)
    journal = FaultJournal(path, max_entries=100)
    assert journal.unsent() == [] and not path.exists()
    assert len(aside(tmp_path, "outbox.jsonl")) == 1


def test_a_folder_in_place_of_the_journal_is_moved_aside_and_events_are_written_again(tmp_path):
    path = tmp_path / "outbox.jsonl"
    path.mkdir()
    journal = FaultJournal(path, max_entries=100)
    journal.add("faultwatch/p1/fault", b"{}")
    journal.sync()
    assert journal.counters["fault_journal_errors"] == 0 and path.is_file()
    assert len(aside(tmp_path, "outbox.jsonl")) == 1


def test_every_truncation_of_a_journal_keeps_the_whole_lines(tmp_path):
    good = "".join(json.dumps({"topic": f"faultwatch/p{i}/fault", "payload": "{}"}) + "\n" for i in range(10))
    for pct in range(10, 100, 10):
        data = good[:len(good) * pct // 100].encode()
        events, bad = parse_journal(data)
        whole = data.count(b"\n")
        assert len(events) == whole and bad == (0 if data.endswith(b"\n") else 1), pct


def test_a_snapshot_of_this_model_that_does_not_fit_the_engine_is_set_aside(int8_model, tmp_path, caplog):
    from collections import Counter

    from faultwatch.runtime.daemon.snapshot import StateSnapshots
    from faultwatch.runtime.engine.engine import Engine
    from faultwatch.runtime.engine.model import StepModel

    model = StepModel(int8_model)
    engine = Engine(model)
    arrays = snapshot_arrays() | {"state_0": np.zeros((3, 3), np.float32)}  # the model's layers are wider
    save_snapshot(tmp_path, arrays, model.sha256)  # the sha256 matches: the file itself is wrong
    with caplog.at_level(logging.ERROR, logger="faultwatch"):
        StateSnapshots(str(tmp_path), Counter()).restore(engine, model.sha256)
    assert engine.devices == [] and len(aside(tmp_path, FILENAME)) == 1
    assert "does not fit the model" in caplog.text
