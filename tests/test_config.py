import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnlab.config import FIELD_TYPES, DataConfig, TrainConfig, load_yaml, make_config, parse_scalar
from cnnlab.errors import UsageError


def test_defaults_are_valid():
    cfg = make_config()
    assert cfg.data == "mnist-5k" and cfg.model == "mnist_cnn"


def test_the_data_part_is_data_only():
    """data/ gets a DataConfig: the data fields with the same defaults and values, no training setting."""
    import dataclasses

    assert TrainConfig().data_config() == DataConfig()
    cfg = make_config({"data": "cifar10", "classes": "airplane,bird", "seed": 3, "image_size": 40, "lr": 0.5})
    part = cfg.data_config()
    assert type(part) is DataConfig and (part.data, part.classes, part.seed, part.image_size) == (
        "cifar10", ["airplane", "bird"], 3, 40)
    names = {f.name for f in dataclasses.fields(DataConfig)}
    assert names < set(FIELD_TYPES) and not names & {"lr", "epochs", "model", "augment", "batch_size", "device"}


def test_unknown_key_names_the_closest():
    with pytest.raises(UsageError, match="Did you mean 'batch_size'"):
        make_config({"bach_size": 32})


@pytest.mark.parametrize("key,value", [("epochs", 0), ("batch_size", -1), ("lr", 0), ("val_fraction", 1.5),
                                       ("label_smoothing", 1.0), ("ema", 1.0)])
def test_out_of_range_values_are_refused(key, value):
    with pytest.raises(UsageError, match=key):
        make_config({key: value})


@pytest.mark.parametrize("key,value", [("epochs", "ten"), ("lr", "fast"), ("nesterov", "maybe"), ("model_args", 3),
                                       ("epochs", "²"), ("epochs", "--3"), ("lr", "nan"), ("weight_decay", "nan"),
                                       ("momentum", math.inf), ("gamma", "1e999")])
def test_wrong_types_are_refused(key, value):
    with pytest.raises(UsageError, match=key):
        make_config({key: value})


def test_unknown_choice_suggests_closest():
    with pytest.raises(UsageError, match="Did you mean 'sgd'"):
        make_config({"optimizer": "sgdd"})


def test_step_schedule_needs_step_epochs():
    with pytest.raises(UsageError, match="step_epochs"):
        make_config({"schedule": "step"})


def test_every_recipe_loads():
    import glob
    import os

    recipes = glob.glob(os.path.join(os.path.dirname(__file__), "..", "cnnlab", "recipes", "*.yaml"))
    assert recipes, "no recipes found"
    for path in recipes:
        assert isinstance(make_config(load_yaml(path)), TrainConfig), path


def test_recipe_with_unknown_key_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(UsageError, match="learning_rate"):
        make_config(load_yaml(path))


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="mapping"):
        load_yaml(path)


values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(FIELD_TYPES) + ["bogus", "lr_rate"]), values, max_size=4))
def test_config_parsing_never_crashes(overrides):
    """Any mapping either gives a valid config or a UsageError, never another exception."""
    from .conftest import FAULT_REPORT

    if "random configurations: 300 hypothesis examples, each valid or one UsageError" not in FAULT_REPORT:
        FAULT_REPORT.append("random configurations: 300 hypothesis examples, each valid or one UsageError")
    try:
        cfg = make_config(overrides)
    except UsageError as e:
        assert str(e)
    else:
        assert cfg.epochs > 0 and cfg.batch_size > 0


BOOL_WORDS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}


@st.composite
def bool_spellings(draw):
    """(text, meaning): a yes/no word in random case, maybe padded, as people and YAML write it."""
    word = draw(st.sampled_from(sorted(BOOL_WORDS)))
    upper = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    pad = draw(st.sampled_from(["", " ", "\t"]))
    return pad + "".join(c.upper() if u else c for c, u in zip(word, upper)) + pad, BOOL_WORDS[word]


not_a_bool_word = st.text(max_size=8).filter(lambda s: s.strip().lower() not in BOOL_WORDS)


@given(bool_spellings())
def test_boolean_settings_read_every_spelling(case):
    text, meaning = case
    assert make_config({"nesterov": text}).nesterov is meaning


@given(not_a_bool_word)
def test_other_text_is_not_a_boolean(text):
    with pytest.raises(ValueError):
        parse_scalar(bool, text)


@given(st.text(alphabet=" 0123456789+-.e²٣", max_size=6))
def test_whole_numbers_parse_and_other_text_is_refused(text):
    """ASCII digits with an optional sign give that number; "2.5", "--3", "1e3" are refused (and
    "²", which str.isdigit() calls a digit, no longer crashes the parser)."""
    if re.fullmatch(r"\s*[+-]?[0-9]+\s*", text):
        assert parse_scalar(int, text) == int(text)
    elif not re.fullmatch(r"\s*[+-]?[0-9٣]+\s*", text):   # Python's int() also reads other scripts' digits
        with pytest.raises(ValueError):
            parse_scalar(int, text)


@given(st.integers(-10**12, 10**12))
def test_integers_parse_from_numbers_and_text(n):
    assert parse_scalar(int, n) == parse_scalar(int, str(n)) == parse_scalar(int, float(n)) == n


@given(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()))
def test_fractions_are_not_whole_numbers(x):
    with pytest.raises(ValueError):
        parse_scalar(int, x)
    with pytest.raises(ValueError):
        parse_scalar(int, repr(x))


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_finite_floats_parse_from_numbers_and_text(x):
    assert parse_scalar(float, x) == parse_scalar(float, repr(x)) == x


