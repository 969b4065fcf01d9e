"""Hand-written CNNs that hide their blocks in the code shapes people actually write."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin, cout, k=3, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


def branch(c):
    """conv-bn-relu-conv-bn: a residual branch (one conv and a norm alone would be a
    re-parameterisable sum, which the residual rule leaves alone)."""
    return nn.Sequential(*conv_bn(c, c), nn.ReLU(), *conv_bn(c, c))


class InlineResidualNet(nn.Module):
    """Three residual blocks written inline in the top-level forward: +, += and torch.add."""

    def __init__(self, width=32, classes=10):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.a1, self.a2 = conv_bn(width, width), conv_bn(width, width)
        self.b1, self.b2 = conv_bn(width, width), conv_bn(width, width)
        self.c1 = conv_bn(width, 2 * width, stride=2)
        self.c2 = conv_bn(2 * width, 2 * width)
        self.proj = conv_bn(width, 2 * width, k=1, stride=2)
        self.head = nn.Linear(2 * width, classes)

    def branch_a(self, x):
        return self.a2(F.relu(self.a1(x)))

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.branch_a(x))                     # operator +
        y = self.b2(F.relu(self.b1(x)))
        y += x                                               # +=
        x = F.relu(y)
        x = F.relu(torch.add(self.proj(x), self.c2(F.relu(self.c1(x)))))  # torch.add, projection
        return self.head(x.mean((2, 3)))


class FunctionalInception(nn.Module):
    """An inception module built from F.conv2d and raw parameters, with a pooling branch."""

    def __init__(self, cin=16, c=8):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(c, cin, 1, 1) * 0.1)
        self.w3a = nn.Parameter(torch.randn(c, cin, 1, 1) * 0.1)
        self.w3b = nn.Parameter(torch.randn(2 * c, c, 3, 3) * 0.1)
        self.wp = nn.Parameter(torch.randn(c, cin, 1, 1) * 0.1)
        self.out_channels = 4 * c

    def forward(self, x):
        b1 = F.relu(F.conv2d(x, self.w1))
        b3 = F.relu(F.conv2d(F.relu(F.conv2d(x, self.w3a)), self.w3b, padding=1))
        bp = F.relu(F.conv2d(F.max_pool2d(x, 3, 1, 1), self.wp))
        return torch.cat([b1, b3, bp], dim=1)


class FunctionalInceptionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mix1 = FunctionalInception(16, 8)
        self.mix2 = FunctionalInception(32, 8)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.mix2(self.mix1(F.relu(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride=1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, mid, 1), nn.ReLU(), conv_bn(mid, mid, 3, stride),
                                  nn.ReLU(), conv_bn(mid, cout, 1))
        self.short = conv_bn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        s = x if self.short is None else self.short(x)
        return F.relu(self.body(x) + s)


class BlockNet(nn.Module):
    """Residual blocks as modules: Sequential branch, projection shortcut when shapes change."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(Bottleneck(16, 8, 32), Bottleneck(32, 8, 32),
                                    Bottleneck(32, 16, 64, stride=2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


class CorrelatingNet(nn.Module):
    """Residual blocks, then a product of two maps scaled by the root of their channels,
    the number made a tensor in the forward, as RAFT's correlation volume is
    (``corr / torch.sqrt(torch.tensor(num_channels))``). torch.fx cannot make a tensor of a
    traced size."""

    def __init__(self, scale):
        super().__init__()
        self.net, self.scale = BlockNet(), scale

    def forward(self, x):
        f = self.net.blocks(F.relu(self.net.stem(x)))
        n, c, h, w = f.shape
        corr = f.flatten(2).transpose(1, 2) @ f.flatten(2)
        return self.scale(corr, c).view(n, h * w, h, w).mean((2, 3))


class LayerMadeInForward(nn.Module):
    """A separable branch that makes a layer each time it runs and calls it at once, as the
    NASNet-A Mobile of Cadene's pretrainedmodels pads (``nn.ZeroPad2d((1, 0, 1, 0))(x)``), and
    crops the extra row and column after its convolution; ``stateful`` makes a layer with
    weights so instead."""

    def __init__(self, c, stateful=False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.out, self.stateful, self.c = conv_bn(c, c, 1), stateful, c

    def forward(self, x):
        x = nn.ZeroPad2d((1, 0, 1, 0))(F.relu(x))
        x = self.conv(x)[:, :, 1:, 1:].contiguous()
        if self.stateful:
            x = nn.Conv2d(self.c, self.c, 1)(x)
        return self.out(F.relu(nn.Dropout(0.0)(self.bn(x))))


class PaddingInForwardBlock(nn.Module):
    """A residual block whose own forward makes its padding layer as it runs."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, bias=False), nn.BatchNorm2d(c)
        self.out = conv_bn(c, c, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(nn.ReflectionPad2d(1)(x))))
        return F.relu(x + self.out(y))


class MadeLayerNet(nn.Module):
    def __init__(self, stateful=False, c=16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.b1, self.b2 = LayerMadeInForward(c, stateful), LayerMadeInForward(c)
        self.b3 = PaddingInForwardBlock(c)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b1(x))
        return self.b3(F.relu(x + self.b2(x))).mean((2, 3))


class LocalSE(nn.Module):
    """A squeeze-and-excitation over 4 × 4 windows instead of the whole map, as NinaSR (torchSR)
    writes it: pooled with a stride, excited, squashed, upsampled, cropped to the map."""

    def __init__(self, c, stride=4):
        super().__init__()
        self.body = nn.Sequential(
            nn.AvgPool2d(2 * stride - 1, stride=stride, padding=stride - 1,
                         count_include_pad=False),
            nn.Conv2d(c, c // 4, 1), nn.ReLU(), nn.Conv2d(c // 4, c, 1), nn.Sigmoid(),
            nn.Upsample(scale_factor=stride, mode="nearest"))

    def forward(self, x):
        return self.body(x)[:, :, :x.shape[2], :x.shape[3]] * x


class SEInception(nn.Module):
    """The paper's SE-Inception module (Fig. 2): an inception module whose output, after a
    norm and an activation, is scaled by a squeeze-and-excitation written inline (as
    CGNet's context guided block refines its joint feature); ``se=False``: without it."""

    def __init__(self, cin=16, c=8, se=True):
        super().__init__()
        self.b1 = nn.Conv2d(cin, c, 1)
        self.b3 = nn.Sequential(nn.Conv2d(cin, c, 1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.bn = nn.BatchNorm2d(2 * c)
        self.fc = nn.Sequential(nn.Linear(2 * c, c // 2), nn.ReLU(), nn.Linear(c // 2, 2 * c),
                                nn.Sigmoid()) if se else None

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.b1(x), self.b3(x)], 1)))
        if self.fc is None:
            return y
        n, c = y.shape[:2]
        return y * self.fc(y.mean((2, 3))).view(n, c, 1, 1)


class SEInceptionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mix1, self.mix2 = SEInception(16, 8), SEInception(16, 8, se=False)
        self.mix3 = SEInception(16, 8)

    def forward(self, x):
        return self.mix3(self.mix2(self.mix1(F.relu(self.stem(x))))).mean((2, 3))


class GatedLinearUnit(nn.Module):
    """``x * sigmoid(conv(x))``: a squashed scale per pixel and channel, at the map's own
    resolution. No channel gate."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


class CoarseProduct(nn.Module):
    """A map times features of its own at a quarter of its resolution, brought back to its size
    (a multiplicative fusion), with nothing that squashes them: no channel gate."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * F.interpolate(self.conv(F.avg_pool2d(x, 4)), size=x.shape[-2:])


class ScaledBranchNet(nn.Module):
    """Residual blocks whose branch ends in the layer ``scale(c)`` makes."""

    def __init__(self, scale, c=16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.body, self.scale = branch(c), scale(c)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return F.relu(x + self.scale(self.body(x))).mean((2, 3))


class DenseNetLike(nn.Module):
    """Dense connections: each layer's input is concatenated with its output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.l1 = nn.Conv2d(8, 8, 3, padding=1)
        self.l2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, F.relu(self.l1(x))], 1)
        x = torch.cat([x, F.relu(self.l2(x))], 1)
        return x.mean((2, 3))


class TokenMixer(nn.Module):
    """A patch embedding followed by residual sums of 3-D token tensors: not a CNN block."""

    def __init__(self, dim=32):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.mlp(self.norm(t))
        return self.head(t.mean(1))


class PerSampleBlock(nn.Module):
    """Iterates over the batch: fx cannot trace that (a Proxy cannot be iterated)."""

    def __init__(self, c=16):
        super().__init__()
        self.conv = conv_bn(c, c)

    def forward(self, x):
        return torch.stack([s + self.conv(s[None])[0] for s in x])


class UntraceableNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.res = Bottleneck(16, 8, 16)
        self.odd = PerSampleBlock(16)

    def forward(self, x):
        return self.odd(self.res(F.relu(self.stem(x)))).mean((2, 3))


class ClampedBlur(nn.Module):
    """A layer with nothing to gate (no parameters, buffers or layers) that fx cannot trace:
    its window is the smaller of its size and the map's, a branch on a traced shape (as
    timm's DropBlock2d sizes its blocks). ``weight``: a scale of its own, a parameter."""

    def __init__(self, size=3, weight=False):
        super().__init__()
        self.size = size
        self.weight = nn.Parameter(torch.ones(())) if weight else None

    def forward(self, x):
        k = min(self.size, x.shape[-1])
        if k % 2 == 0:
            k -= 1
        y = F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
        return y if self.weight is None else y * self.weight


class BlurBlock(nn.Module):
    def __init__(self, c=16, weight=False):
        super().__init__()
        self.conv1, self.blur, self.conv2 = conv_bn(c, c), ClampedBlur(weight=weight), conv_bn(c, c)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.blur(self.conv1(x)))))


