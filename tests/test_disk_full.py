"""A full disk: the OSError (ENOSPC) of a write on an open file names no file; the one line the user reads must
name the file or folder being written, and nothing half-written is left or published."""

import errno
import io
import os
import re

import pytest

from vae_runtime.atomic import atomic_file, atomic_write_bytes, fsync_tree, naming


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the kernel reports it: no file name


class _FullDiskFile:
    """A file opened for writing on a full disk: opening works, every write fails."""

    def __init__(self, f):
        self._f = f

    write = _no_space

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """`full_disk(folder)`: from then on, files opened for writing under `folder` (by path or descriptor) fail
    every write with ENOSPC; opening them, and every other file, works as usual."""
    real_open = io.open

    def start(folder):
        folder = os.path.realpath(folder)

        def opener(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.path.realpath(file)
            writing = any(c in mode for c in "wax+")
            return _FullDiskFile(f) if writing and path.startswith(folder + os.sep) else f

        monkeypatch.setattr("builtins.open", opener)
        monkeypatch.setattr(io, "open", opener)  # os.fdopen opens through io.open

    return start


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds a descriptor's file in /proc")


def test_naming_fills_in_only_a_missing_file_name(tmp_path):
    with pytest.raises(OSError) as caught, naming(tmp_path / "a.bin"):
        _no_space()
    assert caught.value.filename == str(tmp_path / "a.bin") and caught.value.errno == errno.ENOSPC
    with pytest.raises(FileNotFoundError) as caught, naming(tmp_path / "a.bin"):
        open(tmp_path / "missing.txt")
    assert caught.value.filename == str(tmp_path / "missing.txt")  # the error's own file stays


@needs_proc
def test_an_atomic_write_on_a_full_disk_names_its_file_and_leaves_the_old_one(tmp_path, full_disk):
    target = tmp_path / "model.json"
    target.write_text("old")
    full_disk(tmp_path)
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(target, b"new")
    assert caught.value.filename == str(target) and caught.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.json"]


def test_streamed_atomic_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "lines.txt"
    with atomic_file(target, "w") as f:
        f.write("a\n")
        assert not target.exists()  # not visible while it is written
        f.write("b\n")
    assert target.read_text() == "a\nb\n"
    with pytest.raises(RuntimeError), atomic_file(target, "w") as f:
        f.write("c\n")
        raise RuntimeError("killed halfway")
    assert target.read_text() == "a\nb\n" and [p.name for p in tmp_path.iterdir()] == ["lines.txt"]


def test_fsync_of_a_folder_names_the_file_that_failed(tmp_path, monkeypatch):
    (tmp_path / "decoder.onnx").write_bytes(b"graph")
    monkeypatch.setattr(os, "fsync", _no_space)  # a delayed write fails at fsync (NFS, thin provisioning)
    with pytest.raises(OSError) as caught:
        fsync_tree(tmp_path)
    assert caught.value.filename == str(tmp_path / "decoder.onnx")


@needs_proc
def test_export_on_a_full_disk_names_the_graph_in_one_line(trained_run, tmp_path, full_disk, capsys):
    from vae.cli import main

    out = tmp_path / "models" / "face"
    out.parent.mkdir()
    full_disk(out.parent)
    assert main(["export", "--run", str(trained_run), "--out", str(out)]) == 1
    err = capsys.readouterr().err  # a note may come first (its metrics are evaluated before exporting)
    assert "Traceback" not in err and err.count("vae: failed") == 1, err
    assert re.fullmatch(rf"vae: failed: {re.escape(str(out.parent))}/\.face\.export-\w+/encoder\.onnx: "
                        r"No space left on device", err.strip().splitlines()[-1]), err
    assert not out.exists() and [p.name for p in out.parent.iterdir()] == [".face.export.lock"]  # nothing half-made
