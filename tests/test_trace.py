"""The tracer names parameters and buffers as torch.fx does."""
import torch
import torch.fx as fx
from torch import nn

from se_inject.trace import TraceOptions, trace_model


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight  # one parameter under two names
        self.gamma = nn.Parameter(torch.ones(3, 1, 1))
        self.register_buffer("scale", torch.full((3, 1, 1), 2.0))
        self.register_buffer("step", torch.zeros(()))

    def forward(self, x):
        self.step = self.step + 1  # a buffer replaced by a new tensor while running
        y = self.a(x) * self.gamma + self.b(x) * self.scale
        return y * self.gamma + self.step


def _get_attrs(graph: fx.Graph) -> list[str]:
    return [n.target for n in graph.nodes if n.op == "get_attr"]


def test_get_attr_nodes_match_plain_fx():
    model = _Shared()
    ours = _get_attrs(trace_model(model, TraceOptions(), n_inputs=1))
    theirs = _get_attrs(fx.symbolic_trace(_Shared()).graph)
    assert ours == theirs
    assert ours.count("gamma") == 1  # one node, used twice
    assert "scale" in ours and "step" in ours


def test_planning_leaves_every_buffer_as_it_was():
    # Inception-v3's BatchNormAct2d is traced alone once to see whether it hides a block; its
    # forward counts batches in place on its own buffer, which fx does not turn into a proxy
    import timm
    import se_inject
    from se_inject import trace
    trace._OPENS.clear()            # each class is tried once per process
    model = timm.create_model("inception_v3").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    se_inject.plan(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
