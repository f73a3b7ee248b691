"""csv:FILE, a labels file of path,label[,split] rows: splits as marked, bad rows by line number,
end to end (train, evaluate, predict, data check)."""
import os

import numpy as np
import pytest
from PIL import Image

import cnnlab
from cnnlab.config import DataConfig
from cnnlab.data import load_data, resolve_name
from cnnlab.errors import CnnlabError

from .conftest import FAULT_REPORT, ROOT, run_cli


def make_photos(root, n=12, size=(20, 16)):
    """Red 'cat' and blue 'dog' PNGs under root/cat and root/dog; returns their relative paths by class."""
    rng = np.random.default_rng(0)
    made = {}
    for cls, colour in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
        os.makedirs(root / cls, exist_ok=True)
        for i in range(n):
            pixels = (np.array(colour) + rng.integers(-30, 30, (size[1], size[0], 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
            made.setdefault(cls, []).append(f"{cls}/{i}.png")
    return made


def write_csv(path, rows, header="path,label,split"):
    path.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return path


@pytest.fixture
def photos(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path, make_photos(tmp_path)


def test_split_column_decides_val_and_test(photos):
    tmp, made = photos
    split = lambda i: "test" if i % 4 == 0 else "val" if i % 4 == 1 else ""   # 3 test, 3 val, 6 cnnlab's per class
    rows = [(p, cls, split(i)) for cls, paths in made.items() for i, p in enumerate(paths)]
    data = load_data(DataConfig(data=f"csv:{write_csv(tmp / 'labels.csv', rows)}", image_size=12))
    marked = lambda s: {p for p, _, sp in rows if sp == s}
    assert set(data.splits["files"]["test"]) == marked("test")
    assert set(data.splits["files"]["val"]) == marked("val")
    assert set(data.splits["files"]["train"]) == marked("")      # no val cut from them: val was named
    assert data.classes == ["cat", "dog"] and data.shape == (3, 12, 12)
    red = data.train[0][data.train[1] == 0].float()
    assert (red[:, 0].mean() > red[:, 2].mean() + 50).item()          # cats are red: labels follow their rows


def test_without_split_column_cnnlab_cuts_the_splits(photos):
    tmp, made = photos
    rows = [(p, cls) for cls, paths in made.items() for p in paths]
    labels = str(write_csv(tmp / "labels.csv", rows, "path,label"))
    assert resolve_name(labels) == f"csv:{labels}"                        # a bare .csv path is claimed
    data = load_data(DataConfig(data=labels, image_size=12, val_fraction=0.25, test_fraction=0.25))
    assert sum(len(getattr(data, s)[1]) for s in ("train", "val", "test")) == 24
    assert len(data.test[1]) == 6 and len(data.val[1]) == 4


def test_one_bad_row_is_named_with_its_line(photos):
    tmp, made = photos
    rows = [(p, cls, "") for cls, paths in made.items() for p in paths]
    rows[4] = ("cat/missing.png", "cat", "")
    with pytest.raises(CnnlabError) as e:
        load_data(DataConfig(data=f"csv:{write_csv(tmp / 'labels.csv', rows)}"))
    assert str(e.value) == "labels.csv line 6: no such file 'cat/missing.png'. Fix or remove these rows."
    FAULT_REPORT.append("csv: a row naming a missing file -> one line naming labels.csv line 6")


def test_many_bad_rows_show_the_first_few_and_a_count(photos):
    tmp, made = photos
    rows = [(p, cls, "") for cls, paths in made.items() for p in paths]
    rows[0] = ("", "cat", "")
    rows[1] = (made["cat"][1], "", "")
    rows[2] = (made["cat"][2], "cat", "holdout")
    rows[3] = (made["cat"][4], "cat", "")                                # listed twice (line 7 is the first)
    rows[5] = ("labels.csv", "cat", "")
    with pytest.raises(CnnlabError) as e:
        load_data(DataConfig(data=f"csv:{write_csv(tmp / 'labels.csv', rows)}"))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("labels.csv line 2: no path; line 3: no label for 'cat/1.png'; line 4: split 'holdout'")
    assert message.endswith("(and 2 more bad rows). Fix or remove these rows.")
    FAULT_REPORT.append("csv: 5 bad rows (empty path, empty label, unknown split, duplicate, not an image) -> "
                        "one line: the first 3 with line numbers, and 2 more counted")


def test_a_header_without_path_and_label_is_refused(photos):
    tmp, _ = photos
    with pytest.raises(CnnlabError, match=r"labels.csv line 1: the header must name the columns path,label .* it has "
                                          r"file, class"):
        load_data(DataConfig(data=f"csv:{write_csv(tmp / 'labels.csv', [('cat/0.png', 'cat')], 'file,class')}"))


def test_numeric_labels_sort_as_numbers(photos):
    from cnnlab.data.csvsource import class_names

    assert class_names(["10", "2", "1"]) == ["1", "2", "10"]
    assert class_names(["b", "a", "10"]) == ["10", "a", "b"]


def test_csv_end_to_end_train_evaluate_predict_check(photos):
    tmp, made = photos
    rows = [(p, cls, "test" if i < 3 else "") for cls, paths in made.items() for i, p in enumerate(paths)]
    labels = write_csv(tmp / "labels.csv", rows)
    result = cnnlab.train(data=str(labels), model="lenet5", image_size=16, epochs=2, batch_size=8,
                          out=str(tmp / "run"), report=False, quiet=True)
    assert result.summary["splits"]["test"] == 6 and result.summary["data"] == f"csv:{labels}"
    evaluated = cnnlab.evaluate(result.run_dir)
    assert evaluated["accuracy"] == pytest.approx(result.summary["test_acc"])
    top = cnnlab.load(result.run_dir).predict([str(tmp / made["cat"][0])], top_k=1)
    assert top[0][0]["label"] in ("cat", "dog")
    env = {"PYTHONPATH": ROOT, "CNNLAB_CACHE": str(tmp / "cache")}   # this worktree's cnnlab in the subprocess
    check = run_cli("data", "check", f"csv:{labels}", cwd=tmp, env=env)
    assert check.returncode == 0, check.stderr
    assert "cat" in check.stdout and "unreadable files: 0" in check.stdout
