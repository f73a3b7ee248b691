"""Every data source on small files the test writes itself, plus the real MNIST when present."""
import io
import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnlab.config import DataConfig, make_config
from cnnlab.data import default_augment, load_data
from cnnlab.data.loader import BatchLoader
from cnnlab.data.preprocess import Preprocess
from cnnlab.errors import CnnlabError, UsageError


def write_idx(root, prefix, images, labels):
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    n, h, w = images.shape
    with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(np.array([0x803, n, h, w], dtype=">i4").tobytes() + images.astype(np.uint8).tobytes())
    with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(np.array([0x801, n], dtype=">i4").tobytes() + labels.astype(np.uint8).tobytes())


def test_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path, "train", rng.integers(0, 256, (200, 28, 28)), np.arange(200) % 10)
    write_idx(tmp_path, "t10k", rng.integers(0, 256, (50, 28, 28)), np.arange(50) % 10)
    data = load_data(DataConfig(data="mnist", data_dir=str(tmp_path)))
    assert data.shape == (1, 28, 28) and data.classes == [str(i) for i in range(10)]
    assert len(data.test[1]) == 50                      # the official test split stays the test split
    assert len(data.train[1]) + len(data.val[1]) == 200
    assert len(data.val[1]) == 20                       # 10% of the training pool, stratified
    assert torch.bincount(data.val[1]).tolist() == [2] * 10


def write_cifar(root, n_train=60, n_test=20):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(np.arange(n) % 10)}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in names]}, f)


def test_cifar10_and_cifar2_from_python_batches(tmp_path):
    write_cifar(tmp_path)
    data = load_data(DataConfig(data="cifar10", data_dir=str(tmp_path), val_fraction=0.0))
    assert data.shape == (3, 32, 32) and data.classes[2] == "bird" and len(data.test[1]) == 20
    two = load_data(DataConfig(data="cifar2", data_dir=str(tmp_path), val_fraction=0.0))
    assert two.classes == ["airplane", "bird"]
    assert sorted(torch.unique(two.train[1]).tolist()) == [0, 1] and len(two.train[1]) == 15   # 5 batches x (2 airplanes + 1 bird)


def test_cifar_batch_with_code_is_refused(tmp_path):
    write_cifar(tmp_path)
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(CnnlabError, match="refused"):
        load_data(DataConfig(data="cifar10", data_dir=str(tmp_path)))
    assert not (tmp_path / "pwned").exists()


def test_offline_message_names_files(tmp_path):
    """...and the failed download leaves no empty folders behind (MNIST/raw/ under a --data-dir
    that did not exist made a later `data check` of that path report an empty class folder)."""
    with pytest.raises(CnnlabError, match="cifar-10-batches-py"):
        load_data(DataConfig(data="cifar10", data_dir=str(tmp_path)))
    assert not list(tmp_path.iterdir())
    with pytest.raises(CnnlabError, match="MNIST/raw"):
        load_data(DataConfig(data="mnist", data_dir=str(tmp_path / "nowhere")))
    assert not (tmp_path / "nowhere").exists()


def test_npz_nhwc_with_classes(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.integers(0, 256, (100, 8, 8, 3), dtype=np.uint8), y_train=np.arange(100) % 4,
             x_test=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), y_test=np.arange(20) % 4,
             classes=np.array(["a", "b", "c", "d"]))
    data = load_data(DataConfig(data=f"npz:{path}", train_samples=40))
    assert data.shape == (3, 8, 8) and data.classes == ["a", "b", "c", "d"]
    assert len(data.train[1]) == 40 and torch.bincount(data.train[1]).tolist() == [10] * 4


