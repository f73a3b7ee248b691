"""The decoded-once disk cache (memory-mapped, built atomically, one builder at a time) and
--in-memory: streamed batches identical to in-memory ones, in one process and under DDP."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import cnnlab
from cnnlab.config import DataConfig
from cnnlab.data import load_data
from cnnlab.data.augment import Strong
from cnnlab.data.cache import disk_array, entries, new_pixels, read_entry
from cnnlab.data.folder import compact
from cnnlab.data.loader import BatchLoader
from cnnlab.data.preprocess import Preprocess
from cnnlab.data.stream import StreamLoader
from cnnlab.errors import CnnlabError, UsageError

from .conftest import FAULT_REPORT, ROOT, run_cli
from .test_csv import make_photos


def mapped_pool(root, n=40, shape=(3, 12, 12)):
    """A random uint8 pool stored as a disk-cache entry -> its memory-mapped tensor."""
    pixels = np.random.default_rng(1).integers(0, 256, (n, *shape), dtype=np.uint8)

    def fill(folder):
        out = new_pixels(folder, pixels.shape)
        out[:] = pixels
        out.flush()
        return {"shape": list(pixels.shape)}
    return torch.from_numpy(disk_array("test", "pool", fill, str(root)).array())


STRONG = Strong(policy="randaugment", mixup=0.4, cutmix=1.0, erase=0.5, jitter=0.3, num_classes=3)


@pytest.mark.parametrize("augment,strong,padding_mode", [("none", None, "zeros"), ("crop+flip", None, "zeros"),
                                                        ("crop+flip", STRONG, "zeros"), ("crop+altflip", None, "reflect")])
@pytest.mark.parametrize("world", [1, 2])
def test_streamed_batches_equal_in_memory_ones(tmp_path, augment, strong, padding_mode, world):
    x = mapped_pool(tmp_path)
    y = torch.arange(len(x)) % 3
    pre = Preprocess(channels=3, image_size=12, mean=[0.5] * 3, std=[0.25] * 3)
    for rank in range(world):
        options = dict(shuffle=True, seed=5, augment=augment, rank=rank, world=world, strong=strong,
                       padding_mode=padding_mode)
        memory = BatchLoader(x.clone(), y, 8, pre, **options)
        stream = StreamLoader(x, y, 8, pre, **options)
        for epoch, start in ((0, 0), (1, 2)):          # a whole epoch, and one resumed at its third step
            pairs = list(zip(memory.batches(epoch, start), stream.batches(epoch, start)))
            assert len(pairs) == len(memory) - start
            for (xm, ym), (xs, ys) in pairs:
                assert torch.equal(xm, xs) and torch.equal(ym, ys)


def mapped_kib():
    """This process's resident memory in mapped file pages (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc/self/status")
def test_reading_a_streamed_split_keeps_resident_memory_flat(tmp_path, monkeypatch):
    import cnnlab.data.cache as cache

    monkeypatch.setattr(cache, "DROP_EVERY", 2**20)                  # drop every MiB read (256 MiB in use)
    x = mapped_pool(tmp_path, n=2000, shape=(3, 64, 64))             # 23 MiB memory-mapped
    loader = StreamLoader(x, torch.zeros(len(x), dtype=torch.int64), 100, Preprocess(3, 64, [0.5] * 3, [0.25] * 3),
                          shuffle=True, augment="crop+flip")
    before = mapped_kib()
    grew = max(mapped_kib() - before for _ in loader.batches(0))
    assert grew < 8 * 1024, f"mapped pages grew by {grew} KiB while reading a 23 MiB split"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc/self/status")
def test_the_statistics_of_a_streamed_split_keep_resident_memory_flat(tmp_path, monkeypatch):
    """The training split's mean and std are read from the disk cache; its pages must go as they
    are read (a 5.7 GB split stayed resident in a 40,000-photo run), with exact sums all the same."""
    import cnnlab.data.cache as cache
    from cnnlab.data import channel_stats

    monkeypatch.setattr(cache, "DROP_EVERY", 2**20)
    x = mapped_pool(tmp_path, n=2000, shape=(3, 64, 64))             # 23 MiB memory-mapped
    in_memory = channel_stats(x.clone())
    cache.drop_pages(x)
    before = mapped_kib()
    assert channel_stats(x, mapped=True) == in_memory
    grew = mapped_kib() - before
    assert grew < 8 * 1024, f"mapped pages grew by {grew} KiB while reading a 23 MiB split"