class BlurNet(nn.Module):
    def __init__(self, weights=(False, False)):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(*(BlurBlock(16, w) for w in weights))

    def forward(self, x):
        return self.blocks(F.relu(self.stem(x))).mean((2, 3))


class FlagBlock(nn.Module):
    """A residual block whose forward needs a flag only its caller knows."""

    def __init__(self, c=16):
        super().__init__()
        self.conv = conv_bn(c, c)

    def forward(self, x, relu: bool):
        y = self.conv(x)
        if relu:
            y = F.relu(y)
        return x + y


class CallerFlagNet(nn.Module):
    """An ordinary residual block first, then one called twice with different flags: one
    rewritten forward cannot serve both calls."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.res = Bottleneck(16, 8, 16)
        self.flag = FlagBlock(16)

    def forward(self, x):
        h = self.flag(self.res(F.relu(self.stem(x))), True)
        return self.flag(h, False).mean((2, 3))


class TrainingBlock(nn.Module):
    """A block whose own forward reads self.training (as stochastic-depth code does)."""

    def __init__(self, c=16):
        super().__init__()
        self.conv = branch(c)

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            y = y * 0.5
        return x + y


class TrainingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.block = TrainingBlock(16)

    def forward(self, x):
        return self.block(F.relu(self.stem(x))).mean((2, 3))


class ASPPLike(nn.Module):
    """DeepLabV3's ASPP: parallel branches (one pooled to 1x1 and scaled back to its input's
    size), concatenated, and projected by an nn.Sequential the same forward calls."""

    def __init__(self, c=16):
        super().__init__()
        self.convs = nn.ModuleList([nn.Sequential(*conv_bn(c, c, 1), nn.ReLU()),
                                    nn.Sequential(*conv_bn(c, c, 3), nn.ReLU()),
                                    nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn(c, c, 1),
                                                  nn.ReLU())])
        self.project = nn.Sequential(*conv_bn(3 * c, c, 1), nn.ReLU())

    def forward(self, x):
        size = x.shape[-2:]
        res = [conv(x) for conv in self.convs[:2]]
        res.append(F.interpolate(self.convs[2](x), size=size, mode="bilinear",
                                 align_corners=False))
        return self.project(torch.cat(res, dim=1))


class ASPPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.aspp = ASPPLike()

    def forward(self, x):
        return self.aspp(F.relu(self.stem(x))).mean((2, 3))


HANDWRITTEN = {
    "inline_residual": (InlineResidualNet, 3, {"residual": 3}),
    "functional_inception": (FunctionalInceptionNet, 2, {"inception": 2}),
    "block_net": (BlockNet, 3, {"residual": 3}),
    "training_net": (TrainingNet, 1, {"residual": 1}),
    "untraceable_layer_called_whole": (BlurNet, 2, {"residual": 2}),
    "aspp": (ASPPNet, 1, {"inception": 1}),
}


class ProjectionFirstNet(nn.Module):
    """A projection block (torch.add) before an identity block (+), both in the model's forward."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.proj = conv_bn(16, 32, 1, 2)
        self.p1, self.p2 = conv_bn(16, 32, 3, 2), conv_bn(32, 32)
        self.i1, self.i2 = conv_bn(32, 32), conv_bn(32, 32)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(torch.add(self.proj(x), self.p2(F.relu(self.p1(x)))))
        x = F.relu(x + self.i2(F.relu(self.i1(x))))
        return x.mean((2, 3))