@given(st.sampled_from([math.nan, math.inf, -math.inf, "nan", "NaN", "inf", "-Infinity", "1e999"]))
def test_non_finite_floats_are_refused(value):
    """nan would pass the `< 0` range check of every non-negative setting."""
    with pytest.raises(UsageError, match="weight_decay"):
        make_config({"weight_decay": value})


@given(st.booleans(), st.sampled_from([int, float]))
def test_yes_and_no_are_not_numbers(flag, kind):
    with pytest.raises(ValueError):
        parse_scalar(kind, flag)


# ---- bounds of the settings that trained silently wrong or crashed outside the config (issue 23) ----

@given(st.floats(allow_nan=False, allow_infinity=False))
def test_gamma_is_a_factor_in_zero_to_one(gamma):
    """gamma -1 made the step schedule's LR negative (gradient ascent)."""
    if 0 < gamma <= 1:
        assert make_config({"gamma": gamma}).gamma == gamma
    else:
        with pytest.raises(UsageError, match="'gamma'.*in \\(0, 1\\]"):
            make_config({"gamma": gamma})


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_momentum_is_in_zero_to_one(momentum):
    """momentum 5 made SGD's updates grow without bound."""
    if 0 <= momentum < 1:
        assert make_config({"momentum": momentum}).momentum == momentum
    else:
        with pytest.raises(UsageError, match="'momentum'.*\\[0, 1\\)"):
            make_config({"momentum": momentum})


@given(st.integers(1, 1000), st.floats(0, 1e308))
def test_warmup_may_not_outlast_the_run(epochs, warmup):
    """warmup_epochs 1e308 kept the LR near zero for the whole run."""
    if warmup <= epochs:
        assert make_config({"epochs": epochs, "warmup_epochs": warmup}).warmup_epochs == warmup
    else:
        with pytest.raises(UsageError, match=f"'warmup_epochs'.*'epochs' \\({epochs}\\)"):
            make_config({"epochs": epochs, "warmup_epochs": warmup})


INT_KEYS = sorted(k for k, kind in FIELD_TYPES.items() if kind is int)


@given(st.sampled_from(INT_KEYS), st.integers(0, 2**80))
def test_whole_numbers_are_bounded(key, value):
    """seed 1e20 (a YAML float) overflowed torch.manual_seed with an internal error; image_size 10**6
    allocated until the process was killed. Each int setting has a stated ceiling."""
    from cnnlab.config import MAX_INT, MAXIMUM

    ceiling = MAXIMUM.get(key, MAX_INT)
    base = {"epochs": 10**6} if key == "warmup_epochs" else {}
    if key == "freeze_epochs":   # a freeze may not outlast the run (test_finetune): the longest run allows any
        base = {"epochs": MAX_INT}
    if key in ("epochs", "batch_size", "eval_batch_size"):
        value = max(value, 1)
    if value <= ceiling:
        assert getattr(make_config({**base, key: value}), key) == value
    else:
        with pytest.raises(UsageError, match=f"'{key}' must be at most {ceiling}"):
            make_config({**base, key: value})


def test_the_reported_values_are_refused():
    """The exact values of the issue: each one line naming the setting."""
    for key, value in (("seed", 1e20), ("image_size", 10**6), ("gamma", -1), ("momentum", 5),
                       ("warmup_epochs", 1e308)):
        with pytest.raises(UsageError, match=f"'{key}'"):
            make_config({key: value})


@pytest.mark.parametrize("content", [bytes(range(256)), "epochs: 2\n".encode("utf-16"), b"\x89PNG\r\n\x1a\n\0\0"],
                         ids=["all-bytes", "utf-16", "png-header"])
def test_binary_config_files_get_one_line(tmp_path, content):
    """A binary or non-UTF-8 --config was an internal UnicodeDecodeError."""
    path = tmp_path / "weights.yaml"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="weights.yaml"):
        load_yaml(path)


def test_a_folder_as_config_gets_one_line(tmp_path):
    with pytest.raises(UsageError, match="cannot read config file"):
        load_yaml(tmp_path)


@pytest.mark.parametrize("settings,expected", [
    ({"optimizer": "adam", "nesterov": True}, ["--nesterov acts on --optimizer sgd only; adam ignores it."]),
    ({"optimizer": "adamw", "momentum": 0.5, "nesterov": True},
     ["--momentum 0.5 and --nesterov act on --optimizer sgd only; adamw ignores them."]),
    ({"optimizer": "sgd", "nesterov": True, "momentum": 0.0}, ["--nesterov needs --momentum above 0; this run is plain SGD."]),
    ({"schedule": "cosine", "step_epochs": 3, "gamma": 0.5},
     ["--step-epochs 3 and --gamma 0.5 act on --schedule step only; cosine ignores them."]),
    ({"optimizer": "sgd", "momentum": 0.5, "nesterov": True, "schedule": "step", "step_epochs": 2}, []),
    ({"augment": "flip", "crop_padding": 3, "crop_padding_mode": "reflect"},
     ["--crop-padding 3 and --crop-padding-mode reflect act on --augment crop only; --augment flip ignores them."]),
    ({"augment": "randaugment", "crop_padding_mode": "reflect"}, []),
    ({"resize": "crop", "image_size": 64, "augment": "crop+flip", "crop_padding": 4},
     ["--crop-padding 4 acts on the shifts of --augment crop only; --resize crop (random-resized crops) ignores it."]),
    ({"resize": "crop", "augment": "crop", "crop_padding": 4}, []),   # no --image-size: nothing stored larger
    ({}, [])])
def test_settings_the_run_ignores_are_named(settings, expected):
    """`--optimizer adam --momentum 0.5` trained without a word that the momentum did nothing."""
    from cnnlab.config import ignored_settings

    assert ignored_settings(make_config(settings)) == expected