def test_npz_missing_arrays(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(CnnlabError, match="x_train"):
        load_data(DataConfig(data=f"npz:{tmp_path / 'bad.npz'}"))


def test_splits_deterministic_stratified_disjoint():
    cfg = DataConfig(data="mnist-5k")
    a, b = load_data(cfg), load_data(cfg)
    assert a.splits == b.splits
    train, val, test = (set(a.splits[k]) for k in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 5000
    assert torch.bincount(a.test[1]).tolist() == [100] * 10       # stratified: 20% of 500 per class
    other = load_data(DataConfig(data="mnist-5k", seed=1))
    assert other.splits["test"] != a.splits["test"]


def test_unknown_dataset_suggests_closest():
    with pytest.raises(UsageError, match="Did you mean 'mnist'"):
        load_data(DataConfig(data="mnsit"))


def make_folder(root, split=None, n=6, size=(20, 16)):
    base = root / split if split else root
    for cls, color in (("cat", (200, 50, 50)), ("dog", (50, 50, 200))):
        os.makedirs(base / cls, exist_ok=True)
        for i in range(n):
            img = Image.new("RGB", size, color)
            img.save(base / cls / f"{i}.png" if i % 2 else base / cls / f"{i}.jpg")


def test_folder_with_train_test_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "imgs", "train")
    make_folder(tmp_path / "imgs", "test", n=2)
    cfg = DataConfig(data=f"folder:{tmp_path / 'imgs'}", image_size=12)
    data = load_data(cfg)
    assert data.classes == ["cat", "dog"] and data.shape == (3, 12, 12) and len(data.test[1]) == 4
    assert data.test[0][0, 0].float().mean() > data.test[0][0, 2].float().mean()  # cats are red
    assert len(os.listdir(tmp_path / "cache" / "folders")) == 2
    again = load_data(cfg)                                                     # from the cache
    assert torch.equal(again.train[0], data.train[0])


def test_folder_bad_image_error_and_skip(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "broken.jpg").write_text("not an image")
    with pytest.raises(CnnlabError, match="broken.jpg"):
        load_data(DataConfig(data=f"folder:{tmp_path / 'imgs'}"))
    data = load_data(DataConfig(data=f"folder:{tmp_path / 'imgs'}", on_bad_image="skip"))
    assert len(data.files["bad"]) == 1 and "broken.jpg" in data.files["bad"][0]
    assert len(data.train[1]) + len(data.val[1]) + len(data.test[1]) == 12


def gray(std=1.0):
    """A one-channel Preprocess that normalises x to x / 255 / std."""
    return Preprocess(channels=1, image_size=0, mean=[0.0], std=[std])


def test_loader_batches_cover_epoch_once_and_resume_exactly():
    x = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 1, 4, 4).contiguous()
    y = torch.arange(50) % 5
    loader = BatchLoader(x, y, 8, gray(1 / 255), shuffle=True, seed=3, augment="crop+flip")
    batches = list(loader.batches(epoch=2))
    seen = torch.cat([b[1] for b in batches])
    assert len(seen) == 50 and len(batches) == 7
    resumed = list(loader.batches(epoch=2, start=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[4:], resumed))
    assert not torch.equal(torch.cat([b[1] for b in loader.batches(epoch=3)]), seen)


def test_fixed_sampler_reuses_one_seeded_order_every_epoch():
    """--sampler fixed: seed 002's book runs train on a shuffle=False loader over mixed data."""
    y = torch.arange(64) % 2
    loader = lambda sampler, seed=3: BatchLoader(torch.zeros(64, 1, 2, 2, dtype=torch.uint8), y, 8, gray(),
                                                shuffle=True, seed=seed, sampler=sampler)
    fixed, shuffled = loader("fixed"), loader("shuffle")
    first = fixed.order(0)
    assert sorted(first.tolist()) == list(range(64)) and not torch.equal(first, torch.arange(64))
    assert all(torch.equal(fixed.order(epoch), first) for epoch in range(1, 5))
    assert not torch.equal(shuffled.order(1), shuffled.order(2))
    assert not torch.equal(loader("fixed", seed=4).order(0), first)


def test_ddp_shards_are_disjoint_and_complete():
    x, y = torch.zeros(40, 1, 2, 2, dtype=torch.uint8), torch.arange(40)
    shards = [BatchLoader(x, y, 8, gray(), shuffle=True, seed=0, rank=r, world=2) for r in range(2)]
    single = BatchLoader(x, y, 8, gray(), shuffle=True, seed=0)
    for (a, b, s) in zip(*(l.batches(1) for l in shards), single.batches(1)):
        assert sorted(a[1].tolist() + b[1].tolist()) == sorted(s[1].tolist())
        assert not set(a[1].tolist()) & set(b[1].tolist())