def test_pages_written_through_the_map_survive_being_dropped_unflushed(tmp_path):
    """PageDropper lets written pages go without an msync (that wait for the disk cost 9% of a
    first decode): the cache's writable maps are shared, so the page cache keeps what was written."""
    from cnnlab.data.cache import PageDropper

    pixels = np.random.default_rng(2).integers(0, 256, (300, 3, 32, 32), dtype=np.uint8)
    out = new_pixels(str(tmp_path), pixels.shape)
    dropper = PageDropper(out)
    for start in range(0, len(pixels), 7):
        out[start:start + 7] = pixels[start:start + 7]
        dropper.drop()
    assert np.array_equal(np.fromfile(tmp_path / "pixels.u8", np.uint8).reshape(pixels.shape), pixels)
    assert np.array_equal(np.asarray(out), pixels)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=600))
def test_compaction_keeps_the_good_rows_in_order(ok):
    ok = np.array(ok)
    x = np.arange(len(ok), dtype=np.int64)[:, None] * np.ones((1, 3), np.int64)   # row i holds i
    assert np.array_equal(compact(x.copy(), ok), x[ok])


def folder_run(tmp_path, **settings):
    settings = {"epochs": 2, "augment": "crop+flip", **settings}
    return cnnlab.train(data=str(tmp_path / "photos"), model="lenet5", image_size=16, batch_size=8,
                        out=str(tmp_path / settings.pop("name")), report=False, quiet=True, **settings)


@pytest.fixture
def photos(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    make_photos(tmp_path / "photos", n=16)
    return tmp_path


def test_in_memory_yes_and_no_train_identically(photos):
    memory = folder_run(photos, name="memory", in_memory="yes", mixup=0.2)
    streamed = folder_run(photos, name="streamed", in_memory="no", mixup=0.2)
    assert len(memory.history) == len(streamed.history) == 2
    for a, b in zip(memory.history, streamed.history):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert memory.summary["test_acc"] == streamed.summary["test_acc"]
    assert memory.summary["test_loss"] == streamed.summary["test_loss"]
    assert len(os.listdir(photos / "cache" / "splits")) == 3       # train, val, test: each gathered once
    assert cnnlab.evaluate(streamed.run_dir)["accuracy"] == pytest.approx(streamed.summary["test_acc"])
    first = folder_run(photos, name="resumed", in_memory="no", mixup=0.2, epochs=1)   # then resumed: exact
    resumed = cnnlab.train(resume=first.run_dir, epochs=2, report=False, quiet=True)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in streamed.history]


def test_evaluate_and_calibrate_read_a_streamed_split_batch_by_batch(photos, monkeypatch):
    """A split beyond memory must not be gathered whole (onto the GPU, on CUDA) to be scored:
    evaluate and --calibrate go through the StreamLoader, with the in-memory numbers."""
    memory = folder_run(photos, name="cal-memory", in_memory="yes", epochs=1, calibrate=True)
    streamed_batches = []
    original = StreamLoader.batches
    monkeypatch.setattr(StreamLoader, "batches", lambda self, *a, **k: streamed_batches.append(1) or original(self, *a, **k))
    streamed = folder_run(photos, name="cal-streamed", in_memory="no", epochs=1, calibrate=True)
    trained_batches = len(streamed_batches)
    assert streamed.summary["temperature"] == memory.summary["temperature"]
    assert streamed.summary["test_loss"] == memory.summary["test_loss"]
    metrics = cnnlab.evaluate(streamed.run_dir)
    assert len(streamed_batches) > trained_batches                  # the test split was streamed too
    assert metrics["accuracy"] == cnnlab.evaluate(memory.run_dir)["accuracy"]


def test_auto_streams_only_over_the_budget(photos, monkeypatch):
    import cnnlab.data.stream as stream

    cfg = DataConfig(data=f"folder:{photos / 'photos'}", image_size=16)
    assert not load_data(cfg).streamed
    monkeypatch.setattr(stream, "memory_budget", lambda: 1000)       # 32 images of 768 bytes do not fit
    data = load_data(cfg)
    assert data.streamed and "streamed from disk" in data.residence() and "budget 0.0 GiB" in data.residence()


def test_classes_of_cached_data_stay_on_disk_and_match_memory(photos):
    cfg = lambda mode: DataConfig(data=f"folder:{photos / 'photos'}", image_size=16, classes=["dog", "cat"],
                                  in_memory=mode)
    streamed, memory = load_data(cfg("no")), load_data(cfg("yes"))
    assert streamed.streamed and not memory.streamed and streamed.classes == ["dog", "cat"]
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(streamed, split)[0], getattr(memory, split)[0])
        assert torch.equal(getattr(streamed, split)[1], getattr(memory, split)[1])


