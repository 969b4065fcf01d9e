"""A gated block's other forward methods (``forward_*``, as timm names them): rewritten with
its forward where they compute what it computes up to every gated site, so that calling them
directly runs the gates too; left as they are, with a warning that names them, where not."""
import copy
import pickle
import warnings

import timm
import torch
import torch.nn.functional as F
from torch import nn

import se_inject
from conftest import gates, paper_reference, randomize_norms


def conv_bn_relu(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class TapBlock(nn.Module):
    """A residual block with a forward that also returns a tensor from inside the branch
    (xception's ``forward_with_tap``), one that computes otherwise, and one that stops
    before the sum."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.a = conv_bn_relu(c)
        self.b = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.n = nn.BatchNorm2d(c)

    def _end(self, t):
        return self.n(self.b(t))

    def forward(self, x):
        return F.relu(x + self._end(self.a(x)))

    def forward_with_tap(self, x):
        t = self.a(x)
        return F.relu(x + self._end(t)), t

    def forward_scaled(self, x):  # the branch halved before the sum
        return F.relu(x + 0.5 * self._end(self.a(x)))

    def forward_branch(self, x):  # the branch alone: no sum, no gated site
        return self._end(self.a(x))


class TapNet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(TapBlock(c), TapBlock(c))
        self.head = nn.Linear(c, 10)

    def forward_features(self, x):
        return self.blocks(self.stem(x))

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _apply(model, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        se_inject.apply(model, input_size=(3, 16, 16), **kwargs)
    return [str(w.message) for w in caught]


def test_a_forward_method_computing_what_the_forward_computes_runs_the_gates():
    """Before, ``forward_with_tap`` ran the class's code: the block without its gate."""
    model = TapNet().eval()
    randomize_norms(model)
    plain = copy.deepcopy(model)
    messages = _apply(model)
    blk, plain_blk = model.blocks[0], plain.blocks[0]
    x = model.stem(torch.randn(2, 3, 16, 16))
    with torch.no_grad():
        out, tap = blk.forward_with_tap(x)
        expected = F.relu(x + paper_reference(blk.n(blk.b(tap)), blk.se_gate))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(out, blk(x))
        assert torch.equal(tap, plain_blk.a(x))
        assert not torch.allclose(out, plain_blk(x), atol=1e-3)  # the gate acts
        # the others compute what they computed
        assert torch.equal(blk.forward_scaled(x), plain_blk.forward_scaled(x))
        assert torch.equal(blk.forward_branch(x), plain_blk.forward_branch(x))
    [left] = messages
    assert left.startswith("2 method(s) of gated blocks were left as they are") and \
        "TapBlock.forward_scaled of `blocks.0`, `blocks.1`: it computes otherwise than the " \
        "forward before the gated sites" in left
    assert "forward_branch" not in left and "forward_head" not in left

    model.train()  # gradients reach the gate through the method
    blk.forward_with_tap(x.detach())[0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blk.se_gate.parameters())

    model.eval()  # (the training step moved the norms' statistics)
    with torch.no_grad():
        out = blk.forward_with_tap(x)[0]
        twin = pickle.loads(pickle.dumps(model))
        assert torch.equal(twin.blocks[0].forward_with_tap(x)[0], out)
        se_inject.remove(model)
        assert torch.equal(blk.forward_with_tap(x)[0], blk(x))  # both the class's again
    assert not [k for k in vars(blk) if k.startswith("forward")]


class InlineFeatures(nn.Module):
    """Residual blocks written inline in the model's forward_features, which forward calls."""

    def __init__(self, c: int = 16, pool: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a, self.b = conv_bn_relu(c), conv_bn_relu(c)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.head = nn.Linear(c, 10)

    def forward_features(self, x):
        x = self.stem(x)
        x = self.pool(F.relu(x + self.a(x)))
        return F.relu(x + self.b(x))

    def forward_head(self, x):
        return self.head(x.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_a_models_forward_features_runs_the_gates_of_its_own_forward():
    model = InlineFeatures().eval()
    plain = copy.deepcopy(model)
    messages = _apply(model)
    assert len(gates(model)) == 2
    [own] = messages
    assert "2 gate(s) sit in the forward of the model itself (InlineFeatures): calling the " \
        "model runs them (its forward_features as well, rewritten with its forward)" in own
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        f = model.forward_features(x)
        assert torch.equal(model.forward_head(f), model(x))
        assert not torch.allclose(f, plain.forward_features(x), atol=1e-3)


def test_a_forward_method_keeps_up_with_the_gates_of_a_second_apply():
    """apply() on a gated model that adds gates to a block holding some (here the model,
    whose forward holds its blocks) rewrites its methods again, with every gate."""
    model = InlineFeatures(pool=True).eval()
    _apply(model, stages=[0])
    _apply(model, stages=[1])
    assert len(gates(model)) == 2
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(x)), model(x))
        se_inject.remove(model)
    assert "forward_features" not in vars(model)


def test_xception_forward_intermediates_runs_the_gates():
    """timm's Xception taps features inside its strided blocks through their
    ``forward_with_tap``; forward_intermediates calls it. Before, its final features were those
    of a model whose strided blocks held no gate."""
    model = timm.create_model("xception41", pretrained=False).eval()
    randomize_norms(model)
    se_inject.apply(model, input_size=(3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert len(taps) == 5 and torch.equal(taps[-1], model.blocks(model.stem(x)))


class AliasBlock(TapBlock):
    """Methods reaching the layers before the gate without naming them as the forward does:
    through a second name of the same layer, and by getattr."""

    def __init__(self, c: int = 16):
        super().__init__(c)
        # the same modules, registered under second names
        self.first, self.second, self.norm = self.a, self.b, self.n

    def forward_alias(self, x):
        return F.relu(x + self.norm(self.second(self.first(x))))

    def forward_lookup(self, x):
        layers = [getattr(self, k) for k in "abn"]
        return F.relu(x + layers[2](layers[1](layers[0](x))))


def test_a_method_is_traced_unless_it_names_nothing_the_forward_reads_before_its_gates(
        monkeypatch):
    """A forward_* method that names no layer the forward reads up to its gated sites cannot
    reach them, and is passed by without a trace (timm's forward_head, traced alone as the
    whole head before); one that reaches those layers by another name is traced and gated."""
    import se_inject.rewrite as rewrite
    traced = []
    trace_block = rewrite.trace_block

    def counting(owner, *args, **kwargs):
        traced.append((type(owner).__name__, kwargs.get("method", args[4] if len(args) > 4
                                                         else "forward")))
        return trace_block(owner, *args, **kwargs)

    monkeypatch.setattr(rewrite, "trace_block", counting)
    model = InlineFeatures().eval()
    _apply(model)
    assert ("InlineFeatures", "forward_features") in traced
    assert ("InlineFeatures", "forward_head") not in traced

    traced.clear()
    block = AliasBlock().eval()
    randomize_norms(block)
    plain = copy.deepcopy(block)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        se_inject.apply(block, input_size=(16, 8, 8))
    [left] = [str(w.message) for w in caught if "left as they are" in str(w.message)]
    assert "forward_scaled" in left  # as in TapBlock
    assert "forward_alias" not in left and "forward_lookup" not in left
    for name in ("forward_alias", "forward_lookup"):
        assert ("AliasBlock", name) in traced and name in vars(block)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        out = block(x)
        assert not torch.allclose(out, plain(x), atol=1e-3)  # the gate acts
        assert torch.equal(block.forward_alias(x), out)
        assert torch.equal(block.forward_lookup(x), out)
