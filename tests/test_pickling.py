"""A gated model pickled whole (torch.save(model), multiprocessing) loads back gated: the same
outputs in both modes, the same gates, still removable. Its generated forwards are made again
from the code they were generated from, in this process and in a fresh one."""
import copy
import io
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import se_inject
from se_inject.calls import RECIPE
from se_inject.errors import NotPicklableError
from se_inject.fuse import fused_settings
from se_inject.rewrite import owner_state
from conftest import gates
from handwritten import (BlockNet, FunctionalInceptionNet, InlineResidualNet, ShortcutArgNet,
                         TrainingNet, branch, conv_bn)

pytestmark = pytest.mark.filterwarnings("ignore:.*sit in the forward of the model itself")


def _kinds(model: nn.Module) -> set[str]:
    """How the generated forwards in ``model`` were made: fx's code, and the wrappers around it."""
    kinds = set()

    def walk(fn):
        recipe = getattr(fn, "__dict__", {}).get(RECIPE)
        if recipe is not None and callable(fn):
            kinds.add(recipe[0])
            for a in recipe[1:]:
                if callable(a) and not isinstance(a, type):
                    walk(a)

    for m in model.modules():
        if "forward" in m.__dict__:
            walk(m.__dict__["forward"].__func__)
    return kinds