def test_in_memory_yes_that_cannot_fit_is_one_line_before_loading(photos, monkeypatch):
    import cnnlab.data.stream as stream
    import cnnlab.data as data_module

    monkeypatch.setattr(stream, "memory_budget", lambda: 1000)
    monkeypatch.setattr(data_module, "fit", lambda *a: pytest.fail("a split was loaded"))
    with pytest.raises(UsageError, match=r"^--in-memory yes: the splits of folder:.* take 0\.00 GiB, over the 0\.00 GiB "
                                         r"budget \(half the memory available\); use --in-memory auto or no"):
        load_data(DataConfig(data=f"folder:{photos / 'photos'}", image_size=16, in_memory="yes"))
    FAULT_REPORT.append("--in-memory yes over a 1000-byte budget -> one-line usage error before any split was loaded")


BUILDER = """
import os, sys, time
sys.path.insert(0, {root!r})
from cnnlab.data.cache import disk_array, new_pixels
root, mark, hang = sys.argv[1], sys.argv[2], sys.argv[3] == "hang"

def fill(folder):
    with open(mark, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    out = new_pixels(folder, (4, 8))
    out[:2] = 7                                  # half written ...
    out.flush()
    while hang or not os.path.exists(mark + ".go"):
        time.sleep(0.01)                          # ... until killed, or until the test says go
    out[2:] = 7
    return {{"shape": [4, 8]}}

print(int(disk_array("test", "key", fill, root).array().sum()), flush=True)
"""


def start_builder(tmp_path, mode):
    script = tmp_path / "builder.py"
    script.write_text(BUILDER.format(root=ROOT))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(tmp_path / "filled"), mode],
                            stdout=subprocess.PIPE, text=True)


