"""Shell-pipeline faults on real processes: full disks, closed pipes, signals at random
moments to single and parallel batches, two processes racing for one default name, and
batch errors that name their file. Every output is whole or absent; no temporary stays."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SAMPLE, image_folder
from PIL import Image

from pcodec import container
from pcodec.worker_processes import QuietStartContext

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_pcodec(*args, cwd, stdout=subprocess.PIPE, **options):
    return subprocess.run([sys.executable, "-m", "pcodec", *map(str, args)], cwd=cwd, env=ENV,
                          stdout=stdout, stderr=subprocess.PIPE, text=False, timeout=120,
                          **options)


def start_pcodec(*args, cwd, ignoring=None):
    # A process group of its own: it holds the parent and every worker. Signals as a
    # foreground job finds them, whatever this suite inherited (a background job ignores
    # SIGINT), but for the one it is to start `ignoring`.
    def signals():
        for signum in (signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN if signum == ignoring else signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "pcodec", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            process_group=0, preexec_fn=signals)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return group_members(pgid) > 0  # zombies of an ended group are not "left running"


def group_members(pgid: int) -> int:
    """Live (not zombie) processes of a process group."""
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            count += int(fields[2]) == pgid and fields[0] != "Z"
    return count


def stop(process, signum) -> bytes:
    """Send a signal as a terminal would (Ctrl-C to the whole foreground group, the others to
    the parent alone) and wait for the end: no worker may outlive its parent by a second.
    Returns what the process wrote to stderr."""
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)
    ended = time.monotonic()
    while group_alive(process.pid) and time.monotonic() < ended + 1.0:
        time.sleep(0.05)
    assert not group_alive(process.pid), "a worker outlived its parent by a second"
    return stderr


def whole_stream(path) -> bool:
    data = path.read_bytes()
    try:
        header, length = container.parse_header(data)
        container.split_sections(data, header, length)  # strict: every length and CRC
    except Exception:
        return False
    return True


@pytest.fixture
def images(tmp_path):
    return image_folder(tmp_path / "in", 6, 512, 768)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB file system (tmpfs, where this process may mount one), else None."""
    mount = tmp_path / "full"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        yield None
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_an_error_naming_the_input_never_a_success(tmp_path, small_disk):
    image = tmp_path / "k.png"
    shutil.copy(SAMPLE, image)  # a 24 KB stream, onto a disk with 4 KiB left
    targets = []
    if small_disk is not None:
        (small_disk / "filler").write_bytes(b"\0" * (60 * 1024))
        targets.append(small_disk / "k.pcb")
    for target in targets:
        with open(target, "wb") as sink:  # the shell's `> file`: a short write on stdout
            result = run_pcodec("encode", image, "-o", "-", cwd=tmp_path, stdout=sink)
        line = result.stderr.decode().strip()
        assert result.returncode == 1 and "k.png" in line and "disk full" in line, line
        assert " -> " not in line and len(line.splitlines()) == 1
        result = run_pcodec("encode", image, "-o", small_disk / "named.pcb", cwd=tmp_path)
        assert result.returncode == 1 and b"disk full" in result.stderr
        assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "k.pcb"]  # no temporary
    with open("/dev/full", "wb") as sink:
        result = run_pcodec("encode", image, "-o", "-", cwd=tmp_path, stdout=sink)
    line = result.stderr.decode().strip()
    assert result.returncode == 1 and "k.png" in line and "disk full" in line, line


def test_a_pipe_closed_early_is_an_error_naming_the_input(tmp_path):
    shutil.copy(SAMPLE, tmp_path / "k.png")
    assert run_pcodec("encode", "k.png", "-o", "k.pcb", cwd=tmp_path).returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    with os.fdopen(write_end, "wb") as sink:
        result = run_pcodec("decode", "k.pcb", "-o", "-", cwd=tmp_path, stdout=sink)
    line = result.stderr.decode().strip()
    assert result.returncode == 1 and "k.pcb" in line and "broken pipe" in line, line


@pytest.mark.parametrize("jobs,signum", [(1, signal.SIGTERM), (1, signal.SIGINT),
                                         (2, signal.SIGTERM), (2, signal.SIGHUP),
                                         (2, signal.SIGINT)])
