"""One preprocessing path (issue 15): an image gives the network the same input tensor through
training's path (a dataset loaded with load_data, then the batch loader) and through `cnnlab
predict`'s, because both go through the Preprocess saved in the checkpoint."""
import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.config import DataConfig
from cnnlab.data import load_data
from cnnlab.data.loader import BatchLoader
from cnnlab.data.preprocess import Preprocess
from cnnlab.deploy.inference import Model
from cnnlab.deploy.predict import predict_files
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.training import checkpoint


def write_folder(root, mode, size, n=4):
    """Two class folders of random-pixel PNGs of `size` (w, h) in PIL `mode`."""
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / cls / f"{i}.png")


def save_checkpoint_for(data, path):
    """A checkpoint of an untrained network for `data`, with the data's Preprocess in it."""
    net = create_model("lenet5", data.shape, len(data.classes))
    checkpoint.save({"model": {"name": "lenet5", "in_shape": list(data.shape), "num_classes": len(data.classes),
                               "args": {}},
                     "state_dict": net.state_dict(), "classes": data.classes,
                     "preprocess": data.preprocess.to_dict(), "config": {"model": "lenet5"}, "metrics": {}}, path)
    return str(path)


@pytest.mark.parametrize("mode,size,image_size", [("L", (40, 30), 0), ("RGB", (50, 37), 24)])
def test_training_and_predict_give_the_network_the_same_input(tmp_path, monkeypatch, mode, size, image_size):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    write_folder(tmp_path / "imgs", mode, size)
    data = load_data(DataConfig(data=f"folder:{tmp_path / 'imgs'}", image_size=image_size, val_fraction=0.0))
    assert data.shape == ((1, 30, 30) if mode == "L" else (3, 24, 24))     # resized: not the files' size
    path = data.files["train"][data.splits["train"][0]]                      # the first training image's file
    trained, _ = next(BatchLoader(*data.train, 4, data.preprocess).batches())

    seen = []
    inputs = Model.inputs
    monkeypatch.setattr(Model, "inputs", lambda self, batch: seen.append(inputs(self, batch)) or seen[-1])
    assert predict_files(save_checkpoint_for(data, tmp_path / "m.pt"), [path], as_json=True) == 0
    assert len(seen) == 1 and torch.equal(seen[0], trained[:1])


def test_tensor_sources_are_resized_as_an_image_is(tmp_path):
    """npz images resized by --image-size equal the same array through Preprocess.image."""
    x = np.random.default_rng(1).integers(0, 256, (20, 20, 20), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(20) % 2)
    data = load_data(DataConfig(data=f"npz:{tmp_path / 'd.npz'}", image_size=12, val_fraction=0.0))
    first = data.splits["train"][0]
    assert torch.equal(data.preprocess.image(x[first]), data.train[0][0])


def test_round_trip_old_dicts_and_inversion():
    pre = Preprocess(channels=1, image_size=4, mean=[0.5], std=[0.25], invert=True)
    assert Preprocess.from_dict(pre.to_dict()) == pre
    old = Preprocess.from_dict({"channels": 1, "image_size": 4, "mean": [0.5], "std": [0.25], "newer_key": 1})
    assert old.invert is False and old.resize == "squash"                   # an older checkpoint's dict
    img = np.full((4, 4), 10, np.uint8)
    assert pre.image(img).tolist() == [[[245] * 4] * 4] and old.image(img, invert=True).equal(pre.image(img))
    assert torch.allclose(old.normalise(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)), torch.full((1, 1, 2, 2), 2.0))
    with pytest.raises(CnnlabError, match="resizes inputs by 'letterbox'"):
        Preprocess.from_dict({**pre.to_dict(), "resize": "letterbox"})