def wait_for(condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_killed_build_leaves_nothing_that_looks_complete(tmp_path):
    proc = start_builder(tmp_path, "hang")
    wait_for(lambda: (tmp_path / "filled").exists())                 # it is inside fill, half written
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    final = tmp_path / "cache" / "test" / "key"
    assert read_entry(str(final)) is None and entries(str(tmp_path / "cache"))[0] == []
    assert any(name.startswith(".key.partial-") for name in os.listdir(tmp_path / "cache" / "test"))
    (tmp_path / "filled.go").touch()
    again = start_builder(tmp_path, "go")                             # the next build cleans up and completes
    assert again.communicate(timeout=120)[0].strip() == str(4 * 8 * 7)
    assert os.listdir(tmp_path / "cache" / "test") == ["key"]
    FAULT_REPORT.append("disk cache: SIGKILL of a build half-way -> no complete entry; the next build completed it")


def test_two_processes_build_once_and_read_the_same(tmp_path):
    first = start_builder(tmp_path, "go")
    wait_for(lambda: (tmp_path / "filled").exists())                 # the first holds the lock, inside fill
    second = start_builder(tmp_path, "go")                           # finds no entry, waits on the lock
    (tmp_path / "filled.go").touch()
    outputs = [p.communicate(timeout=120)[0].strip() for p in (first, second)]
    assert outputs == [str(4 * 8 * 7)] * 2
    assert len((tmp_path / "filled").read_text().split()) == 1       # fill ran once
    FAULT_REPORT.append("disk cache: two processes building one entry at once -> one build, both read it")


def test_cache_list_and_clear(photos):
    load_data(DataConfig(data=f"folder:{photos / 'photos'}", image_size=16, in_memory="no"))
    env = {"PYTHONPATH": ROOT}
    listed = run_cli("cache", "list", "--cache-dir", photos / "cache", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "4 entries" in listed.stdout and "32 x 3x16x16" in listed.stdout and "total " in listed.stdout
    cleared = run_cli("cache", "clear", "--cache-dir", photos / "cache", env=env)
    assert cleared.returncode == 0 and cleared.stdout.startswith("freed ")
    assert entries(str(photos / "cache"))[0] == []


def test_a_torchvision_set_is_cached_in_cache_dir_and_listed(tmp_path, shared_datasets):
    """MNIST's decoded arrays went to $CNNLAB_CACHE whatever --cache-dir said, and `cache list`
    counted them only as "small entries, locks and unfinished builds"."""
    from cnnlab.data.cache import small_entries

    cfg = DataConfig(data="mnist", data_dir=shared_datasets, cache_dir=str(tmp_path / "mine"))
    first = load_data(cfg)
    (n, size), = small_entries(str(tmp_path / "mine")).values()
    assert n == 1 and size > 50 * 2**20                               # 70,000 digits of 784 bytes
    assert torch.equal(load_data(cfg).train[0], first.train[0])       # read back from there
    listed = run_cli("cache", "list", "--cache-dir", tmp_path / "mine")
    assert listed.returncode == 0 and "1 decoded datasets" in listed.stdout and "unfinished" not in listed.stdout


def test_ddp_streamed_from_the_disk_cache_matches_one_process_in_memory(photos):
    # 16 training images in batches of 8: every step splits evenly over the 2 ranks (a shorter last
    # batch, 7 images as 4 + 3, averages the ranks' unequal shards: 1.7e-4 off, in memory as well)
    args = ["--data", photos / "photos", "--model", "lenet5", "--image-size", 16, "--epochs", 2, "--batch-size", 8,
            "--augment", "crop+flip", "--report", "false", "--device", "cpu", "--train-samples", 16]
    env = {"PYTHONPATH": ROOT, "CNNLAB_CACHE": str(photos / "cache")}
    ddp = run_cli("train", "--nproc", 2, "--in-memory", "no", "--out", photos / "ddp", *args, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "streamed from disk" in ddp.stdout
    single = folder_run(photos, name="single", in_memory="yes", train_samples=16)
    rows = list(csv.DictReader(open(photos / "ddp" / "metrics.csv")))
    assert len(rows) == len(single.history) == 2
    for row, one in zip(rows, single.history):
        assert abs(float(row["train_loss"]) - one["train_loss"]) < 1e-4
    assert len(os.listdir(photos / "cache" / "folders")) == 1       # decoded once for both ranks
    assert json.load(open(photos / "ddp" / "summary.json"))["world_size"] == 2


def test_a_full_disk_is_one_line_naming_the_cache(photos, monkeypatch):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(CnnlabError) as e:
        load_data(DataConfig(data=f"folder:{photos / 'photos'}", image_size=16))
    assert str(e.value).startswith(f"cannot write the decoded-images cache in {photos / 'cache'}: No space left on "
                                   "device. Free some space or point --cache-dir")
    assert entries(str(photos / "cache"))[0] == [] and not os.listdir(photos / "cache" / "folders")   # no partial left
    FAULT_REPORT.append("disk cache: no space for the pixels (ENOSPC at reservation) -> one line naming the cache "
                        "folder and --cache-dir; no partial entry left")


def test_a_cache_dir_that_is_a_file_is_one_line(photos):
    (photos / "not_a_folder").write_text("")
    with pytest.raises(CnnlabError, match=r"^cannot write the decoded-images cache in .*not_a_folder: Not a directory"):
        load_data(DataConfig(data=f"folder:{photos / 'photos'}", image_size=16, cache_dir=str(photos / "not_a_folder")))
    FAULT_REPORT.append("--cache-dir naming a file -> one line naming it")


def test_decoding_workers_share_one_memory_budget(tmp_path):
    from cnnlab.data import images
    from cnnlab.data.folder import decoding_pool

    workers = min(os.cpu_count() or 1, 2)                  # one CPU: decoded in this process, the whole budget
    with decoding_pool(2) as pool:
        budgets = set(pool.map(worker_budget, range(8)))
    assert budgets == {images.DECODING.total // workers}   # two workers: half of the process's budget each


def test_workers_write_their_rows_into_the_cache_as_one_process_would(tmp_path, monkeypatch):
    """Decoding workers write pixels straight into the shared memory map (no copy back through a
    pipe): every row must be the file's own decode, bad files left out in order, in both modes."""
    import cnnlab.data.folder as folder
    from cnnlab.data.images import load_array

    made = make_photos(tmp_path / "photos", n=10)
    files = [str(tmp_path / "photos" / f) for fs in made.values() for f in fs]
    for bad in (3, 14):
        (tmp_path / "photos" / os.path.relpath(files[bad], tmp_path / "photos")).write_bytes(b"not an image")
    monkeypatch.setattr(folder, "DECODE_CHUNK", 4)            # 5 chunks: the forked pool on 2 CPUs
    x, y, kept, bad, _ = folder.decode_files(files, list(range(len(files))), 3, 12,
                                             DataConfig(cache_dir=str(tmp_path / "cache"), on_bad_image="skip"))
    good = [f for i, f in enumerate(files) if i not in (3, 14)]
    assert kept == good and len(bad) == 2 and y.tolist() == [i for i in range(len(files)) if i not in (3, 14)]
    assert torch.equal(x, torch.from_numpy(np.stack([load_array(f, 3, 12) for f in good])))


def worker_budget(_):
    from cnnlab.data import images

    return images.DECODING.total


@pytest.mark.parametrize("augment", ["crop+flip", "flip", "crop+altflip"])
def test_streamed_photos_are_cut_as_in_memory_ones(photos, augment):
    """--resize crop stores photos larger than the input: streamed, the training batches get the same
    random-resized crops and the held-out splits the same centre crops as in memory."""
    runs = [folder_run(photos, name=f"{mode}-{augment}", in_memory=mode, resize="crop", augment=augment, epochs=1)
            for mode in ("yes", "no")]
    assert runs[1].summary["train_seconds"] >= 0 and runs[0].history[0]["train_loss"] == runs[1].history[0]["train_loss"]
    assert runs[0].summary["test_loss"] == runs[1].summary["test_loss"]
    data = load_data(DataConfig(data=f"folder:{photos / 'photos'}", image_size=16, resize="crop", in_memory="no"))
    assert data.streamed and data.train[0].shape[-1] > 16 and data.test[0].shape[-1] == data.val[0].shape[-1] == 16


PART = st.sampled_from(["a", "b", "cls", ".", "..", "", ".hidden", "x.jpg", "a b"])
PATH = st.lists(PART, min_size=1, max_size=5).map(lambda parts: os.path.join(*parts))


@given(top=st.one_of(PATH, PATH.map(lambda p: os.sep + p)).filter(bool), rests=st.lists(PATH, max_size=6),
       absolute=st.booleans())
@settings(max_examples=300, deadline=None)
def test_file_ids_name_files_as_os_path_relpath_does(top, rests, absolute):
    """file_ids cuts the folder's prefix instead of calling relpath when nothing needs normalising;
    the names must be relpath's for any path, '.' and '..' and empty parts included."""
    from unittest import mock

    from cnnlab.data.folder import file_ids

    files = [os.path.join(top, rest) for rest in rests] + ([os.path.abspath(top)] if absolute else [])
    with mock.patch("os.path.getsize", lambda f: 7):
        ids = file_ids(files, top)
    assert ids == [(os.path.relpath(f, top).replace(os.sep, "/"), 7) for f in files]


@given(st.lists(st.one_of(PATH, PATH.map(lambda p: os.sep + p), PATH.map(lambda p: p + os.sep)), max_size=8))
@settings(max_examples=300, deadline=None)
def test_absolute_names_are_os_path_abspath(files):
    from cnnlab.data.cache import absolute_names

    assert list(absolute_names(files)) == [os.path.abspath(f) for f in files]


@given(data=st.data())
@settings(max_examples=50, deadline=None)
def test_files_key_is_the_hash_of_names_sizes_and_mtimes_whether_stamped_once_or_not(data):
    """One load stamps its files once and hands the stamps to each key (folder.py); the key must be
    the one computed file by file, a hash of each absolute name, size and mtime (missing files
    included): so no cache entry written before is orphaned, and a subset keyed from a bigger set's
    stamps is keyed alike."""
    import hashlib

    from cnnlab.data.cache import file_stamps, files_key
    from cnnlab.data.folder import file_ids

    import tempfile

    tmp_path = tempfile.mkdtemp()   # one per example: files left by an earlier one would hide the missing case
    names = data.draw(st.lists(st.sampled_from(["a.png", "b.png", "c d.jpg", "e", "f.jpg"]), unique=True, min_size=1))
    os.makedirs(os.path.join(tmp_path, "cls"))
    files = [os.path.join(tmp_path, "cls", n) for n in names]
    present = [f for f, keep in zip(files, data.draw(st.lists(st.booleans(), min_size=len(files), max_size=len(files))))
               if keep]
    for i, f in enumerate(present):
        with open(f, "wb") as out:
            out.write(b"x" * data.draw(st.integers(0, 50), label=f"size {i}"))
    subset = data.draw(st.lists(st.sampled_from(files), unique=True))
    expected = hashlib.sha256(b"label")
    for f in subset:
        if os.path.exists(f):
            st_ = os.stat(f)
            expected.update(f"{os.path.abspath(f)}\0{st_.st_size}\0{st_.st_mtime_ns}\n".encode())
        else:
            expected.update(f"{os.path.abspath(f)}\0missing\n".encode())
    stamps = file_stamps(files)
    assert files_key("label", subset) == files_key("label", subset, stamps) == expected.hexdigest()[:24]
    kept = [f for f in subset if f in present]
    assert file_ids(kept, tmp_path, stamps) == file_ids(kept, tmp_path)
    shutil.rmtree(tmp_path)