def test_crop_and_flip_are_shifts_and_mirrors():
    x = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    x[0, 0, 4, 5] = 255
    loader = BatchLoader(x.repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.long), 64, gray(),
                         shuffle=True, augment="crop+flip")
    out, _ = next(loader.batches(0))
    assert out.shape == (64, 1, 8, 8) and torch.all((out > 0).sum((1, 2, 3)) <= 1)
    spots = {tuple(o.nonzero()[0].tolist()[1:]) for o in out if o.sum()}
    assert len(spots) > 3
    cols = {col for _, col in spots}
    assert any(c <= 3 for c in cols) and any(c >= 4 for c in cols)   # mirrored copies land left of centre
    plain = BatchLoader(x, torch.zeros(1, dtype=torch.long), 1, gray())
    assert torch.allclose(next(plain.batches())[0], x.float() / 255)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), side=st.integers(3, 9), padding=st.integers(1, 8),
       mode=st.sampled_from(["zeros", "reflect"]), world=st.sampled_from([1, 2]),
       flip=st.sampled_from(["flip", "altflip"]))
def test_crops_are_windows_of_numpys_padding(seed, side, padding, mode, world, flip):
    """Every cropped image is a side x side window of numpy's np.pad of its source (constant 0 or
    reflect), mirrored or not, and a DDP rank's share is what one process makes of those images."""
    padding = min(padding, side - 1)                  # the padding must be under the side
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (12, 2, side, side), dtype=torch.uint8, generator=gen)
    y = torch.arange(12)
    options = dict(shuffle=True, seed=seed, augment="crop+" + flip, padding=padding, padding_mode=mode)
    single = BatchLoader(x, y, 6, gray(1 / 255), **options)
    ranks = [BatchLoader(x, y, 6, gray(1 / 255), rank=r, world=world, **options) for r in range(world)]
    for step, (xb, yb) in enumerate(single.batches(epoch=1)):
        for image, label in zip(xb.round().to(torch.uint8).numpy(), yb.tolist()):
            padded = np.pad(x[label].numpy(), ((0, 0), (padding, padding), (padding, padding)),
                            mode="constant" if mode == "zeros" else "reflect")
            windows = [view[:, dy:dy + side, dx:dx + side] for view in (padded, padded[..., ::-1])
                       for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
            assert any(np.array_equal(image, w) for w in windows)
        shares = [list(r.batches(epoch=1, start=step))[0] for r in ranks]
        assert torch.equal(torch.cat([s[0] for s in shares]), torch.cat([xb[r::world] for r in range(world)]))


def test_altflip_mirrors_every_image_in_every_other_epoch():
    """--augment altflip: a seeded half of the images mirrored in even epochs, the other half in odd ones."""
    x = torch.randint(0, 256, (200, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(200)

    def mirrored(epoch, seed=0):
        xb, yb = next(BatchLoader(x, y, 200, gray(1 / 255), shuffle=True, seed=seed, augment="altflip").batches(epoch))
        changed = (xb.round().to(torch.uint8) != x[yb]).flatten(1).any(1)      # by batch position
        assert torch.equal(xb[changed].round().to(torch.uint8), x[yb][changed].flip(-1))
        flipped = torch.zeros(200, dtype=torch.bool)
        flipped[yb] = changed                                                 # by image
        return flipped

    epochs = [mirrored(e) for e in range(4)]
    assert 60 < epochs[0].sum() < 140
    assert torch.equal(epochs[1], ~epochs[0]) and torch.equal(epochs[2], epochs[0]) and torch.equal(epochs[3], ~epochs[0])
    assert not torch.equal(mirrored(0, seed=1), epochs[0])


def test_crop_padding_settings_are_checked():
    with pytest.raises(UsageError, match="one of flip and altflip"):
        make_config({"augment": "crop+flip+altflip"})
    with pytest.raises(UsageError, match="crop_padding_mode"):
        make_config({"crop_padding_mode": "mirror"})
    tiny = torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    for mode in ("zeros", "reflect"):
        with pytest.raises(UsageError, match=r"--crop-padding 8 must be under the images' 8 px: give --crop-padding 7 or less"):
            BatchLoader(*tiny, 2, gray(), augment="crop", padding=8, padding_mode=mode)
    with pytest.raises(UsageError, match=r"--crop-padding 2 \(auto\) must be under the images' 2 px"):
        BatchLoader(tiny[0][..., :2, :2], tiny[1], 2, gray(), augment="crop", padding_mode="reflect")
    with pytest.raises(UsageError, match="'crop_padding' must be at most 1023"):
        make_config({"crop_padding": 5000})


def test_training_and_the_audit_crop_as_configured(monkeypatch, tmp_path):
    """--crop-padding and --crop-padding-mode reach the training loader of `cnnlab train` and of the
    audit's cross-validation folds."""
    import cnnlab.data.stream
    from cnnlab.evaluation import audit
    from cnnlab.runtime import Context
    from cnnlab.training.loop import fit

    made = []

    class Recording(BatchLoader):
        def __init__(self, *args, **options):
            super().__init__(*args, **options)
            made.append(self)

    monkeypatch.setattr(cnnlab.data.stream, "BatchLoader", Recording)
    monkeypatch.setattr(audit, "BatchLoader", Recording)
    settings = {"data": "mnist-5k", "train_samples": 64, "val_samples": 32, "test_samples": 32, "epochs": 1,
                "augment": "crop", "crop_padding": 3, "crop_padding_mode": "reflect", "report": False}
    fit(make_config({**settings, "out": str(tmp_path / "run")}), quiet=True)
    x, y = torch.zeros(8, 1, 28, 28, dtype=torch.uint8), torch.arange(8) % 2
    audit.train_fold(make_config(settings), x, y, 2, gray(), Context(device=torch.device("cpu")))
    shuffled = [m for m in made if m.shuffle]
    assert len(shuffled) == 2 and all(m.pad == 3 and m.padding_mode == "reflect" for m in shuffled)


def test_digits_are_never_flipped_by_default():
    data = load_data(DataConfig(data="mnist-5k"))
    assert default_augment(data, "auto") == "crop"


def test_full_mnist(shared_datasets):
    data = load_data(DataConfig(data="mnist", data_dir=shared_datasets, val_fraction=0.0))
    assert len(data.train[1]) == 60000 and len(data.test[1]) == 10000
    assert torch.bincount(data.train[1]).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_seed004_caps(shared_datasets):
    cfg = DataConfig(data="mnist", data_dir=shared_datasets, train_samples=20000, val_samples=5000, test_samples=5000)
    data = load_data(cfg)
    assert (len(data.train[1]), len(data.val[1]), len(data.test[1])) == (20000, 5000, 5000)


# --- first contact (issue 14): paths, notes on stderr, progress, classes never measured ---

def test_data_dir_one_level_too_deep_is_used(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    write_idx(tmp_path, "train", rng.integers(0, 256, (40, 28, 28)), np.arange(40) % 10)
    write_idx(tmp_path, "t10k", rng.integers(0, 256, (10, 28, 28)), np.arange(10) % 10)
    data = load_data(DataConfig(data="mnist", data_dir=str(tmp_path / "MNIST"), val_fraction=0.0))
    assert len(data.train[1]) == 40 and len(data.test[1]) == 10
    out, err = capsys.readouterr()
    assert out == "" and len([line for line in err.splitlines() if "MNIST folder itself" in line]) == 1


def test_bare_paths_are_folder_and_npz(tmp_path, monkeypatch):
    from cnnlab.data import resolve_name

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "imgs")
    np.savez(tmp_path / "d.npz", x_train=np.zeros((20, 8, 8), np.uint8), y_train=np.arange(20) % 2)
    assert resolve_name(str(tmp_path / "imgs")) == f"folder:{tmp_path / 'imgs'}"
    assert resolve_name(str(tmp_path / "d.npz")) == f"npz:{tmp_path / 'd.npz'}"
    assert resolve_name("mnist") == "mnist"                     # names win over same-named folders
    assert load_data(DataConfig(data=str(tmp_path / "imgs"), image_size=8)).classes == ["cat", "dog"]
    assert load_data(DataConfig(data=str(tmp_path / "d.npz"))).shape == (1, 8, 8)
    with pytest.raises(UsageError, match="no such folder or .npz file"):
        resolve_name(str(tmp_path / "missing"))


def test_notes_go_to_stderr(capsys):
    from types import SimpleNamespace

    assert default_augment(SimpleNamespace(name="mnist", flip_ok=False), "flip") == "flip"
    out, err = capsys.readouterr()
    assert out == "" and "mirrored digits" in err


def test_other_ranks_say_nothing(tmp_path, monkeypatch, capsys):
    """Under DDP every rank loads the data; only rank 0's notes and warnings are printed."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "imgs")
    os.makedirs(tmp_path / "imgs" / "empty")
    load_data(DataConfig(data=f"folder:{tmp_path / 'imgs'}", image_size=8))          # first load: decodes, warns
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    load_data(DataConfig(data=f"folder:{tmp_path / 'imgs'}", image_size=8))
    assert "holds no images" in capsys.readouterr().err


def test_download_chatter_goes_to_stderr(tmp_path, monkeypatch, capsys):
    """torchvision prints its download progress on stdout, which would break `evaluate --json`."""
    import torchvision.datasets as tvd

    from cnnlab.data import sources

    class FakeMNIST:
        def __init__(self, root, train, download):
            if not download:
                raise RuntimeError("Dataset not found")
            print("Downloading https://example.org/train-images-idx3-ubyte.gz")
            self.data, self.targets = torch.zeros(10, 28, 28, dtype=torch.uint8), torch.arange(10)
    monkeypatch.setattr(tvd, "MNIST", FakeMNIST)
    sources._open_torchvision("mnist", str(tmp_path), train=True)
    out, err = capsys.readouterr()
    assert out == "" and "Downloading" in err


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_folder_decode_announces_itself_with_a_bar_on_a_terminal(tmp_path, monkeypatch):
    from cnnlab.data.folder import decode_all, list_images

    make_folder(tmp_path / "imgs")
    files = list_images(tmp_path / "imgs")
    monkeypatch.setattr(sys, "stderr", Terminal())
    x, ok, bad = decode_all(files, 3, 8, " in imgs")
    shown = sys.stderr.getvalue()
    assert x.shape == (12, 3, 8, 8) and ok.all() and not bad
    assert "decoding 12 images in imgs" in shown and "/12 [" in shown     # the line, then tqdm's bar


def test_cached_folder_load_skips_the_header_pass(tmp_path, monkeypatch):
    import cnnlab.data.folder as folder

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "imgs")
    cfg = DataConfig(data=f"folder:{tmp_path / 'imgs'}")
    first = load_data(cfg)
    monkeypatch.setattr(folder, "choose_format", lambda *a: pytest.fail("headers read again"))
    monkeypatch.setattr(folder, "decode_all", lambda *a: pytest.fail("decoded again"))
    assert torch.equal(load_data(cfg).train[0], first.train[0]) and first.shape == (3, 16, 16)


def test_class_without_val_or_test_images_is_named(tmp_path, capsys):
    path = tmp_path / "rare.npz"
    y = np.array([0] * 20 + [1] * 20 + [2])                      # one 'rare' image: it lands in train
    np.savez(path, x_train=np.zeros((41, 8, 8), np.uint8), y_train=y, x_test=np.zeros((4, 8, 8), np.uint8),
             y_test=np.array([0, 1, 0, 1]), classes=np.array(["a", "b", "rare"]))
    data = load_data(DataConfig(data=f"npz:{path}"))
    assert torch.bincount(data.val[1], minlength=3)[2] == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "no val images for class 'rare'" in err and "no test images for class 'rare'" in err
    load_data(DataConfig(data=f"npz:{path}", val_fraction=0.0, classes=["a", "b"]))
    assert "val images" not in capsys.readouterr().err               # no val split at all: nothing to say of it


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12).flatmap(lambda k: st.tuples(st.just(k), st.lists(st.integers(0, k - 1), max_size=40))))
def test_absent_classes_against_a_set_difference(case):
    from cnnlab.data import absent_classes

    k, labels = case
    classes = [f"c{i}" for i in range(k)]
    expected = [classes[i] for i in sorted(set(range(k)) - set(labels))]
    assert absent_classes(torch.tensor(labels, dtype=torch.int64), classes) == expected


# --- the dataset registry (issue 15): a new dataset is one decorated builder ---

@pytest.fixture
def registry():
    """The registry, restored after the test: a dataset registered here does not outlive it."""
    from cnnlab.data.registry import REGISTRY

    before = dict(REGISTRY)
    yield REGISTRY
    REGISTRY.clear()
    REGISTRY.update(before)


def test_a_registered_dataset_trains_by_name(registry, tmp_path):
    import cnnlab
    from cnnlab.data import Source, datasets, register_dataset

    @register_dataset("toy-bars", description="bright top or bottom half", shape="1x16x16", classes=2, sizes="96 / -")
    def toy_bars(cfg):
        y = torch.arange(96) % 2
        x = torch.zeros(96, 1, 16, 16, dtype=torch.uint8)
        x[y == 0, :, :8], x[y == 1, :, 8:] = 200, 200
        return Source(x, y, classes=["top", "bottom"])

    assert datasets()[-1].name == "toy-bars"                              # `cnnlab datasets` lists it
    result = cnnlab.train(data="toy-bars", epochs=1, out=str(tmp_path / "run"), report=False, quiet=True)
    assert "test_acc" in result.summary and cnnlab.load(result.run_dir).classes == ["top", "bottom"]
    with pytest.raises(ValueError, match="registered twice"):
        register_dataset("toy-bars", description="again")(toy_bars)
    with pytest.raises(UsageError, match="Did you mean 'toy-bars'"):
        load_data(DataConfig(data="toy-bar"))


def test_prefix_sources_take_the_text_after_the_colon(registry):
    from cnnlab.data import Source, register_dataset, resolve_name

    seen = []

    @register_dataset("echo", arg="TEXT", description="the argument as its only class name")
    def echo(text, cfg):
        seen.append(text)
        return Source(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), classes=[text, "b:c"])

    assert load_data(DataConfig(data="echo:a:b", val_fraction=0.0)).classes == ["a:b", "b:c"] and seen == ["a:b"]
    with pytest.raises(UsageError, match="Did you mean 'echo:TEXT'"):
        resolve_name("echo")                                                 # its argument is required
    with pytest.raises(UsageError, match="unknown dataset 'mnist:x'"):
        resolve_name("mnist:x")                                              # and a plain name takes none
    assert resolve_name("synthetic") == "synthetic"                          # optional argument


# --- folder oddities (issue 23 item 13): said in one line each, never passed over in silence ---

@pytest.fixture
def pets(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "imgs")
    return tmp_path / "imgs"


def test_names_with_control_characters_are_printed_escaped(pets, capsys):
    from .conftest import FAULT_REPORT

    os.makedirs(pets / "e\nmpty")
    make_folder(pets / "more")                                                 # a class folder named with an escape
    os.rename(pets / "more" / "cat", pets / "bi\x1b[31mrd")
    (pets / "cat" / "bad\nname.png").write_bytes(b"")
    with pytest.raises(CnnlabError) as err:
        load_data(DataConfig(data=f"folder:{pets}"))
    assert "bad\\nname.png" in str(err.value) and "\n" not in str(err.value)
    data = load_data(DataConfig(data=f"folder:{pets}", on_bad_image="skip"))
    printed = capsys.readouterr().err
    assert "\x1b" not in printed and "e\\nmpty' holds no images" in printed
    assert "bi\\x1b[31mrd" in data.classes and "bad\\nname.png" in data.files["bad"][0]
    FAULT_REPORT.append("file and folder names with a newline and an escape sequence: printed escaped")


def test_a_class_folder_linked_outside_the_dataset_is_named(pets, tmp_path, capsys):
    make_folder(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere" / "cat", pets / "lynx")
    data = load_data(DataConfig(data=f"folder:{pets}"))
    assert data.classes == ["cat", "dog", "lynx"]                                # followed, by design
    assert (f"class folder '{pets / 'lynx'}' is a symlink to '{tmp_path / 'elsewhere' / 'cat'}', outside the dataset"
            in capsys.readouterr().err)


def test_a_class_left_without_readable_images_is_left_out(pets, capsys):
    os.makedirs(pets / "owl")
    for name in ("0.png", "1.jpg"):
        (pets / "owl" / name).write_bytes(b"not an image")
    data = load_data(DataConfig(data=f"folder:{pets}", on_bad_image="skip"))
    assert data.classes == ["cat", "dog"] and len(data.files["bad"]) == 2
    assert len(data.files["train"]) == 12                                      # kept aligned with the rows
    assert "class 'owl' has no readable training image left" in capsys.readouterr().err


def test_image_files_cnnlab_does_not_decode_are_counted_with_the_bad_ones(pets, capsys):
    (pets / "cat" / "drawing.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (pets / "dog" / "photo.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (pets / "dog" / "notes.txt").write_text("not a picture at all")
    (pets / "dog" / "broken.png").write_bytes(b"")
    data = load_data(DataConfig(data=f"folder:{pets}", on_bad_image="skip"))
    assert len(data.train[1]) + len(data.val[1]) + len(data.test[1]) == 12
    [line] = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert "skipped 1 unreadable image(s)" in line and "2 file(s) in formats cnnlab does not decode" in line
    assert "1 .svg" in line and "1 .heic" in line and "notes" not in line and "1 .txt" not in line


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), c=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9),
       elements=st.integers(1, 400), constant=st.booleans(), seed=st.integers(0, 2**16))
def test_channel_statistics_match_numpy_over_random_images(n, c, h, w, elements, constant, seed):
    """The chunked float64 sums, in chunks of any size, are numpy's int64 sums; mean and std are the
    float64 ones (unbiased, a single pixel's std 0), as fractions of 255 with the std floored at 1e-3."""
    from cnnlab.data import channel_stats
    from cnnlab.data.stream import channel_sums

    rng = np.random.default_rng(seed)
    x = np.full((n, c, h, w), rng.integers(0, 256), np.uint8) if constant else rng.integers(0, 256, (n, c, h, w), np.uint8)
    total, squares, count = channel_sums(torch.from_numpy(x), elements=elements)
    wide = x.astype(np.int64)
    assert total.tolist() == wide.sum(axis=(0, 2, 3)).tolist()
    assert squares.tolist() == (wide ** 2).sum(axis=(0, 2, 3)).tolist() and count == n * h * w
    mean, std = channel_stats(torch.from_numpy(x))
    per_channel = x.transpose(1, 0, 2, 3).reshape(c, -1).astype(np.float64)
    assert mean == pytest.approx((per_channel.mean(1) / 255).tolist(), rel=1e-12, abs=1e-12)
    expected = np.maximum(per_channel.std(1, ddof=1 if n * h * w > 1 else 0) / 255, 1e-3)
    assert std == pytest.approx(expected.tolist(), rel=1e-9, abs=1e-12)


def test_channel_sums_stay_exact_far_beyond_float32():
    """One 4096x4096 white image per chunk: 2**24 pixels whose squares sum to 1.09e12, exact in the
    float64 sums (float32 would round them), and a float input is refused."""
    from cnnlab.data.stream import channel_sums

    x = torch.full((2, 1, 4096, 4096), 255, dtype=torch.uint8)
    total, squares, count = channel_sums(x, elements=1)
    assert total.tolist() == [2 * 4096 * 4096 * 255] and squares.tolist() == [2 * 4096 * 4096 * 255 ** 2]
    with pytest.raises(TypeError):
        channel_sums(x.float())


def test_folder_with_train_val_and_test_keeps_all_three(tmp_path, monkeypatch, capsys):
    """train/ + val/ + test/: val/'s images are the validation split (a user's own held-out set, not
    a fraction of train/), test/'s the test split; --val-samples caps the named split. train/ +
    val/ alone: val/ is the held-out test split, as before."""
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "three", "train", n=8)
    make_folder(tmp_path / "three", "val", n=3)
    make_folder(tmp_path / "three", "test", n=2)
    data = load_data(DataConfig(data=f"folder:{tmp_path / 'three'}", image_size=12))
    assert (len(data.train[1]), len(data.val[1]), len(data.test[1])) == (16, 6, 4)
    val_files = [data.files["train"][i] for i in data.splits["val"]]
    assert all(os.sep + "val" + os.sep in f for f in val_files)
    assert not any(os.sep + "val" + os.sep in data.files["train"][i] for i in data.splits["train"])
    capped = load_data(DataConfig(data=f"folder:{tmp_path / 'three'}", image_size=12, val_samples=4))
    assert len(capped.val[1]) == 4 and len(capped.train[1]) == 16
    assert "is unused" not in capsys.readouterr().err
    fraction = load_data(DataConfig(data=f"folder:{tmp_path / 'three'}", image_size=12, val_fraction=0.3))
    assert len(fraction.val[1]) == 6 and "--val-fraction 0.3 is unused" in capsys.readouterr().err
    from cnnlab.data.splits import SavedSplits
    again = load_data(DataConfig(data=f"folder:{tmp_path / 'three'}", image_size=12),
                      splits=SavedSplits(str(tmp_path), json.loads(json.dumps(data.splits))))   # as splits.json
    assert torch.equal(again.val[0], data.val[0])                              # a resume finds the same split
    make_folder(tmp_path / "two", "train", n=8)
    make_folder(tmp_path / "two", "val", n=3)
    two = load_data(DataConfig(data=f"folder:{tmp_path / 'two'}", image_size=12))
    assert len(two.test[1]) == 6 and len(two.train[1]) + len(two.val[1]) == 16


@pytest.mark.parametrize("side", [12, 160])
def test_data_check_names_leaked_and_conflicting_copies(tmp_path, capsys, side):
    """`data check` counted exact copies across splits without naming them, and said nothing of the
    same image filed under two classes. At 160 px (--resize crop: training rows are stored larger
    than test rows) a copy across splits was never found."""
    from cnnlab.data.check import check

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / "d" / split / cls)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(tmp_path / "d" / split / cls / f"{i}.png")
    shutil.copy(tmp_path / "d" / "train" / "cat" / "0.png", tmp_path / "d" / "test" / "cat" / "leak.png")
    shutil.copy(tmp_path / "d" / "train" / "dog" / "1.png", tmp_path / "d" / "train" / "cat" / "mislabelled.png")
    assert check(f"folder:{tmp_path / 'd'}", cache_dir=str(tmp_path / "cache")) == 0
    out = capsys.readouterr().out
    assert "exact duplicates across splits: 1  (warning: leakage between splits)" in out
    assert "train/cat/0.png (train) = " in out and "test/cat/leak.png (test)" in out
    assert "warning: 1 image(s) appear with different labels" in out
    assert "train/cat/mislabelled.png (cat)" in out and "train/dog/1.png (dog)" in out


def test_split_folders_in_any_case_and_a_lone_train_folder_explained(tmp_path, monkeypatch):
    """Train/ + Test/ became two classes named Train and Test; a lone train/ of class folders was
    "found 1 class folder(s)", with nothing said about the subfolders inside it."""
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "cased", "Train", n=6)
    make_folder(tmp_path / "cased", "TEST", n=2)
    data = load_data(DataConfig(data=f"folder:{tmp_path / 'cased'}", image_size=12))
    assert data.classes == ["cat", "dog"] and len(data.test[1]) == 4
    make_folder(tmp_path / "lone", "train", n=6)
    with pytest.raises(CnnlabError, match=f"'train' holds subfolders: if they are the classes, point --data at "
                                          f"{tmp_path / 'lone' / 'train'}"):
        load_data(DataConfig(data=f"folder:{tmp_path / 'lone'}", image_size=12))


def test_held_out_folders_may_be_partial_and_val_has_its_usual_names(tmp_path, monkeypatch):
    """An empty val/ beside train/ and test/ was refused ("found 0 class folder(s)"), and a val/ of
    one class too: held-out folders need not hold every class. valid/ and validation/ are val/."""
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "d", "train", n=6)
    make_folder(tmp_path / "d", "test", n=2)
    os.makedirs(tmp_path / "d" / "val")
    data = load_data(DataConfig(data=f"folder:{tmp_path / 'd'}", image_size=12))
    assert len(data.test[1]) == 4 and len(data.train[1]) + len(data.val[1]) == 12    # val cut from train/
    make_folder(tmp_path / "d", "Validation", n=3)
    shutil.rmtree(tmp_path / "d" / "Validation" / "dog")
    os.rmdir(tmp_path / "d" / "val")
    data = load_data(DataConfig(data=f"folder:{tmp_path / 'd'}", image_size=12))
    assert (len(data.train[1]), len(data.val[1]), len(data.test[1])) == (12, 3, 4)
    assert data.val[1].tolist() == [0, 0, 0]
