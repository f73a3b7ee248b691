"""The photo pipeline (issue 16): EXIF orientation, JPEG draft decoding, --resize squash|crop|pad,
per-sample random-resized crops batched on the device, evaluation by resize + centre crop, and the
done-when command at toy scale (train a tv/ backbone from a weights file on photos of mixed sizes,
then predict, export to ONNX and serve)."""
import io
import json
import os

import httpx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnlab.config import DataConfig
from cnnlab.data import load_data
from cnnlab.data import images, photos
from cnnlab.data.loader import BatchLoader
from cnnlab.data.preprocess import Preprocess

from .conftest import ROOT, run_cli
from .test_serve import free_port, start_server

ORIENTATION = 0x0112


def halves(w, h):
    """A w x h RGB image, its left half red and its right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, :w // 2, 0] = 255
    a[:, w // 2:, 2] = 255
    return Image.fromarray(a)


def jpeg_bytes(img, **options):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **options)
    return buf.getvalue()


def test_exif_orientation_is_honoured():
    """A camera's sideways photo (orientation 6: turn 90 degrees clockwise to view) is decoded as
    seen: 40 wide x 20 high stored, 20 wide x 40 high shown, its left half on top."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    raw = jpeg_bytes(halves(40, 20), exif=exif.tobytes())
    a = images.load_array(io.BytesIO(raw), 3, 0)                     # (C, H, W), no resize
    assert a.shape == (3, 40, 20)
    assert a[0, :18].mean() > 200 and a[2, :18].mean() < 50          # the top is the red half
    assert a[2, 22:].mean() > 200 and a[0, 22:].mean() < 50          # the bottom the blue one
    unrotated = images.load_array(io.BytesIO(jpeg_bytes(halves(40, 20))), 3, 0)
    assert unrotated.shape == (3, 20, 40)                            # no tag: as stored


