"""What a newcomer meets: the quick mode, where the caches go, the lock file of a finished run, and the one error line
of each mistake (a missing prompt file, resuming a missing or a finished run, a broken YAML file, another method's
config section), the implicit preference accuracy before the first update, and the progress bar's metric."""
import multiprocessing
import os

import pytest

from diffalign.store import FolderBusy, RunFolder

# ---- c. the lock file ------------------------------------------------------------------------------------------

def test_the_lock_file_is_removed_when_released_and_a_second_writer_still_refused(tmp_path):
    folder = RunFolder(str(tmp_path / "run"))
    with folder.lock():
        assert open(folder.file(".lock")).read() == str(os.getpid())
        with pytest.raises(FolderBusy, match=rf"is being written by process {os.getpid()} \(it holds \.lock\); "
                                             "accepted: one writer per run folder"):
            with folder.lock():
                pass
    assert os.listdir(folder.path) == [] and folder.locked_by() is None


def _hammer(path: str, rounds: int, clashes) -> None:
    """Take and release the folder's lock ``rounds`` times; inside, a file made with O_EXCL proves it is alone."""
    folder, done = RunFolder(path), 0
    while done < rounds:
        try:
            with folder.lock():
                try:
                    fd = os.open(os.path.join(path, "inside"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    clashes.value += 1
                    continue
                os.close(fd)
                os.unlink(os.path.join(path, "inside"))
                done += 1
        except FolderBusy:
            pass


def test_removing_the_lock_file_at_release_never_lets_two_writers_in(tmp_path):
    # two processes take and release the lock as fast as they can: a process that opened the old file just before
    # the holder removed it gets the lock of a file no longer there, and must not go on (RunFolder.lock's docstring)
    ctx = multiprocessing.get_context("fork")
    clashes = ctx.Value("i", 0)
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), 400, clashes)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0] and clashes.value == 0
    assert not os.path.exists(tmp_path / ".lock")