def _roundtrip(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _outputs(model: nn.Module, x: torch.Tensor) -> dict[bool, torch.Tensor]:
    """Outputs in eval and training mode, the model left as it was (its norms' statistics)."""
    out = {}
    for training in (False, True):
        twin = copy.deepcopy(model).train(training)
        torch.manual_seed(0)  # the same masks, where a mode draws any
        with torch.no_grad():
            out[training] = twin(x)
    return out


# Each model brings a kind of generated forward: fx's code alone ("code"), one per training
# mode ("dispatch"), behind a check of the attributes it was traced with ("guard"), or behind
# the block's own signature, for a block its parent calls with more than one tensor
# ("signature").
CASES = {
    "block_net": (BlockNet, {"code"}),
    "inline_residual": (InlineResidualNet, {"code"}),
    # its block calls F.max_pool2d, which pickle cannot find by its qualified name
    # (boolean_dispatch.<locals>.fn): the block's record of its gates names it all the same
    "functional_inception": (FunctionalInceptionNet, {"code"}),
    "training_net": (TrainingNet, {"code", "dispatch"}),
    "shortcut_arg_net": (ShortcutArgNet, {"code", "signature"}),
    "timm_resnet18": (lambda: timm.create_model("resnet18", drop_path_rate=0.1,
                                                zero_init_last=False), {"code", "guard"}),
    "timm_dla34": (lambda: timm.create_model("dla34"), {"code", "signature"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_gated_model_pickled_whole_loads_back_gated(name):
    make, kinds = CASES[name]
    torch.manual_seed(0)
    plain = make().eval()
    model = make()
    model.load_state_dict(plain.state_dict())
    se_inject.apply(model)
    assert kinds <= _kinds(model)  # the kinds this case is here for
    x = torch.randn(2, 3, 64, 64)
    expected = _outputs(model, x)
    before = _outputs(plain, x)
    assert not torch.allclose(expected[False], before[False])  # the gates act

    loaded = _roundtrip(model)
    assert type(loaded) is type(model)
    assert [n for n, _ in gates(loaded)] == [n for n, _ in gates(model)]
    assert list(loaded.state_dict()) == list(model.state_dict())
    got = _outputs(loaded, x)
    for training in (False, True):
        assert torch.equal(got[training], expected[training]), training
    # Each block's forward runs on the block it was loaded with, not on the pickled one.
    for m in loaded.modules():
        if "forward" in m.__dict__:
            assert m.__dict__["forward"].__self__ is m
    # each block's record of where its gates sit (what re-gating and planning read), the same
    # functions among its keys
    states = {n: owner_state(m) for n, m in model.named_modules() if owner_state(m)}
    assert states and {n: owner_state(m) for n, m in loaded.named_modules()
                       if owner_state(m)} == states
    again = _roundtrip(loaded)  # what was loaded pickles again
    assert torch.equal(_outputs(again, x)[False], expected[False])

    se_inject.remove(loaded)
    assert not gates(loaded) and list(loaded.state_dict()) == list(plain.state_dict())
    assert torch.equal(_outputs(loaded, x)[False], before[False])


def test_a_gated_model_loads_in_a_fresh_process(tmp_path):
    """Nothing of the process that pickled it (se-inject's cache of compiled code, the source
    lines kept for tracebacks) is needed where it is loaded."""
    torch.manual_seed(0)
    model = ShortcutArgNet()
    se_inject.apply(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    torch.save(model, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(x), {str(tmp_path / 'y.pt')!r})\n"
        "import se_inject\n"
        "print(len([g for g in m.modules() if isinstance(g, se_inject.ChannelGate)]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2"]
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def _outputs_in_child(model, x, queue):
    with torch.no_grad():
        queue.put(model.eval()(x).numpy())


def test_a_gated_model_passed_to_a_spawned_process_runs_gated_there():
    """multiprocessing's pickler has a reduction for bound methods of its own (a name to look
    up, as pickle's), which se-inject's must replace there too."""
    torch.manual_seed(0)
    model = ShortcutArgNet()
    se_inject.apply(model)
    x = torch.randn(2, 3, 32, 32)
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_outputs_in_child, args=(model, x, queue))
    child.start()
    try:
        got = queue.get(timeout=240)
    finally:
        child.join(timeout=60)
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(got), model.eval()(x))
    assert child.exitcode == 0


def test_a_pickled_fused_model_loads_eager_and_says_so():
    """nn.Module leaves its compiled call out of a pickle: the loaded model runs eagerly, and
    se-inject does not report it as fused."""
    torch.manual_seed(0)
    model = BlockNet()
    se_inject.apply(model)
    model.eval()
    se_inject.fuse(model)
    assert fused_settings(model) is not None
    loaded = _roundtrip(model)
    assert fused_settings(loaded) is None
    assert loaded.__dict__.get("_compiled_call_impl") is None
    x = torch.randn(2, 3, 32, 32)
    se_inject.unfuse(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _made_inside():
    def scaled(x):
        return x * 1.0
    return scaled


_local_scale = _made_inside()  # a function whose name does not say where to import it from
fx.wrap("_local_scale")


class _LocalCallBlock(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.conv = branch(c)

    def forward(self, x):
        return F.relu(x + _local_scale(self.conv(x)))


class _LocalCallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.block = _LocalCallBlock()

    def forward(self, x):
        return self.block(F.relu(self.stem(x))).mean((2, 3))


def test_a_forward_calling_a_function_pickle_cannot_name_is_refused_at_saving():
    model = _LocalCallNet()
    se_inject.apply(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = model.eval()(x)
    buf = io.BytesIO()
    with pytest.raises(NotPicklableError) as info:
        torch.save(model, buf)
    assert isinstance(info.value, se_inject.SEInjectError)
    assert isinstance(info.value, pickle.PicklingError)
    message = str(info.value)
    assert "_LocalCallBlock" in message and "state_dict" in message
    with torch.no_grad():  # the model is as it was, and copies as before
        assert torch.equal(model(x), y)
        assert torch.equal(copy.deepcopy(model)(x), y)
    assert torch.equal(torch.load(io.BytesIO(_state_bytes(model)))["block.se_gate.fc1.weight"],
                       model.block.se_gate.fc1.weight)


def _state_bytes(model):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def test_other_bound_methods_pickle_as_before():
    """The reduction se-inject registers for bound methods hands every method that is not a
    generated forward to pickle's own: a name looked up on the object when loading."""

    joined = pickle.loads(pickle.dumps(Path("/tmp").joinpath))
    assert joined("a") == Path("/tmp/a")
    counter = _Counter()
    restored = pickle.loads(pickle.dumps(counter.bump))
    assert restored() == 1 and restored.__func__ is _Counter.bump


class _Counter:
    def __init__(self):
        self.n = 0

    def bump(self):
        self.n += 1
        return self.n