def smooth_photo(w, h, seed=0):
    """A photo-like JPEG: random colours upscaled (smooth, as a real photo is at this scale)."""
    rng = np.random.default_rng(seed)
    return jpeg_bytes(Image.fromarray(rng.integers(0, 256, (h // 40, w // 40, 3), dtype=np.uint8)).resize(
        (w, h), Image.BICUBIC))


def test_a_large_jpeg_is_decoded_at_reduced_size_with_the_pixels_of_a_full_decode():
    """1600x1200 into a 148 px stored square: PIL's draft decodes it at 1/4 scale (400x300, still
    2x the side it is resized to), and the result is that of a full decode within a level or so."""
    raw = smooth_photo(1600, 1200)
    assert images.open_header(io.BytesIO(raw), "photo.jpg", size=148).size == (400, 300)
    drafted = images.load_array(io.BytesIO(raw), 3, 148, policy="crop").astype(int)
    full = images.load_array(Image.open(io.BytesIO(raw)), 3, 148, policy="crop").astype(int)   # no draft
    difference = np.abs(drafted - full)
    assert drafted.shape == (3, 148, 148) and difference.mean() < 1.0 and difference.max() <= 8


@settings(max_examples=60, deadline=None)
@given(st.integers(8, 48), st.integers(4, 160), st.integers(4, 160), st.integers(0, 2**31 - 1))
def test_evaluation_is_torchvision_resize_then_centre_crop(size, h, w, seed):
    """The crop policy's eval path (what evaluate, predict, export and serve give the network) is
    torchvision.transforms.v2's Resize(L) + CenterCrop(S) on any image, L = photos.stored_side(S)."""
    from torchvision.transforms import v2

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pre = Preprocess(channels=3, image_size=size, mean=[0.5] * 3, std=[0.5] * 3, resize="crop",
                     resize_size=photos.stored_side(size))
    ours = pre.image(a)
    theirs = v2.Compose([v2.Resize(pre.resize_size, antialias=True), v2.CenterCrop(size)])(
        torch.from_numpy(a).permute(2, 0, 1))
    assert ours.shape == (3, size, size) and torch.equal(ours, theirs)


def fake_stored(n=8, side=24):
    """n copies of one random image: any difference between their crops is the crops' own."""
    one = torch.randint(0, 256, (1, 3, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return one.expand(n, -1, -1, -1).contiguous()


def loader(x, augment="crop+flip", **options):
    pre = Preprocess(channels=3, image_size=16, mean=[0.5] * 3, std=[0.25] * 3, resize="crop", resize_size=24)
    return BatchLoader(x, torch.zeros(len(x), dtype=torch.long), len(x), pre, augment=augment, seed=3,
                       shuffle=True, **options)


def test_random_resized_crops_differ_per_sample_and_come_back_from_the_seed():
    x = fake_stored()
    first = loader(x).make_batch(torch.arange(8), epoch=1, step=0)[0]
    assert first.shape == (8, 3, 16, 16)
    assert len({tuple(img.flatten()[:64].tolist()) for img in first}) == 8           # every sample its own crop
    assert torch.equal(first, loader(x).make_batch(torch.arange(8), epoch=1, step=0)[0])  # the same draws again
    assert not torch.equal(first, loader(x).make_batch(torch.arange(8), epoch=1, step=1)[0])
    # DDP: two ranks' shares together are the one-process batch (each draws for the whole batch)
    shares = [loader(x, rank=r, world=2).make_batch(torch.arange(8), epoch=1, step=0)[0] for r in (0, 1)]
    assert torch.equal(torch.stack(shares, 1).flatten(0, 1), first)


def test_a_whole_square_crop_is_the_image_resampled(monkeypatch):
    """roi_align's box convention: a box over the whole stored square at its own size gives the
    image itself (pixel centres line up), and a flip mirrors it."""
    x = fake_stored(2, 16)
    monkeypatch.setattr(photos, "draw_crops", lambda drawn, gen: torch.tensor([[0.0, 0.0, 1.0, 1.0]] * drawn))
    out = photos.random_resized_crop(x, torch.arange(2), 16, False, torch.Generator().manual_seed(0), 2)
    assert torch.allclose(out, x.float(), atol=1e-3)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_crop_boxes_follow_random_resized_crop(seed):
    """Areas 8-100% of the square, aspect ratios 3/4-4/3, inside the square (torchvision's ranges)."""
    top, left, h, w = photos.draw_crops(256, torch.Generator().manual_seed(seed)).double().unbind(1)
    assert ((h * w >= 0.08 - 1e-6) & (h * w <= 1 + 1e-6)).all()
    assert ((w / h >= 3 / 4 - 1e-5) & (w / h <= 4 / 3 + 1e-5)).all()
    assert ((top >= 0) & (left >= 0) & (top + h <= 1 + 1e-6) & (left + w <= 1 + 1e-6)).all()


def write_photos(root, sizes, per_class=3, pattern=halves):
    """Class folders 'a' and 'b' of JPEGs of the given (w, h) sizes."""
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            img = pattern(w, h) if cls == "a" else pattern(w, h).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img.save(root / cls / f"{i}.jpg", quality=95)


@pytest.mark.parametrize("policy,left_red,top_black", [("squash", 8, False), ("crop", 8, False), ("pad", 8, True)])
def test_resize_policies(tmp_path, monkeypatch, policy, left_red, top_black):
    """--resize on 40x20 photos into 16 px: squash stretches (no black, half red), crop keeps the
    centre (half red), pad letterboxes (black bars above and below)."""
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    write_photos(tmp_path / "p", [(40, 20)])
    data = load_data(DataConfig(data=f"folder:{tmp_path / 'p'}", image_size=16, resize=policy, val_fraction=0.0))
    assert data.shape == (3, 16, 16) and data.preprocess.resize == policy
    img = data.test[0][data.test[1].tolist().index(0)]               # a class 'a' image: red left, blue right
    red = (img[0] > 128) & (img[2] < 128)
    assert red[8, :left_red].all() and not red[8, left_red + 1:].any()
    assert bool((img[:, 0].max() < 30)) == top_black                 # the top row black only when padded
    if policy == "pad":
        assert img[:, 4:12].amax(0).float().mean() > 200 and img[:, :3].max() < 30 and img[:, 13:].max() < 30


def test_auto_is_crop_for_photos_and_squash_for_small_images(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    write_photos(tmp_path / "big", [(60, 40), (40, 50), (90, 64)])
    write_photos(tmp_path / "small", [(12, 12)])
    big = load_data(DataConfig(data=f"folder:{tmp_path / 'big'}", image_size=16, val_fraction=0.0))
    small = load_data(DataConfig(data=f"folder:{tmp_path / 'small'}", image_size=16, val_fraction=0.0))
    assert big.preprocess.resize == "crop" and big.preprocess.resize_size == 20 == photos.stored_side(16)
    assert big.train[0].shape[1:] == (3, 20, 20) and big.test[0].shape[1:] == (3, 16, 16) and big.shape == (3, 16, 16)
    assert small.preprocess.resize == "squash" and small.train[0].shape[1:] == (3, 16, 16)
    given = load_data(DataConfig(data=f"folder:{tmp_path / 'big'}", image_size=16, resize_size=24, val_fraction=0.0))
    assert given.preprocess.resize_size == 24 and given.train[0].shape[1:] == (3, 24, 24)


def test_tensor_sources_stay_squashed_under_auto(tmp_path):
    """MNIST, CIFAR and npz arrays keep their exact pixels: auto never crops a tensor source."""
    x = np.random.default_rng(1).integers(0, 256, (20, 20, 30), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(20) % 2)
    data = load_data(DataConfig(data=f"npz:{tmp_path / 'd.npz'}", image_size=12, val_fraction=0.0))
    assert data.preprocess.resize == "squash" and data.preprocess.resize_size == 0
    first = data.splits["train"][0]
    assert torch.equal(data.train[0][0], images.resize(torch.from_numpy(x[first])[None, None], 12)[0])


def mixed_photos(root):
    """Two classes of photos of mixed sizes and aspects, one a sideways-tagged JPEG, one a PNG."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    sizes = [(64, 48), (48, 64), (90, 60), (72, 72), (100, 56), (50, 80)]
    for cls, colour in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
        (root / cls).mkdir(parents=True)
        rng = np.random.default_rng(len(cls) + ord(cls))
        for i, (w, h) in enumerate(sizes):
            a = np.clip(rng.normal(0, 30, (h, w, 3)) + colour, 0, 255).astype(np.uint8)
            if i == 0:
                Image.fromarray(a).save(root / cls / f"{i}.jpg", exif=exif.tobytes())
            elif i == 1:
                Image.fromarray(a).save(root / cls / f"{i}.png")
            else:
                Image.fromarray(a).save(root / cls / f"{i}.jpg", quality=90)


def test_the_done_when_command_at_toy_scale(tmp_path):
    """train --data folder:PHOTOS --model tv/resnet18 --weights FILE --freeze-epochs 1 --epochs 3
    --image-size S; then predict a photo of another size, export to ONNX (parity checked) and serve."""
    import torchvision

    mixed_photos(tmp_path / "photos")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    env = {"CNNLAB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ROOT}
    run = tmp_path / "run"
    result = run_cli("train", "--data", f"folder:{tmp_path / 'photos'}", "--model", "tv/resnet18", "--weights",
                     tmp_path / "r18.pth", "--freeze-epochs", 1, "--epochs", 3, "--image-size", 32, "--batch-size", 4,
                     "--val-fraction", 0.2, "--out", run, env=env)
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(run / "best.pt", weights_only=False)
    assert ckpt["preprocess"]["resize"] == "crop" and ckpt["preprocess"]["resize_size"] == 36
    assert os.path.exists(run / "report.html") and json.loads((run / "summary.json").read_text())["epochs"] == 3

    Image.fromarray(np.full((300, 500, 3), (200, 40, 40), np.uint8)).save(tmp_path / "big.jpg")
    predicted = run_cli("predict", run, tmp_path / "big.jpg", "--json", env=env)
    assert predicted.returncode == 0, predicted.stderr
    assert "unlike" not in predicted.stderr        # a photo model takes photos of any size without a warning
    exported = run_cli("export", run, "--format", "onnx", env=env)
    assert exported.returncode == 0 and "parity check passed" in exported.stdout + exported.stderr

    port = free_port()
    proc = start_server(str(run), port, env=env)
    try:
        raw = (tmp_path / "big.jpg").read_bytes()
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", content=raw, headers={"content-type": "image/jpeg"})
        assert answer.status_code == 200
        served = answer.json()["predictions"][0]
        assert served["label"] == json.loads(predicted.stdout)[0]["predictions"][0]["label"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_torchvision_weights_bring_their_own_resize_and_crop_sizes(tmp_path):
    """--weights naming torchvision weights, without --image-size: the weights' crop and resize
    sizes (weights.transforms()) become image_size and resize_size; an --image-size given wins."""
    from cnnlab.config import make_config
    from cnnlab.errors import UsageError
    from cnnlab.training.resume import resolve_config

    published = tmp_path / "resnet50-11ad3fa6.pth"          # IMAGENET1K_V2's file name: 232 then 224
    published.write_bytes(b"")
    cfg = resolve_config(overrides={"model": "tv/resnet50", "weights": str(published), "data": "mnist-5k"})
    assert (cfg.image_size, cfg.resize_size) == (224, 232)
    cfg = resolve_config(overrides={"model": "tv/resnet18", "weights": "DEFAULT", "data": "mnist-5k"})
    assert (cfg.image_size, cfg.resize_size) == (224, 256)
    cfg = resolve_config(overrides={"model": "tv/resnet18", "weights": "DEFAULT", "image_size": 128, "data": "mnist-5k"})
    assert (cfg.image_size, cfg.resize_size) == (128, 0)
    with pytest.raises(UsageError, match="'resize_size' \\(100\\) is the side"):
        make_config({"image_size": 128, "resize_size": 100})
    with pytest.raises(UsageError, match="with --resize pad images are resized to image_size directly"):
        make_config({"image_size": 128, "resize_size": 148, "resize": "pad"})


def test_flip_alone_flips_the_centre_crops():
    """--augment flip on photos: centre crops, about half of them mirrored, the same on a rerun."""
    x = fake_stored(16)
    flipped = loader(x, augment="flip").make_batch(torch.arange(16), epoch=0, step=0)[0]
    centre = loader(x, augment="none").make_batch(torch.arange(16), epoch=0, step=0)[0]
    mirrored = [torch.equal(f, c.flip(-1)) for f, c in zip(flipped, centre)]
    kept = [torch.equal(f, c) for f, c in zip(flipped, centre)]
    assert all(m or k for m, k in zip(mirrored, kept)) and 0 < sum(mirrored) < 16
