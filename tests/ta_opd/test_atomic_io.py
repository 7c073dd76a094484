"""ta_opd.atomic_io: a file or directory appears complete or not at all; no temp is left behind."""

from __future__ import annotations

import pytest

from ta_opd.atomic_io import atomic_dir, atomic_open, atomic_write_bytes, atomic_write_text


def test_write_text_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b.txt"
    assert atomic_write_text(path, "héllo\n") == path
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert list(path.parent.iterdir()) == [path]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_open(path) as fh:
        fh.write(b"partial")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


def test_dir_replaces_an_existing_dir(tmp_path):
    out = tmp_path / "ckpt"
    (out / "stale").mkdir(parents=True)
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.tmp")
        (tmp / "weights").write_text("w")
    assert sorted(p.name for p in out.iterdir()) == ["weights"]
    assert list(tmp_path.iterdir()) == [out]


def test_failed_dir_keeps_the_old_dir_and_no_temp(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old").write_text("o")
    with pytest.raises(OSError), atomic_dir(out) as tmp:
        (tmp / "half").write_text("h")
        raise OSError("disk full")
    assert [p.name for p in out.iterdir()] == ["old"]
    assert list(tmp_path.iterdir()) == [out]