class ShortcutArgBlock(nn.Module):
    """DLA-style: the shortcut is an optional argument that the parent may leave out."""

    def __init__(self, c=16):
        super().__init__()
        self.conv = branch(c)

    def forward(self, x, shortcut=None, relu: bool = True):
        if shortcut is None:
            shortcut = x
        y = self.conv(x) + shortcut
        return F.relu(y) if relu else y


class ShortcutArgNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.down = conv_bn(16, 16)
        self.a = ShortcutArgBlock()
        self.b = ShortcutArgBlock()

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.a(x)                                     # shortcut left out: it is x
        return self.b(x, self.down(x), relu=False).mean((2, 3))  # shortcut passed, no relu


class BranchListBlock(nn.Module):
    """HRNet-style: takes and returns a list of tensors, one per resolution."""

    def __init__(self, c=16):
        super().__init__()
        self.convs = nn.ModuleList([branch(c), branch(c)])

    def forward(self, xs):
        return [x + conv(x) for x, conv in zip(xs, self.convs)]


class BranchListNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.low = conv_bn(16, 16, stride=2)
        self.block = BranchListBlock()

    def forward(self, x):
        hi = F.relu(self.stem(x))
        hi, lo = self.block([hi, self.low(hi)])
        return hi.mean((2, 3)) + lo.mean((2, 3))


class OptionalAttnBlock(nn.Module):
    """TResNet-style: an optional module in the middle of the branch, None in some blocks."""

    def __init__(self, c=16, attn=False):
        super().__init__()
        self.conv1 = conv_bn(c, c)
        self.attn = nn.Sequential(nn.Conv2d(c, c, 1), nn.Sigmoid()) if attn else None
        self.conv2 = conv_bn(c, c)

    def forward(self, x):
        y = self.conv1(x)
        if self.attn is not None:
            y = y * self.attn(y)
        return F.relu(self.conv2(y) + x)


class OptionalAttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(OptionalAttnBlock(attn=True), OptionalAttnBlock(attn=False),
                                    OptionalAttnBlock(attn=True))

    def forward(self, x):
        return self.blocks(F.relu(self.stem(x))).mean((2, 3))


HANDWRITTEN.update({
    "shortcut_argument": (ShortcutArgNet, 2, {"residual": 2}),
    "list_of_branches": (BranchListNet, 2, {"residual": 2}),
    "optional_module": (OptionalAttnNet, 3, {"residual": 3}),
})


class C2fBottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x):
        return x + F.silu(self.cv2(F.silu(self.cv1(x))))


class C2fNet(nn.Module):
    """YOLOv8's C2f: the input split in two, bottlenecks run one after another on the second
    piece (the first one's shortcut is that piece), every output concatenated. Each bottleneck
    is a residual block; the concatenation of pieces of one split is not an inception module."""

    def __init__(self, c=16, n=2):
        super().__init__()
        self.stem = conv_bn(3, 2 * c)
        self.m = nn.ModuleList(C2fBottleneck(c) for _ in range(n))
        self.out = conv_bn((2 + n) * c, 2 * c, 1)

    def forward(self, x):
        y = list(F.silu(self.stem(x)).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.out(torch.cat(y, 1)).mean((2, 3))


HANDWRITTEN["c2f"] = (C2fNet, 2, {"residual": 2})


class ConstantBlock(nn.Module):
    """Makes tensors in its forward (an index, a factor): torch.fx turns each into a constant
    of the graph. Blocks alike in code get different constants from their settings."""

    def __init__(self, c=16, flip=False, factor=1.0):
        super().__init__()
        self.conv = branch(c)
        self.flip, self.factor = flip, factor

    def forward(self, x):
        idx = torch.arange(16).flip(0) if self.flip else torch.arange(16)
        return x + self.conv(x)[:, idx] * torch.tensor(self.factor)


class ConstantNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(ConstantBlock(flip=True), ConstantBlock(factor=0.5),
                                    ConstantBlock(flip=True, factor=2.0))

    def forward(self, x):
        return self.blocks(F.relu(self.stem(x))).mean((2, 3))


HANDWRITTEN["constants_in_forward"] = (ConstantNet, 3, {"residual": 3})


class InPlaceBlock(nn.Module):
    """Sums and activations done in place, the result read through the first operand's name:
    ``y.add_(x)`` (or ``y.__iadd__(x)``), then ``relu(y)`` (or through another name bound to
    ``y``)."""

    def __init__(self, c=16, how="method"):
        super().__init__()
        self.branch, self.how = branch(c), how

    def forward(self, x):
        y = self.branch(x)
        if self.how == "method":                 # the sum in place
            y.add_(x)
            return F.relu(y)
        if self.how == "alias":                  # ... read through another name
            kept = y
            y.add_(x)
            return torch.relu_(kept)
        if self.how == "dunder":                 # ... by the augmented assignment's method
            y.__iadd__(x)
            return F.relu(y)
        F.relu(y, inplace=True)                  # an activation in place, then the sum
        return x + y


class InPlaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(InPlaceBlock(how="method"), InPlaceBlock(how="alias"),
                                    InPlaceBlock(how="functional"), InPlaceBlock(how="dunder"))

    def forward(self, x):
        return self.blocks(F.relu(self.stem(x))).mean((2, 3))


HANDWRITTEN["in_place"] = (InPlaceNet, 4, {"residual": 4})


class FactorBlock(nn.Module):
    """The branch times a factor that is no parameter: a buffer, or a tensor the forward makes."""

    def __init__(self, c=16, made=False):
        super().__init__()
        self.conv = branch(c)
        self.made = made
        self.register_buffer("factor", torch.full((1, c, 1, 1), 0.5))

    def forward(self, x):
        factor = torch.full((1, 16, 1, 1), 0.5) if self.made else self.factor
        return x + self.conv(x) * factor


class FactorNet(nn.Module):
    def __init__(self, made=False):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(FactorBlock(made=made), FactorBlock(made=made))

    def forward(self, x):
        return self.blocks(F.relu(self.stem(x))).mean((2, 3))


class TwoMergeBlock(nn.Module):
    """A projection sum (torch.add) and then an identity sum (+) in one block's forward."""

    def __init__(self, c=16):
        super().__init__()
        self.proj = conv_bn(c, c, 1)
        self.p1, self.p2 = conv_bn(c, c), conv_bn(c, c)
        self.i1, self.i2 = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x):
        x = F.relu(torch.add(self.proj(x), self.p2(F.relu(self.p1(x)))))
        return F.relu(x + self.i2(F.relu(self.i1(x))))


class TwoMergeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(TwoMergeBlock(), TwoMergeBlock())

    def forward(self, x):
        return self.blocks(F.relu(self.stem(x))).mean((2, 3))


class CachingBlock(nn.Module):
    """Caches a tensor on itself in eval mode, as timm's LeViT attention caches its biases."""

    def __init__(self, c=16):
        super().__init__()
        self.conv = branch(c)
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.cache = {}

    def forward(self, x):
        if not self.training:
            if "bias" not in self.cache:
                self.cache["bias"] = self.bias * 2
            b = self.cache["bias"]
        else:
            b = self.bias * 2
        return x + self.conv(x) + b


class CachingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.block = CachingBlock()

    def forward(self, x):
        return self.block(F.relu(self.stem(x))).mean((2, 3))


class CachingLeafNet(nn.Module):
    """A residual block, then a CachingBlock that se-inject is told to call as a leaf (as timm's
    EfficientViT attention is): shape propagation runs it, on meta tensors."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.res = Bottleneck(16, 8, 16)
        self.cached = CachingBlock()

    def forward(self, x):
        return self.cached(self.res(F.relu(self.stem(x)))).mean((2, 3))


class OptionalMaskNet(nn.Module):
    """Hiera-style: the model's own forward takes an optional mask, and holds the blocks."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.c1, self.c2 = conv_bn(16, 16), conv_bn(16, 16)

    def forward(self, x, mask=None):
        x = F.relu(self.stem(x))
        if mask is not None:
            x = x * mask
        return F.relu(x + self.c2(F.relu(self.c1(x)))).mean((2, 3))


class ChannelsLastBlock(nn.Module):
    """ConvNeXt-style: depthwise conv, then norm and MLP on channels-last, then back."""

    def __init__(self, c=16):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ChannelsLastNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.blocks = nn.Sequential(ChannelsLastBlock(), ChannelsLastBlock())

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


class TokensLastNet(nn.Module):
    """Swin-style: channels-last 4-D tensors with residual sums that never go back to NCHW."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, 4)
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        t = self.stem(x).permute(0, 2, 3, 1)
        t = t + self.mlp(self.norm(t))
        return t.mean((1, 2))


class GatedConvBlock(nn.Module):
    """MambaOut-style: the block takes and returns a channels-last map (N, H, W, C); a depthwise
    conv runs on a channel-first view inside it."""

    def __init__(self, c=16):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(c, c)
        self.conv = nn.Conv2d(c, c, 7, padding=3, groups=c)

    def forward(self, x):
        g, c = self.fc1(self.norm(x)).chunk(2, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.fc2(F.gelu(g) * c)


class ChannelsLastInception(nn.Module):
    """Two convolutions on channel-first views of a channels-last map, joined channels-last."""

    def __init__(self, c=16):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 5, padding=2)

    def forward(self, x):
        u = x.permute(0, 3, 1, 2)
        return torch.cat([self.a(u).permute(0, 2, 3, 1), self.b(u).permute(0, 2, 3, 1)], dim=-1)


class ChannelsLastResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.blocks = nn.Sequential(GatedConvBlock(), GatedConvBlock())
        self.mixed = ChannelsLastInception()

    def forward(self, x):
        t = self.blocks(self.stem(x).permute(0, 2, 3, 1))
        return self.mixed(t).mean((1, 2))


HANDWRITTEN["channels_last_blocks"] = (ChannelsLastResidualNet, 3, {"residual": 2, "inception": 1})


class InlineSEBlock(nn.Module):
    """A residual block with a squeeze-and-excitation written inline (no module for it)."""

    def __init__(self, c=16):
        super().__init__()
        self.conv = conv_bn(c, c)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        y = self.conv(x)
        y = y * torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return x + y


class SpatialAttentionBlock(nn.Module):
    """A residual block with a spatial (per-pixel, not per-channel) gate: not a channel gate."""

    def __init__(self, c=16):
        super().__init__()
        self.conv = conv_bn(c, c)
        self.att = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        y = self.conv(x)
        return x + y * torch.sigmoid(self.att(y))


class GatedBlocksNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.se_block = InlineSEBlock()
        self.spatial_block = SpatialAttentionBlock()

    def forward(self, x):
        return self.spatial_block(self.se_block(F.relu(self.stem(x)))).mean((2, 3))


class ChannelsLastSEBlock(nn.Module):
    """A channels-last block whose branch ends in an inline SE on the last dimension."""

    def __init__(self, c=16):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Linear(c, c)
        self.se1, self.se2 = nn.Linear(c, 4), nn.Linear(4, c)

    def forward(self, x):
        y = self.fc(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return x + y * torch.sigmoid(self.se2(F.relu(self.se1(y.mean((1, 2), keepdim=True)))))


class ChannelsLastGatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.se_block, self.plain_block = ChannelsLastSEBlock(), GatedConvBlock()

    def forward(self, x):
        return self.plain_block(self.se_block(self.stem(x).permute(0, 2, 3, 1))).mean((1, 2))


class PartialResidualBlock(nn.Module):
    """ReXNet-style: the shortcut is added to the first channels only, the rest pass through."""

    def __init__(self, cin=16, cout=24):
        super().__init__()
        self.cin = cin
        self.conv1, self.conv2 = conv_bn(cin, 2 * cin, 1), conv_bn(2 * cin, cout, 1)

    def forward(self, x):
        y = self.conv2(F.relu(self.conv1(x)))
        return torch.cat([y[:, :self.cin] + x, y[:, self.cin:]], dim=1)


class ChannelSplitBlock(nn.Module):
    """ShuffleNetV2-style (stride 1): half the channels pass, half go through convs."""

    def __init__(self, c=16):
        super().__init__()
        self.branch = nn.Sequential(conv_bn(c // 2, c // 2, 1), nn.ReLU(), conv_bn(c // 2, c // 2))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([a, self.branch(b)], dim=1)


class SplitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.partial = PartialResidualBlock(16, 24)
        self.split = ChannelSplitBlock(24)

    def forward(self, x):
        return self.split(self.partial(F.relu(self.stem(x)))).mean((2, 3))


class RepBranchBlock(nn.Module):
    """RepVGG / MobileOne training-time branches: a 3x3 conv, a 1x1 conv and a norm of one
    input, summed (one 3x3 convolution once re-parameterised), then the activation."""

    def __init__(self, c=16):
        super().__init__()
        self.kxk, self.k1 = conv_bn(c, c, 3), conv_bn(c, c, 1)
        self.skip = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.kxk(x) + self.k1(x) + self.skip(x))


class RepBranchNet(nn.Module):
    """Nothing but re-parameterisable blocks after the stem: a plain net once fused."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(*[RepBranchBlock() for _ in range(3)])

    def forward(self, x):
        return self.blocks(F.relu(self.stem(x))).mean((2, 3))


