import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

import atomic_io


def test_write_json_round_trip(tmp_path):
    path = tmp_path / "sub" / "log.json"

    atomic_io.write_json(path, [{"scan_name": "a", "score": 0.5}])

    assert atomic_io.read_json(path) == [{"scan_name": "a", "score": 0.5}]


def test_nan_rejected_old_file_kept(tmp_path):
    path = tmp_path / "log.json"
    atomic_io.write_json(path, {"value": 1})

    with pytest.raises(ValueError):
        atomic_io.write_json(path, {"value": float("nan")})

    assert json.loads(path.read_text()) == {"value": 1}
    assert os.listdir(tmp_path) == ["log.json"]


def test_failed_write_leaves_no_temporary(tmp_path):
    path = tmp_path / "table.csv"

    with pytest.raises(RuntimeError):
        with atomic_io.atomic_path(path) as temp_path:
            with open(temp_path, "w") as handle:
                handle.write("partial")
            raise RuntimeError("interrupted")

    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_temporary_keeps_extension(tmp_path):
    with atomic_io.atomic_path(tmp_path / "plot.png") as temp_path:
        assert temp_path.endswith(".png")
        assert os.path.dirname(temp_path) == str(tmp_path)
        with open(temp_path, "wb") as handle:
            handle.write(b"x")


def test_write_csv(tmp_path):
    path = tmp_path / "table.csv"

    atomic_io.write_csv(path, pd.DataFrame({"id": [0, 1], "area_px": [4, 9]}))

    assert path.read_text().splitlines() == ["id,area_px", "0,4", "1,9"]


def test_write_png(tmp_path):
    import cv2

    image = np.zeros((3, 4), np.uint8)
    image[1, 2] = 200
    atomic_io.write_png(tmp_path / "a.png", image)

    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_UNCHANGED), image)


def test_corrupt_json_names_file(tmp_path):
    path = tmp_path / "log.json"
    path.write_text("[{")

    with pytest.raises(ValueError, match="log.json"):
        atomic_io.read_json(path)


def test_json_folder_names_path(tmp_path):
    folder = tmp_path / "log.json"
    folder.mkdir()

    with pytest.raises(ValueError, match="log.json is a folder"):
        atomic_io.read_json(folder)


def test_json_not_utf8_names_file(tmp_path):
    path = tmp_path / "log.json"
    path.write_bytes(b"\xff\xfe[]")

    with pytest.raises(ValueError, match="log.json is not valid JSON"):
        atomic_io.read_json(path)


def test_destination_folder_rejected(tmp_path):
    destination = tmp_path / "out.json"
    destination.mkdir()

    with pytest.raises(atomic_io.OutputError, match="out.json exists as a folder"):
        atomic_io.write_json(destination, [1])
    assert destination.is_dir()
    assert [path.name for path in tmp_path.iterdir()] == ["out.json"]


def test_missing_json_gives_default(tmp_path):
    assert atomic_io.read_json(tmp_path / "none.json", default=[]) == []


def test_folder_that_is_a_file(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")

    with pytest.raises(atomic_io.OutputError, match="blocker"):
        atomic_io.ensure_dir(blocker)


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses folder permissions")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(atomic_io.OutputError, match="not writable"):
            atomic_io.ensure_dir(folder)
    finally:
        folder.chmod(0o700)


def test_lock_excludes_second_holder(tmp_path):
    order = []

    def hold():
        with atomic_io.folder_lock(tmp_path):
            order.append("first in")
            time.sleep(0.5)
            order.append("first out")

    thread = threading.Thread(target=hold)
    thread.start()
    time.sleep(0.1)
    with atomic_io.folder_lock(tmp_path, poll_s=0.05):
        order.append("second in")
    thread.join()

    assert order == ["first in", "first out", "second in"]


def test_lock_timeout_message(tmp_path):
    with atomic_io.folder_lock(tmp_path):
        with pytest.raises(atomic_io.LockTimeout, match="locked by another run"):
            with atomic_io.folder_lock(tmp_path, timeout_s=0.2, poll_s=0.05):
                pass


def test_lock_of_killed_process_released(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, atomic_io\n"
            f"with atomic_io.folder_lock({str(tmp_path)!r}):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(60)\n",
        ],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(atomic_io.LockTimeout, match=str(holder.pid)):
        with atomic_io.folder_lock(tmp_path, timeout_s=0.2, poll_s=0.05):
            pass

    holder.kill()
    holder.wait()

    with atomic_io.folder_lock(tmp_path, timeout_s=1.0):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_new_file_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_io.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)

    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_write_json_list_one_item_per_line(tmp_path):
    path = tmp_path / "log.json"

    atomic_io.write_json_list(path, [{"a": 1}, {"b": [2, 3]}])

    assert path.read_text() == '[\n{"a": 1},\n{"b": [2, 3]}\n]\n'
    assert atomic_io.read_json(path) == [{"a": 1}, {"b": [2, 3]}]


def test_write_json_list_empty(tmp_path):
    atomic_io.write_json_list(tmp_path / "log.json", [])

    assert atomic_io.read_json(tmp_path / "log.json") == []


def test_write_json_list_rejects_nan(tmp_path):
    with pytest.raises(ValueError):
        atomic_io.write_json_list(tmp_path / "log.json", [{"score": float("nan")}])


def test_remove_temporaries_only_temporary(tmp_path):
    # The names atomic_path gives its temporary files, beside real outputs.
    (tmp_path / ".plot.abc123.tmp.png").write_bytes(b"partial")
    (tmp_path / ".impurities.x9.tmp.csv").write_text("id\n0")
    (tmp_path / "plot.png").write_bytes(b"complete")
    (tmp_path / ".hidden").write_text("")

    removed = atomic_io.remove_temporaries(tmp_path)

    assert removed == 2
    assert sorted(os.listdir(tmp_path)) == [".hidden", "plot.png"]


def test_remove_temporaries_missing_folder(tmp_path):
    assert atomic_io.remove_temporaries(tmp_path / "absent") == 0
