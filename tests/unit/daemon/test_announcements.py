"""Home Assistant announcements without a broker: cap, rate, persistence, forget."""

from __future__ import annotations

from faultwatch.runtime.daemon.announcements import FILENAME, Announcements


def test_capped_rate_limited_and_in_order():
    a = Announcements(None, max_devices=100, per_s=10.0)
    for i in range(2000):
        a.want(f"d{i}")
    assert a.counters["discovery_capped"] == 1900
    first = a.due(now=0.0)
    assert first == [f"d{i}" for i in range(10)]  # one second's burst
    assert a.due(now=0.05) == []
    assert a.due(now=0.35) == ["d10", "d11", "d12"]
    assert len(a.due(now=1000.0)) == 10  # the bucket holds one second's worth, not more
    everything = [d for t in range(2000, 2100) for d in a.due(now=float(t))]
    assert len(a) == 100 and len(everything) == 100 - 23


def test_the_announced_set_survives_a_restart_and_forget_frees_a_place(tmp_path):
    a = Announcements(tmp_path, max_devices=3, per_s=100.0)
    for d in ("p1", "p2", "p3"):
        a.want(d)
    assert a.due(now=0.0) == ["p1", "p2", "p3"]
    a.save()
    b = Announcements(tmp_path, max_devices=3, per_s=100.0)
    for d in ("p1", "p2", "p3", "p4"):
        b.want(d)
    assert b.due(now=0.0) == [] and b.counters["discovery_capped"] == 1
    assert b.forget("p2") and not b.forget("p2")
    b.want("p4")
    assert b.due(now=1.0) == ["p4"]
    b.save()
    assert list(Announcements(tmp_path, 3, 1.0).announced) == ["p1", "p3", "p4"]


def test_an_unreadable_file_starts_empty(tmp_path):
    for text in ("", "{", "[1, 2]", '{"format": 1, "devices": [1]}', '{"format": 9, "devices": []}'):
        (tmp_path / FILENAME).write_text(text)
        assert len(Announcements(tmp_path, 10, 1.0)) == 0, text
    (tmp_path / FILENAME).unlink()
    (tmp_path / FILENAME).mkdir()
    assert len(Announcements(tmp_path, 10, 1.0)) == 0