class LinearSumsNet(nn.Module):
    """Sums that are one linear layer (a re-parameterisable block, a convolutional position
    encoding ``x + dwconv(x)``, a layer-scaled difference as in FastViT's RepMixer) beside sums
    that are blocks: two convolutions in series without an activation, and a residual block."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.rep = RepBranchBlock(c)
        self.pos = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.mix, self.norm = conv_bn(c, c, 3), nn.BatchNorm2d(c)
        self.scale = nn.Parameter(torch.full((1, c, 1, 1), 0.5))
        self.deep1, self.deep2 = conv_bn(c, c, 1), conv_bn(c, c, 3)
        self.r1, self.r2 = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x):
        x = self.rep(F.relu(self.stem(x)))
        x = x + self.pos(x)
        x = x + self.scale * (self.mix(x) - self.norm(x))
        x = x + self.deep2(self.deep1(x))
        x = F.relu(x + self.r2(F.relu(self.r1(x))))
        return x.mean((2, 3))


def tf_same_pad(x, k, s):
    """TensorFlow's "SAME" padding, worked out from the map's size as Python numbers, as Hugging
    Face's MobileNets pad."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph = max(k - s, 0) if h % s == 0 else max(k - h % s, 0)
    pw = max(k - s, 0) if w % s == 0 else max(k - w % s, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class SameConv(nn.Module):
    """conv-bn(-relu) padded as TensorFlow pads, from the size of its input."""

    def __init__(self, cin, cout, k=3, stride=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, 0, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        x = tf_same_pad(x, self.conv.kernel_size[0], self.conv.stride[0])
        return self.act(self.bn(self.conv(x)))


class ChannelCheckingEmbeddings(nn.Module):
    """Refuses an input with the wrong number of channels, as Hugging Face's embeddings do."""

    def __init__(self, cin, cout):
        super().__init__()
        self.num_channels = cin
        self.embedder = SameConv(cin, cout, 3, 2)

    def forward(self, pixel_values):
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError("Make sure that the channel dimension of the pixel values match "
                             "with the one set in the configuration.")
        return self.embedder(pixel_values)


class SameBottleneck(nn.Module):
    """A residual block whose layers pad from their input's size; its own forward reads none."""

    def __init__(self, c, mid, stride=1):
        super().__init__()
        self.reduce = SameConv(c, mid, 1)
        self.conv = SameConv(mid, mid, 3, stride)
        self.expand = SameConv(mid, c, 1, act=False)
        self.short = SameConv(c, c, 1, stride, act=False) if stride != 1 else None

    def forward(self, x):
        s = x if self.short is None else self.short(x)
        return F.relu(self.expand(self.conv(self.reduce(x))) + s)


class OddPadBlock(nn.Module):
    """A residual block whose own forward reads its input's size: it pads an odd map to even."""

    def __init__(self, c):
        super().__init__()
        self.body = branch(c)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return F.relu(x + self.body(x))


class ShapeReadingNet(nn.Module):
    """Hugging Face's CNNs as they are written: a channel check in the embeddings, TensorFlow's
    padding in every layer, and here one block that reads its input's size. torch.fx traces
    none of it ("symbolically traced variables cannot be used as inputs to control flow")."""

    def __init__(self):
        super().__init__()
        self.embeddings = ChannelCheckingEmbeddings(3, 16)
        self.blocks = nn.Sequential(SameBottleneck(16, 8), SameBottleneck(16, 8, stride=2),
                                    OddPadBlock(16), SameBottleneck(16, 8))
        self.head = nn.Linear(16, 10)

    def forward(self, pixel_values):
        return self.head(self.blocks(self.embeddings(pixel_values)).mean((2, 3)))


class InlineShapeReadingNet(nn.Module):
    """Residual sums in the model's own forward, which also reads its input's size."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.b1, self.b2 = branch(c), branch(c)

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("expected 3 channels")
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b1(x))
        return F.relu(x + self.b2(x)).mean((2, 3))


HANDWRITTEN["shape_reading"] = (ShapeReadingNet, 3, {"residual": 3})


class AssertingNet(nn.Module):
    """Residual sums in a forward that checks its input's size with ``assert`` statements
    (in each form Python compiles differently), and a block whose own forward does."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.b1 = branch(c)
        self.b2 = AssertingBlock(c)

    def forward(self, x):
        n, c, h, w = x.shape
        assert c == 3, f"expected 3 channels, got {c}"
        assert not h % 4, "a height that 4 divides"
        assert h % 2 == 0 and w % 2 == 0
        assert x.dim() == 4
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b1(x))
        return self.b2(x).mean((2, 3))


class AssertingBlock(nn.Module):
    def __init__(self, c=16, groups=4):
        super().__init__()
        self.body, self.groups = branch(c), groups

    def forward(self, x):
        y = self.body(x)
        channels = y.size(1)
        assert channels % self.groups == 0, "channels that split into the groups"
        return F.relu(x + y)


HANDWRITTEN["asserting"] = (AssertingNet, 2, {"residual": 2})


class TupleAssertingBlock(nn.Module):
    """``assert (h, w) != (3, 3)``: Python compares the tuples' items for equality first, so
    the truth of ``h == 3`` is asked for inside an assert that needs the tuples to differ."""

    def __init__(self, c=16):
        super().__init__()
        self.body = branch(c)

    def forward(self, x):
        h, w = x.shape[2:]
        assert (h, w) != (3, 3), "a map larger than 3 x 3"
        return F.relu(x + self.body(x))


class FiniteCheckingBlock(nn.Module):
    """A residual block that asserts on its tensors' values: its input has no NaN, its
    branch's output is finite."""

    def __init__(self, c=16):
        super().__init__()
        self.body = branch(c)

    def forward(self, x):
        assert not torch.isnan(x).any(), "a NaN in the block's input"
        y = self.body(x)
        assert torch.isfinite(y).all()
        return F.relu(x + y)


class TwoBlockNet(nn.Module):
    """A stem and two blocks of the subclass's ``block`` class."""

    block: type[nn.Module]

    def __init__(self, c=16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.blocks = nn.Sequential(self.block(c), self.block(c))

    def forward(self, x):
        return self.blocks(F.relu(self.stem(x))).mean((2, 3))


class FiniteCheckingNet(TwoBlockNet):
    block = FiniteCheckingBlock


HANDWRITTEN["finite_checking"] = (FiniteCheckingNet, 2, {"residual": 2})


class PositionMaskBlock(nn.Module):
    """A residual block whose branch also reads the pixels' coordinates (CoordConv), made from
    a mask of its input's size with the sizes given one by one (``torch.zeros(B, H, W)``, as
    DETR-style and EdgeNeXt-style Fourier encodings make theirs), which torch.fx cannot
    trace."""

    def __init__(self, c=16):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c + 2, c), nn.ReLU(), *conv_bn(c, c))

    def forward(self, x):
        b, c, h, w = x.shape
        mask = torch.zeros(b, h, w, device=x.device).bool()
        rows = (~mask).cumsum(1, dtype=torch.float32) / h
        cols = torch.ones(b, h, w, dtype=x.dtype, device=x.device).cumsum(2) / w
        y = self.body(torch.cat([x, torch.stack([rows, cols], 1)], 1))
        return F.relu(x + y)


