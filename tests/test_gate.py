"""The gate is the paper's block, Eq. 2-4."""
import pytest
import torch

from se_inject import SEGate
from conftest import paper_reference


@pytest.mark.parametrize("channels,ratio,expected", [(256, 16, 16), (2048, 16, 128), (64, 16, 4),
                                                     (24, 16, 1), (8, 32, 1), (100, 3, 33)])
def test_reduced_width_is_c_over_r(channels, ratio, expected):
    g = SEGate(channels, ratio)
    assert g.fc1.weight.shape == (expected, channels, 1, 1)
    assert g.fc2.weight.shape == (channels, expected, 1, 1)
    assert g.fc1.bias.shape == (expected,) and g.fc2.bias.shape == (channels,)


@pytest.mark.parametrize("shape", [(2, 32, 7, 7), (1, 64, 1, 1), (3, 16, 5, 9)])
def test_gate_equals_paper_equations(shape):
    g = SEGate(shape[1], 4)
    with torch.no_grad():  # non-trivial biases so every term of Eq. 3 matters
        g.fc1.bias.normal_()
        g.fc2.bias.normal_()
    u = torch.randn(shape)
    torch.testing.assert_close(g(u), paper_reference(u, g), rtol=1e-5, atol=1e-6)


def test_gate_scales_each_channel_by_a_factor_in_0_1():
    g = SEGate(32, 8)
    u = torch.rand(2, 32, 6, 6) + 0.1
    s = g(u) / u
    # one factor per (sample, channel), constant over space, strictly between 0 and 1
    torch.testing.assert_close(s, s[:, :, :1, :1].expand_as(s))
    assert ((s > 0) & (s < 1)).all()


def _built_by_constructors(channels, rd, excite, **factory):
    return [torch.nn.Conv2d(channels, rd, kernel_size=1, bias=True, **factory),
            torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(rd, channels, kernel_size=1, bias=True, **factory), excite()]


@pytest.mark.parametrize("excite", ["sigmoid", "hard_sigmoid", "tanh"])
@pytest.mark.parametrize("channels,ratio,dtype", [(64, 16, torch.float32), (7, 2, torch.float64),
                                                  (300, 16, torch.bfloat16)])
def test_a_gate_s_layers_are_what_their_constructors_make(channels, ratio, excite, dtype):
    """A gate's layers are made from templates (se_inject.fresh): each has the attributes,
    the parameters and, from the same random numbers, the values torch's constructors give."""
    from se_inject.gate import GateSpec, make_gate
    classes = {"sigmoid": torch.nn.Sigmoid, "hard_sigmoid": torch.nn.Hardsigmoid,
               "tanh": torch.nn.Tanh}
    from se_inject import fresh
    fresh._TEMPLATES.clear()  # the first gate in a process makes the templates: no draws
    torch.manual_seed(5)
    first = make_gate(channels, ratio, GateSpec(excite=excite), dtype=dtype)
    g = make_gate(channels, ratio, GateSpec(excite=excite), dtype=dtype)  # from the templates
    after = torch.rand(3)
    torch.manual_seed(5)
    want_first = _built_by_constructors(channels, channels // ratio, classes[excite], dtype=dtype)
    want = _built_by_constructors(channels, channels // ratio, classes[excite], dtype=dtype)
    assert torch.equal(torch.rand(3), after)  # the same numbers drawn, no more
    for got, ref in [*zip([first.fc1, first.act, first.fc2, first.gate], want_first),
                     *zip([g.fc1, g.act, g.fc2, g.gate], want)]:
        assert type(got) is type(ref)
        assert repr(got) == repr(ref)
        assert vars(got).keys() == vars(ref).keys()
        for k, v in vars(ref).items():
            if k != "_parameters":
                assert vars(got)[k] == v and type(vars(got)[k]) is type(v), k
        assert got.state_dict().keys() == ref.state_dict().keys()
        for (name, p), q in zip(got.named_parameters(), ref.parameters()):
            assert type(p) is type(q) and p.requires_grad and p.dtype == dtype, name
            assert torch.equal(p, q), name


def test_gates_share_no_state_with_each_other():
    """A hook, a buffer or a parameter given to one gate's layer is that layer's alone."""
    a, b = SEGate(32, 4), SEGate(32, 4)
    a.fc1.register_forward_hook(lambda *args: None)
    a.act.register_buffer("seen", torch.zeros(1))
    a.fc2.weight.data.zero_()
    assert not b.fc1._forward_hooks and not dict(b.act.named_buffers())
    assert b.fc2.weight.abs().sum() > 0
    assert a.fc1.weight.data_ptr() != b.fc1.weight.data_ptr()
    assert b._modules.keys() == {"fc1", "act", "fc2", "gate"}
    from se_inject.fresh import fresh  # a layer with parameters is constructed, not copied
    c, d = fresh(torch.nn.Conv2d, 4, 4, 1), fresh(torch.nn.Conv2d, 4, 4, 1)
    assert c.weight.data_ptr() != d.weight.data_ptr() and c.bias is not d.bias


def test_a_watcher_of_new_parameters_sees_every_gate_layer_made():
    """Where torch's global registration hooks watch new layers (a library that places
    parameters itself), a gate's layers are made by their constructors, which call them."""
    from torch.nn.modules.module import register_module_parameter_registration_hook
    seen = []
    handle = register_module_parameter_registration_hook(
        lambda module, name, p: seen.append((type(module).__name__, name, tuple(p.shape))))
    try:
        SEGate(64, 16)
    finally:
        handle.remove()
    assert seen == [("Conv2d", "weight", (4, 64, 1, 1)), ("Conv2d", "bias", (4,)),
                    ("Conv2d", "weight", (64, 4, 1, 1)), ("Conv2d", "bias", (64,))]


def test_a_gate_is_made_on_the_device_a_torch_device_context_names():
    with torch.device("meta"):
        g = SEGate(64, 16)
    assert all(p.is_meta for p in g.parameters())