def test_a_signal_at_a_random_moment_leaves_whole_outputs_or_none(tmp_path, images, jobs,
                                                                  signum):
    out = tmp_path / "out"
    rng = random.Random(f"{jobs} {signum}")
    process = start_pcodec("encode", *sorted(images.iterdir()), "-o", out, "-j", jobs,
                           cwd=tmp_path)
    time.sleep(rng.uniform(2.0, 8.0))  # start-up takes ~2 s, then ~1 s per image and job
    stderr = stop(process, signum)
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if len(left) < 6:  # else it had finished (and may have been exiting) when the signal came
        assert process.returncode == 128 + signum, stderr
    assert b"Traceback" not in stderr and b"leaked" not in stderr, stderr
    assert not [name for name in left if name.endswith(".tmp")], left
    assert all(whole_stream(out / name) for name in left), left


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_pcodec_exits_prints_no_traceback(tmp_path, signum):
    """A signal as the work ends, during the interpreter's shutdown (torch's finalizers take a
    moment: SIGINT sent as an encode's output appeared landed there 3 times in 15), must not
    print a traceback: here it comes from an exit handler, after run() has returned."""
    script = ("import atexit, os, sys\n"
              f"atexit.register(lambda: os.kill(os.getpid(), {int(signum)}))\n"
              "from pcodec import cli\n"
              "sys.argv = ['pcodec', '--version']\n"
              "cli.run()\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=ENV,
                            capture_output=True, timeout=60)
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith(b"pcodec")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_a_batch_started_ignoring_a_signal_ignores_it_in_every_worker(tmp_path, images, signum):
    """A shell's background job starts with SIGINT ignored, a nohup one with SIGHUP: that
    signal to the whole group must then leave the parent and its workers alike running to the
    end (not kill the workers alone, or the parent)."""
    out = tmp_path / "out"
    process = start_pcodec("encode", *sorted(images.iterdir()), "-o", out, "-j", 2,
                           cwd=tmp_path, ignoring=signum)
    time.sleep(3.0)  # the workers have started and are coding
    os.killpg(process.pid, signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == len(list(images.iterdir())) and all(whole_stream(out / n) for n in left)


def test_a_worker_starts_ignoring_ctrl_c_and_its_parent_does_not_miss_one_after():
    """Workers begin with SIGINT ignored (no traceback from a Ctrl-C during their imports),
    and the parent ignores it only while it launches one: its own handler is back at once."""
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        # The worker raises SIGINT at itself: ignored, it exits 0; handled, 1 with a traceback.
        worker = QuietStartContext().Process(target=signal.raise_signal, args=(signal.SIGINT,))
        worker.start()
        signal.raise_signal(signal.SIGINT)  # the parent, right after the launch
        worker.join(60)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert worker.exitcode == 0 and seen == [signal.SIGINT]


@pytest.mark.parametrize("signum, delay", [(signal.SIGINT, 0.0), (signal.SIGINT, 2.0),
                                           (signal.SIGTERM, 0.5)])
def test_a_signal_while_training_rows_are_decoded_stops_every_worker_quietly(tmp_path, signum,
                                                                             delay):
    """`pcodec train --post-filter` decodes its training rows in worker processes: Ctrl-C to
    the group, or SIGTERM to the trainer alone, as the workers start (their imports) or
    decode, ends them all at once with one line, no traceback and no rows file."""
    photos = image_folder(tmp_path / "photos", 2, 256, 256)
    run = tmp_path / "run"
    weights = ROOT / "tests" / "data" / "tiny-test.pt"
    process = start_pcodec("train", "--post-filter", weights, "--data", photos, "--run-dir", run,
                           "--steps", 1, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while group_members(process.pid) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)  # the trainer and its two workers
    assert group_members(process.pid) >= 3, process.stderr.read()
    time.sleep(delay)
    stderr = stop(process, signum)
    assert process.returncode == 128 + signum, stderr
    said = f"pcodec: interrupted ({signal.Signals(signum).name})".encode()
    assert b"Traceback" not in stderr and stderr.strip().endswith(said), stderr
    assert not list(run.glob("post-rows*")), list(run.iterdir())


def test_two_decodes_racing_for_one_default_name_never_clobber(tmp_path):
    shutil.copy(SAMPLE, tmp_path / "x.png")
    assert run_pcodec("encode", "x.png", "-o", "x.pcb", cwd=tmp_path).returncode == 0
    racers = [subprocess.Popen([sys.executable, "-m", "pcodec", "decode", "x.pcb", "--layers",
                                "2"], cwd=tmp_path, env=ENV, stderr=subprocess.PIPE)
              for _ in range(2)]
    codes = sorted(r.wait(timeout=120) for r in racers)
    errors = b"".join(r.stderr.read() for r in racers).decode()
    assert codes == [0, 1], errors
    assert "x.l2.png: exists" in errors
    assert Image.open(tmp_path / "x.l2.png").size == Image.open(tmp_path / "x.png").size
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_every_error_line_of_a_batch_names_its_file(tmp_path):
    shutil.copy(SAMPLE, tmp_path / "good.png")
    assert run_pcodec("encode", "good.png", "-o", "good.pcb", cwd=tmp_path).returncode == 0
    data = (tmp_path / "good.pcb").read_bytes()
    (tmp_path / "rand.pcb").write_bytes(random.Random(1).randbytes(500))
    (tmp_path / "cut.pcb").write_bytes(data[: len(data) // 2])
    result = run_pcodec("decode", "good.pcb", "rand.pcb", "cut.pcb", "missing.pcb", "-o",
                        "new/folder", "-j", "2", cwd=tmp_path)
    lines = result.stderr.decode().strip().splitlines()
    errors = [line for line in lines if line.startswith("pcodec: error:")]
    assert result.returncode == 3 and len(errors) == 3, lines
    for name in ("rand.pcb", "cut.pcb", "missing.pcb"):
        assert sum(name in line for line in errors) == 1, (name, errors)
    assert sorted(p.name for p in (tmp_path / "new" / "folder").iterdir()) == ["good.decoded.png"]
