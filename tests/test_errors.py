"""Bad input: a clear SEInjectError, and the model left exactly as it was."""
import pytest
import torch
from torch import nn

import se_inject
from se_inject.errors import (InvalidArgumentError, NotGatedError, SEInjectError, TraceError)
from handwritten import BlockNet


def _untouched(model, keys):
    assert list(model.state_dict()) == keys
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(isinstance(m, se_inject.SEGate) for m in model.modules())


@pytest.mark.parametrize("ratio", [0, -4, 1.5, True, "16", None])
def test_ratio_must_be_a_positive_integer(ratio):
    model = BlockNet()
    keys = list(model.state_dict())
    with pytest.raises(InvalidArgumentError, match="ratio must be a positive integer"):
        se_inject.apply(model, ratio=ratio)
    _untouched(model, keys)


@pytest.mark.parametrize("thing", ["resnet50", None, {"weight": torch.zeros(1)}])
def test_model_must_be_a_module(thing):
    with pytest.raises(InvalidArgumentError, match="model must be a torch.nn.Module"):
        se_inject.apply(thing)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_is_refused():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(InvalidArgumentError, match="TorchScript"):
        se_inject.plan(scripted)


@pytest.mark.parametrize("kwargs,words", [
    ({"input_size": (3, 0, 32)}, "input_size must be"),
    ({"input_size": "224"}, "input_size must be"),
    ({"leaf_modules": [nn.Conv2d(1, 1, 1)]}, "give nn.Module classes"),
    ({"autowrap_functions": [3]}, "not callable"),
    ({"rules": 5}, "rules must be"),
    ({"rules": []}, "no rules given"),
])
def test_bad_options_are_refused(kwargs, words):
    model = BlockNet()
    keys = list(model.state_dict())
    with pytest.raises(SEInjectError, match=words):
        se_inject.apply(model, **kwargs)
    _untouched(model, keys)


def test_too_few_input_sizes_for_a_two_input_model():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, a, b):
            return self.c(a) + b

    with pytest.raises(TraceError, match="takes 2 tensor inputs"):
        se_inject.apply(TwoInputs())


def test_remove_on_a_plain_model():
    with pytest.raises(NotGatedError, match="holds no se-inject gates"):
        se_inject.remove(BlockNet())


def test_every_error_class_is_an_seinjecterror():
    import se_inject.errors as e
    for name in e.__all__:
        assert issubclass(getattr(e, name), SEInjectError)