class AddedPositionBlock(nn.Module):
    """A residual block behind a position encoding added to its input: ``x + pos(coords)``,
    the coordinates made from ``x``'s size alone. The sum of the encoding is no block."""

    def __init__(self, c=16):
        super().__init__()
        self.pos = nn.Conv2d(2, c, 1)
        self.body = branch(c)

    def forward(self, x):
        b, c, h, w = x.shape
        rows = torch.ones(b, h, w, dtype=x.dtype, device=x.device).cumsum(1) / h
        cols = torch.ones(b, h, w, dtype=x.dtype, device=x.device).cumsum(2) / w
        x = x + self.pos(torch.stack([rows, cols], 1))
        return F.relu(x + self.body(x))


class PositionMaskNet(TwoBlockNet):
    block = PositionMaskBlock


HANDWRITTEN["position_mask"] = (PositionMaskNet, 2, {"residual": 2})


class OctaveConv(nn.Module):
    """An octave convolution (Chen et al., 2019): channels split into a full-resolution and a
    half-resolution stream, four convolutions between them, each output the sum of two. One
    layer: its sums are not blocks."""

    def __init__(self, cin, cout, k=3, low_in=True, low_out=True):
        super().__init__()
        lin, lout = (cin // 2 if low_in else 0), (cout // 2 if low_out else 0)
        hin, hout = cin - lin, cout - lout
        self.hh = nn.Conv2d(hin, hout, k, padding=k // 2, bias=False)
        self.lh = nn.Conv2d(lin, hout, k, padding=k // 2, bias=False) if lin else None
        self.hl = nn.Conv2d(hin, lout, k, padding=k // 2, bias=False) if lout else None
        self.ll = nn.Conv2d(lin, lout, k, padding=k // 2, bias=False) if lin and lout else None
        self.bn_h = nn.BatchNorm2d(hout)
        self.bn_l = nn.BatchNorm2d(lout) if lout else None

    def forward(self, x):
        h, low = x if isinstance(x, tuple) else (x, None)
        yh = self.hh(h)
        if low is not None:
            yh = yh + F.interpolate(self.lh(low), scale_factor=2.0, mode="nearest")
        if self.hl is None:
            return self.bn_h(yh), None
        yl = self.hl(F.avg_pool2d(h, 2))
        if low is not None:
            yl = yl + self.ll(low)
        return self.bn_h(yh), self.bn_l(yl)

    def sums(self):
        return (self.lh is not None) + (self.ll is not None)


class OctaveBottleneck(nn.Module):
    """A ResNet bottleneck of octave convolutions: a residual block on each stream."""

    def __init__(self, c, mid):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = OctaveConv(c, mid, 1), OctaveConv(mid, mid), \
            OctaveConv(mid, c, 1)

    def forward(self, x):
        h, low = x
        a, b = self.conv1(x)
        a, b = self.conv2((F.relu(a), F.relu(b)))
        a, b = self.conv3((F.relu(a), F.relu(b)))
        return F.relu(a + h), F.relu(b + low)


class OctaveNet(nn.Module):
    def __init__(self, c=32):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.first = OctaveConv(c, c, low_in=False)
        self.blocks = nn.Sequential(OctaveBottleneck(c, c // 2), OctaveBottleneck(c, c // 2))
        self.last = OctaveConv(c, c, low_out=False)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        h, low = self.first(self.stem(x))
        h, _ = self.last(self.blocks((F.relu(h), F.relu(low))))
        return self.head(h.mean((2, 3)))


class TwoStreamBlock(nn.Module):
    """A generalised residual block (ResNet in ResNet): a residual stream with an identity
    shortcut and a transient stream without one, each summing a convolution of both."""

    def __init__(self, c):
        super().__init__()
        self.rr, self.tr, self.rt, self.tt = (nn.Conv2d(c, c, 3, padding=1) for _ in range(4))
        self.bn_r, self.bn_t = nn.BatchNorm2d(c), nn.BatchNorm2d(c)

    def forward(self, x):
        r, t = x
        r2 = F.relu(self.bn_r(self.rr(r) + self.tr(t) + r))
        t2 = F.relu(self.bn_t(self.rt(r) + self.tt(t)))
        return r2, t2


class TwoStreamNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem_r, self.stem_t = conv_bn(3, c), conv_bn(3, c)
        self.blocks = nn.Sequential(*(TwoStreamBlock(c) for _ in range(3)))
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        r, t = self.blocks((F.relu(self.stem_r(x)), F.relu(self.stem_t(x))))
        return self.head(torch.cat([r, t], 1).mean((2, 3)))


HANDWRITTEN["octave"] = (OctaveNet, 4, {"residual": 4})
HANDWRITTEN["two_streams"] = (TwoStreamNet, 3, {"residual": 3})


class SelectiveKernel(nn.Module):
    """SKNet's selective kernel, its branches summed with ``+``: ``u = a + b`` is pooled into
    an attention that weighs a and b, one value per channel each (a channel gate)."""

    def __init__(self, c, r=4):
        super().__init__()
        self.a = nn.Sequential(*conv_bn(c, c), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False),
                               nn.BatchNorm2d(c), nn.ReLU())
        self.fc = nn.Sequential(nn.Linear(c, c // r), nn.ReLU())
        self.fa, self.fb = nn.Linear(c // r, c), nn.Linear(c // r, c)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        z = self.fc((a + b).mean((2, 3)))
        w = torch.softmax(torch.stack([self.fa(z), self.fb(z)], 1), 1)
        return a * w[:, 0, :, None, None] + b * w[:, 1, :, None, None]


class SKBottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.sk, self.conv3 = conv_bn(c, c, 1), SelectiveKernel(c), conv_bn(c, c, 1)

    def forward(self, x):
        return F.relu(x + self.conv3(self.sk(F.relu(self.conv1(x)))))


class SKNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.blocks = nn.Sequential(SKBottleneck(c), SKBottleneck(c))
        self.last = branch(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.head((x + self.last(x)).mean((2, 3)))  # a block pooled into the head
HANDWRITTEN["selective_kernel"] = (SKNet, 1, {"residual": 1})


class BottleneckAttention(nn.Module):
    """BAM as its paper writes it, x * (1 + sigmoid(Mc(x) + Ms(x))): a channel attention and
    a spatial attention, each broadcast to the map's size, summed."""

    def __init__(self, c, r=4):
        super().__init__()
        self.channel = nn.Sequential(nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c))
        self.spatial = nn.Sequential(nn.Conv2d(c, c // r, 1), nn.BatchNorm2d(c // r), nn.ReLU(),
                                     nn.Conv2d(c // r, c // r, 3, padding=2, dilation=2),
                                     nn.BatchNorm2d(c // r), nn.ReLU(), nn.Conv2d(c // r, 1, 1))

    def forward(self, x):
        mc = self.channel(x.mean((2, 3)))[:, :, None, None].expand_as(x)
        ms = self.spatial(x).expand_as(x)
        return x * (1 + torch.sigmoid(mc + ms))


class BAMNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.b1, self.bam, self.b2 = branch(c), BottleneckAttention(c), branch(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.bam(F.relu(x + self.b1(x)))
        return self.head(F.relu(x + self.b2(x)).mean((2, 3)))


HANDWRITTEN["bottleneck_attention"] = (BAMNet, 2, {"residual": 2})


class YoloConv(nn.Module):
    """A conv unit as YOLO writes it: one activation module, a class attribute, that every
    unit of the model registers as its own ``act`` (fx names it by its first path)."""

    default_act = nn.SiLU()

    def __init__(self, cin, cout, k=1, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = self.default_act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class YoloBottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = YoloConv(c, c, 3), YoloConv(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class YoloC2f(nn.Module):
    """Split in two, a chain of bottlenecks on the second half, every piece concatenated."""

    def __init__(self, cin, cout, n=2):
        super().__init__()
        self.c = cout // 2
        self.cv1 = YoloConv(cin, 2 * self.c)
        self.cv2 = YoloConv((2 + n) * self.c, cout)
        self.m = nn.ModuleList(YoloBottleneck(self.c) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class YoloNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.layers = nn.Sequential(YoloConv(3, c, 3, 2), YoloC2f(c, c),
                                    YoloConv(c, 2 * c, 3, 2), YoloC2f(2 * c, 2 * c))
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        return self.head(self.layers(x).mean((2, 3)))


HANDWRITTEN["yolo_shared_act"] = (YoloNet, 4, {"residual": 4})


class SequentialResidual(nn.Sequential):
    """A residual block that is an nn.Sequential of its branch's layers, with its own forward."""

    def __init__(self, c):
        super().__init__(*branch(c))

    def forward(self, x):
        return F.relu(x + super().forward(x))


class SequentialResidualNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.blocks = nn.Sequential(SequentialResidual(c), SequentialResidual(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


HANDWRITTEN["sequential_subclass"] = (SequentialResidualNet, 2, {"residual": 2})


_SKIP_CHECKS = {
    "isinstance": lambda s: isinstance(s, torch.Tensor),
    "jit_isinstance": lambda s: torch.jit.isinstance(s, torch.Tensor),
    "is_tensor": lambda s: torch.is_tensor(s),
    "tuple": lambda s: isinstance(s, (torch.Tensor, list)),
}


class OptionalSkipBlock(nn.Module):
    """A residual block that also adds a tensor it may be given (a U-Net decoder's skip),
    checking for it by type, as MONAI's decoders do (``torch.jit.isinstance``)."""

    def __init__(self, c, check):
        super().__init__()
        self.body = branch(c)
        self.check = _SKIP_CHECKS[check]

    def forward(self, x, skip=None):
        y = F.relu(x + self.body(x))
        if self.check(skip):
            y = y + skip
        return y


class OptionalSkipNet(nn.Module):
    def __init__(self, c=16, check="isinstance"):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.b1, self.b2, self.b3 = (OptionalSkipBlock(c, check) for _ in range(3))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        s = F.relu(self.stem(x))
        h = self.b3(self.b2(self.b1(s)), s)  # b3 adds the stem's map: a block from there
        return self.head(h.mean((2, 3)))


HANDWRITTEN["optional_skip"] = (OptionalSkipNet, 4, {"residual": 4})


class NonLocalBlock(nn.Module):
    """A non-local block (Wang et al.), written as its reference implementations write it:
    the attention's output is viewed back to the input's size by unpacking the size into the
    call (``view(n, c, *x.size()[2:])``), where fx cannot tell how many items to make."""

    def __init__(self, c):
        super().__init__()
        self.inter = c // 2
        self.g, self.theta, self.phi = (nn.Conv2d(c, c // 2, 1) for _ in range(3))
        self.W = conv_bn(c // 2, c, 1)

    def forward(self, x):
        n = x.size(0)
        g = self.g(x).view(n, self.inter, -1).permute(0, 2, 1)
        theta = self.theta(x).view(n, self.inter, -1).permute(0, 2, 1)
        phi = self.phi(x).view(n, self.inter, -1)
        y = torch.matmul(F.softmax(torch.matmul(theta, phi), dim=-1), g)
        y = y.permute(0, 2, 1).contiguous().view(n, self.inter, *x.size()[2:])
        return self.W(y) + x


class NonLocalNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = conv_bn(3, c, stride=2)
        self.res = Bottleneck(c, c // 2, c, stride=2)
        self.nl = NonLocalBlock(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.nl(self.res(F.relu(self.stem(x)))).mean((2, 3)))


HANDWRITTEN["non_local"] = (NonLocalNet, 2, {"residual": 2})


def _unflatten_like(y, like):
    """``y`` (N, C, L) viewed to ``like``'s batch and trailing sizes: a helper two layers
    share, one on 4-D maps, one on 3-D sequences (the size it unpacks is 2 long, then 1)."""
    return y.reshape(like.shape[0], -1, *like.shape[2:])


class SpatialMixBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = branch(c)
        self.proj = conv_bn(c, c, 1)

    def forward(self, x):
        return F.relu(x + self.proj(_unflatten_like(self.body(x).flatten(2), x)))


class SequenceMix(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv1d(c, c, 3, padding=1)

    def forward(self, t):
        return _unflatten_like(self.conv(t), t)


class SharedUnflattenNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.res = Bottleneck(c, c // 2, c)
        self.mix = SpatialMixBlock(c)
        self.seq = SequenceMix(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        h = self.mix(self.res(F.relu(self.stem(x))))
        return self.head(self.seq(h.flatten(2)).mean(2))


class ReshapedBranchBlock(nn.Module):
    """A residual block whose branch flattens the map and views it back to the input's size,
    the size spelled as people spell it: unpacked into the call, tested with len(), made a
    list or a tuple, or walked in a loop."""

    def __init__(self, c, spelling):
        super().__init__()
        self.body, self.proj = branch(c), conv_bn(c, c, 1)
        self.spelling = spelling

    def forward(self, x):
        n, c = x.shape[0], x.shape[1]
        y = self.body(x).flatten(2)
        if self.spelling == "unpacked":
            y = y.view(n, c, *x.shape[2:])
        elif self.spelling == "len":
            y = y.view(n, c, x.shape[2], x.shape[3] if len(x.shape) == 4 else 1)
        elif self.spelling == "list":
            y = y.view([n, c] + [*x.size()[-2:]])
        elif self.spelling == "tuple":
            y = y.view((n, c) + tuple(x.shape[2:]))
        else:
            sizes = [n, c]
            for s in x.shape[2:]:
                sizes.append(s)
            y = y.view(sizes)
        return F.relu(x + self.proj(y))


class ReshapedBranchNet(nn.Module):
    def __init__(self, spelling, c=16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.block = ReshapedBranchBlock(c, spelling)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.block(F.relu(self.stem(x))).mean((2, 3)))


class SSHContext(nn.Module):
    """SSH's context module (as facexlib's RetinaFace has it): a 3x3 branch, and a 5x5 and a
    7x7 one made of stacked 3x3 convolutions that share their first; the three concatenated.
    ``join``: "chain" concatenates the shared convolution's output too (a dense connection);
    "slices" takes the two last branches as slices of one tensor instead."""

    def __init__(self, cin, cout, join="ssh"):
        super().__init__()
        self.join = join
        self.conv3 = conv_bn(cin, cout // 2)
        self.conv5_1, self.conv5_2 = conv_bn(cin, cout // 4), conv_bn(cout // 4, cout // 4)
        self.conv7_2, self.conv7_3 = conv_bn(cout // 4, cout // 4), conv_bn(cout // 4, cout // 4)

    def forward(self, x):
        t = F.relu(self.conv5_1(x))
        if self.join == "chain":
            return F.relu(torch.cat([self.conv3(x), t, self.conv5_2(t)], 1))
        if self.join == "slices":
            u = self.conv7_3(F.relu(self.conv7_2(t)))
            return F.relu(torch.cat([self.conv3(x), u[:, :4], u[:, 4:], self.conv5_2(t)], 1))
        return F.relu(torch.cat([self.conv3(x), self.conv5_2(t),
                                 self.conv7_3(F.relu(self.conv7_2(t)))], 1))


class SSHNet(nn.Module):
    def __init__(self, join="ssh"):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.ctx1, self.ctx2 = SSHContext(16, 32, join), SSHContext(32, 32, join)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.ctx2(self.ctx1(F.relu(self.stem(x)))).mean((2, 3)))


HANDWRITTEN["ssh_context"] = (SSHNet, 2, {"inception": 2})
