import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnlab.config import FIELD_TYPES, TrainConfig, load_yaml, make_config
from cnnlab.errors import UsageError


def test_defaults_are_valid():
    cfg = make_config()
    assert cfg.data == "mnist-5k" and cfg.model == "mnist_cnn"


def test_unknown_key_names_the_closest():
    with pytest.raises(UsageError, match="Did you mean 'batch_size'"):
        make_config({"bach_size": 32})


@pytest.mark.parametrize("key,value", [("epochs", 0), ("batch_size", -1), ("lr", 0), ("val_fraction", 1.5),
                                       ("label_smoothing", 1.0), ("ema", 1.0)])
def test_out_of_range_values_are_refused(key, value):
    with pytest.raises(UsageError, match=key):
        make_config({key: value})


@pytest.mark.parametrize("key,value", [("epochs", "ten"), ("lr", "fast"), ("nesterov", "maybe"), ("model_args", 3)])
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
