"""Channel gates: the Squeeze-and-Excitation gate of Hu et al. (arXiv 1709.01507, Eq. 2-4) with the
paper's ablations (squeeze: Table 11; excitation: Table 12), and two gates timm also offers
through the same rules: ECA (Wang et al., arXiv 1910.03151) and effective SE (Lee & Park, arXiv
1911.06667)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .errors import InvalidArgumentError
from .fresh import conv1x1, fresh

__all__ = ["ChannelGate", "SEGate", "ECAGate", "EffectiveSEGate", "GateSpec",
           "reduced_channels", "make_gate", "gate_parameters", "eca_kernel_size",
           "check_identity", "mean_through_linear", "linear_producer", "squeeze_in_chunks"]

KINDS = ("se", "eca", "ese")
SQUEEZES = ("avg", "max")
EXCITES = ("sigmoid", "hard_sigmoid", "tanh")


def reduced_channels(channels: int, ratio: int, min_channels: int = 1, divisor: int = 1) -> int:
    """Width of the bottleneck of a gate on ``channels`` channels.

    ``divisor == 1``: ``C // r``, at least ``min_channels`` (the paper's C/r).
    ``divisor > 1``: ``C / r`` rounded to the nearest multiple of ``divisor``, at least
    ``divisor`` and ``min_channels``: timm's ``make_divisible`` as its ``SEModule`` calls it, so
    ``divisor=8`` gives the widths of timm's SE models (seresnet50 and the like).
    """
    if divisor == 1:
        return max(min_channels, channels // ratio)
    return max(min_channels, divisor, int(channels / ratio + divisor / 2) // divisor * divisor)


def _excitation(name: str) -> nn.Module:
    return fresh({"sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid, "tanh": nn.Tanh}[name])


def _fc(conv: nn.Conv2d, v: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to a vector per sample, as the matrix product it is: the
    same numbers as running the convolution on a 1x1 map, without a convolution's overhead."""
    return F.linear(v, conv.weight.flatten(1), conv.bias)


def _exporting() -> bool:
    """torch.compiler.is_exporting(), read from its flag: in some torch releases (2.11 among
    them) Dynamo answers the call itself with True under torch.compile too."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


# Whether a compiled SE gate writes its two layers as a multiply and a sum (_excitation_fc);
# bench/runtime.py --excitation-matmul turns it off to time the matrix products beside it.
EXCITATION_AS_SUM = True


def _excitation_fc(conv: nn.Conv2d, v: torch.Tensor) -> torch.Tensor:
    """``_fc`` for an SE gate's two layers. Compiled (not exported), it is written as a multiply
    and a sum, on every device: Inductor then generates it as kernels of its own making, where
    a matrix product is a separate call to a matrix library (MKL, cuBLAS) for a product of a
    few vectors. On the CPU the layers then run inside the gate's own C++ kernel, with the
    squeeze, the scale and what consumes it (MKL took ~15-35 us per call at batch 1, two per
    gate); on an H200 (bf16) the generated reductions made a fused gated ResNet-50 0.80-0.91 of
    its time with cuBLAS's products, inference and training steps, batches 1 and 32. Same
    numbers up to the order of the sum."""
    if EXCITATION_AS_SUM and torch.compiler.is_compiling() and not _exporting():
        s = (v.unsqueeze(1) * conv.weight.flatten(1)).sum(-1)
        return s if conv.bias is None else s + conv.bias
    return _fc(conv, v)


def _squeeze(x: torch.Tensor, how: str) -> torch.Tensor:
    """The squeeze of an (N, C, H, W) tensor as an (N, C) matrix, in one call: run eagerly, a
    gate's cost on a GPU is largely the host issuing its calls (README.md, GPU figures)."""
    return x.mean((2, 3)) if how == "avg" else x.amax((2, 3))


def _per_channel(s: torch.Tensor) -> torch.Tensor:
    """(N, C) as (N, C, 1, 1), to scale an NCHW tensor, in one call (two for ``s[..., None,
    None]``)."""
    return s.view(s.shape[0], s.shape[1], 1, 1)


# A gate with this attribute set is compiled for inference with frozen weights (by
# se_inject.fuse with freeze=True): on the CPU it takes the mean of a tensor made by a 1x1
# convolution and a norm in eval mode from the convolution's input (mean_through_linear), and
# squeezes pixels in chunks (squeeze_in_chunks).
FROZEN = "_se_inject_frozen"


def _chunks(pixels) -> int:
    """How many equal chunks ``squeeze_in_chunks`` splits ``pixels`` into: the most, up to 8,
    that leaves at least 4 pixels in each; 1 where none does (13 x 13, or a prime number).

    1 as well where the number is symbolic (compiled with dynamic shapes): deciding would make
    Dynamo guard on its divisibility by each count tried, and compile again for new sizes
    that the same code serves (statically_known_true asks without adding a guard)."""
    return next((t for t in range(8, 1, -1)
                 if statically_known_true(pixels % t == 0)
                 and statically_known_true(pixels // t >= 4)), 1)


def squeeze_in_chunks(x: torch.Tensor, how: str) -> torch.Tensor:
    """The squeeze of an (N, C, H, W) tensor as an (N, C) matrix, on the CPU reduced over equal
    chunks of pixels and then over the chunks (elsewhere at once): the same numbers as
    ``mean``/``amax`` over (H, W), up to the order of the sum.

    For Inductor's C++ code on frozen feature maps, which oneDNN's convolutions hand over
    channels-last: a reduction over all the pixels at once becomes one parallel loop over the
    pixels for each block of 16 channels, each striding through the whole map; over chunks, it
    is one parallel loop in which each thread reads whole pixels of its chunks. MobileNetV2's
    ten gate kernels (squeeze, excitation and scale) took a fifth less time at batch 1
    (README.md, "Fused fast path")."""
    n, c, h, w = x.shape
    pixels = h * w
    t = _chunks(pixels) if x.device.type == "cpu" else 1
    if t == 1:
        return _squeeze(x, how)
    parts = x.permute(0, 2, 3, 1).reshape(n, t, pixels // t, c)
    if how == "avg":
        return parts.sum(2).sum(1) / pixels
    return parts.amax(2).amax(1)


def _compiled_frozen(gate: nn.Module) -> bool:
    """Whether ``gate`` runs in code compiled with freezing (not exported)."""
    return torch.compiler.is_compiling() and not _exporting() \
        and getattr(gate, FROZEN, False)


def linear_producer(conv: nn.Module, norm: nn.Module | None) -> bool:
    """Whether ``norm(conv(h))`` (``conv(h)`` where ``norm`` is None) is affine in ``h`` pixel
    by pixel, so that its spatial mean is ``norm(conv(mean_hw(h)))``: a plain 1x1 convolution
    with stride 1, no padding and one group, and a BatchNorm2d using its running statistics."""
    if type(conv) is not nn.Conv2d or conv.kernel_size != (1, 1) or conv.stride != (1, 1) \
            or conv.padding not in ((0, 0), "valid") or conv.groups != 1:
        return False
    return norm is None or (type(norm) is nn.BatchNorm2d and not norm.training
                            and norm.running_mean is not None and norm.running_var is not None)


def mean_through_linear(gate: nn.Module, h: torch.Tensor, conv: nn.Module,
                        norm: nn.Module | None) -> torch.Tensor | None:
    """The spatial mean of ``norm(conv(h))``, computed from ``h`` (N, C_in, H, W): the 1x1
    convolution and the norm applied to ``mean_hw(h)``, the same numbers up to rounding.

    Compiled with freezing (``fuse(model, freeze=True)``) for the CPU, where the norm is
    folded into the convolution and the gated tensor's mean would be a pass of its own over
    it, this reads the convolution's input and weights instead: fewer bytes where the map has
    more pixels than the input has channels (ResNet-50's stages 1 and 2 at 224x224, whose
    bottlenecks widen four times). Returns None, and the gate squeezes as usual, in every
    other case: where it would read more, eager (the reference), export, training-mode norms,
    a max squeeze, other layers, a gate that fuse() did not mark, and other devices. On a GPU
    the extra kernels cost more than the bytes saved: a frozen gated ResNet-50 took 1.15x
    (batch 1) and 1.30x (batch 32) the time it took without them (H200, bf16; the gates' two
    layers then ran as cuBLAS products)."""
    if not _compiled_frozen(gate) or gate.spec.squeeze != "avg" \
            or not linear_producer(conv, norm) or h.dim() != 4 or h.device.type != "cpu":
        return None
    n, c_in, hw, c_out = h.shape[0], h.shape[1], h.shape[2] * h.shape[3], conv.out_channels
    if n * c_in * hw + c_out * c_in >= n * c_out * hw:
        return None  # reading h and the weights costs more than reading the gated tensor
    s = _excitation_fc(conv, squeeze_in_chunks(h, "avg"))  # (compiled: generated code)
    if norm is not None:
        s = (s - norm.running_mean) * torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            s = s * norm.weight + norm.bias
    return s


@dataclass(frozen=True)
class GateSpec:
    """Which gate, and how it squeezes and excites.

    kind: "se" (the paper's gate), "eca" (a 1-D convolution across channels, no bottleneck),
        "ese" (effective SE: one C -> C layer).
    squeeze: "avg" (global average pooling, the paper's) or "max" (Table 11).
    excite: "sigmoid" (the paper's), "hard_sigmoid" (mobile nets: relu6(x + 3) / 6), "tanh"
        (Table 12). Default: sigmoid, except hard_sigmoid for "ese" as in its paper and timm.
    min_channels, divisor: the bottleneck width of "se" gates (see ``reduced_channels``).
    """

    kind: str = "se"
    squeeze: str = "avg"
    excite: str | None = None
    min_channels: int = 1
    divisor: int = 1

    def __post_init__(self):
        for field, value, allowed in (("gate", self.kind, KINDS), ("squeeze", self.squeeze, SQUEEZES),
                                      ("excite", self.excite, EXCITES + (None,))):
            if value not in allowed:
                raise InvalidArgumentError(f"{field} must be one of "
                                           f"{', '.join(map(repr, (a for a in allowed if a)))}; "
                                           f"got {value!r}")
        if self.excite is None:
            object.__setattr__(self, "excite", "hard_sigmoid" if self.kind == "ese" else "sigmoid")
        for field in ("min_channels", "divisor"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"{field} must be a positive integer, not {v!r}")

    def reduced(self, channels: int, ratio: int) -> int | None:
        """The bottleneck width, or None for gates without one (eca, ese)."""
        if self.kind != "se":
            return None
        return reduced_channels(channels, ratio, self.min_channels, self.divisor)

    def to_dict(self) -> dict:
        return asdict(self)


class ChannelGate(nn.Module):
    """What every gate se-inject inserts shares: ``channels``, the gate's settings, and a start
    at exactly 0.5 for every channel (``start_as_identity``)."""

    channels: int
    spec: GateSpec

    def start_as_identity(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def initialise(self, init: str = "paper") -> None:
        """Give the gate its starting values again: PyTorch's default initialisation of its
        layers, as when it was made, then for ``init="identity"`` the start at 0.5."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if init == "identity":
            self.start_as_identity()

    def squeezed(self, x: torch.Tensor, squeezed: torch.Tensor | None = None) -> torch.Tensor:
        """The squeeze of ``x`` as an (N, C) matrix: ``squeezed`` where the caller computed it
        (see ``mean_through_linear``); in chunks of pixels where the gate runs frozen on the
        CPU (``squeeze_in_chunks``)."""
        if squeezed is not None:
            return squeezed
        if _compiled_frozen(self):
            return squeeze_in_chunks(x, self.spec.squeeze)
        return _squeeze(x, self.spec.squeeze)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module of what it scripts, before compiling
        # anything: a gated block runs a forward made for it, which TorchScript cannot compile
        # (it compiles a class's forward from the class's source), so the model is refused here,
        # untouched, rather than with TorchScript's words about a type annotation.
        raise InvalidArgumentError(
            f"torch.jit.script cannot compile a model holding se-inject gates (one of them: "
            f"{type(self).__name__}, {self.channels} channels): TorchScript compiles each "
            "module class's forward from its source, and a gated block runs a forward "
            "se-inject made for it. Use torch.jit.trace(model, (x,)), torch.export.export("
            "model, (x,)) or torch.compile (se_inject.fuse); to script the plain model, "
            "se_inject.remove(model) first")

    def extra_repr(self) -> str:
        parts = [f"channels={self.channels}"]
        if getattr(self, "ratio", None) is not None:
            parts.append(f"ratio={self.ratio}")
        d = GateSpec(kind=self.spec.kind)
        parts += [f"{k}={getattr(self.spec, k)!r}" for k in ("squeeze", "excite")
                  if getattr(self.spec, k) != getattr(d, k)]
        return ", ".join(parts)


def check_identity(spec: GateSpec) -> None:
    """Refuse a gate that cannot start at exactly 0.5 (init="identity")."""
    if spec.excite == "tanh":
        raise InvalidArgumentError("init='identity' needs an excitation that gives 0.5 at zero "
                                   "(sigmoid or hard_sigmoid); tanh gives 0 there. Use "
                                   "init='paper' with excite='tanh'.")


class SEGate(ChannelGate):
    """``u * gate(fc2(relu(fc1(squeeze_hw(u)))))`` on an NCHW tensor ``u`` (Eq. 2-4); by default
    the squeeze is the spatial mean and the gate a sigmoid.

    ``fc1`` (C -> C/r) and ``fc2`` (C/r -> C) are 1x1 convolutions with biases, named as in
    timm's ``SEModule`` so that weights move between the two without renaming.
    """

    def __init__(self, channels: int, ratio: int = 16, *, spec: GateSpec | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.spec = spec or GateSpec()
        rd = reduced_channels(channels, ratio, self.spec.min_channels, self.spec.divisor)
        self.channels, self.ratio = channels, ratio
        self.fc1 = conv1x1(channels, rd, device=device, dtype=dtype)
        self.act = fresh(nn.ReLU, inplace=True)
        self.fc2 = conv1x1(rd, channels, device=device, dtype=dtype)
        self.gate = _excitation(self.spec.excite)

    @torch.no_grad()
    def start_as_identity(self) -> None:
        """fc2 at zero: every channel is excited by exactly 0.5 until the gate learns (the
        layer before the gate is scaled by 2 to match; see se_inject.identity)."""
        check_identity(self.spec)
        self.fc2.weight.zero_()
        self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor, squeezed: torch.Tensor | None = None) -> torch.Tensor:
        """``squeezed``: the squeeze of ``x`` (N, C) where the caller computed it (see
        ``mean_through_linear``)."""
        s = self.squeezed(x, squeezed)                                  # squeeze, Eq. 2
        fc = _excitation_fc
        s = self.gate(fc(self.fc2, self.act(fc(self.fc1, s))))         # excitation, Eq. 3
        return x * _per_channel(s)                                     # scale, Eq. 4


class ECAGate(ChannelGate):
    """ECA: ``u * gate(conv1d_k(squeeze_hw(u)))``, the 1-D convolution running across channels
    with the kernel size ECA's paper derives from C (gamma=2, b=1). Parameters and their names
    are timm's ``EcaModule``'s (``conv.weight``), built by it."""

    def __init__(self, channels: int, ratio: int | None = None, *, spec: GateSpec | None = None,
                 device=None, dtype=None):
        super().__init__()
        from timm.layers import EcaModule
        self.spec = spec or GateSpec(kind="eca")
        self.channels, self.ratio = channels, None
        self.conv = EcaModule(channels=channels, device=device, dtype=dtype).conv
        self.gate = _excitation(self.spec.excite)

    @torch.no_grad()
    def start_as_identity(self) -> None:
        check_identity(self.spec)
        self.conv.weight.zero_()

    def forward(self, x: torch.Tensor, squeezed: torch.Tensor | None = None) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        y = self.squeezed(x, squeezed).view(n, 1, c)
        y = self.gate(self.conv(y)).view(n, c, 1, 1)
        return x * y


class EffectiveSEGate(ChannelGate):
    """Effective SE: ``u * gate(fc(squeeze_hw(u)))`` with one C -> C 1x1 convolution and, by
    default, a hard sigmoid. Parameters and names are timm's ``EffectiveSEModule``'s (``fc``)."""

    def __init__(self, channels: int, ratio: int | None = None, *, spec: GateSpec | None = None,
                 device=None, dtype=None):
        super().__init__()
        from timm.layers import EffectiveSEModule
        self.spec = spec or GateSpec(kind="ese")
        self.channels, self.ratio = channels, None
        self.fc = EffectiveSEModule(channels, device=device, dtype=dtype).fc
        self.gate = _excitation(self.spec.excite)

    @torch.no_grad()
    def start_as_identity(self) -> None:
        check_identity(self.spec)
        self.fc.weight.zero_()
        self.fc.bias.zero_()

    def forward(self, x: torch.Tensor, squeezed: torch.Tensor | None = None) -> torch.Tensor:
        s = self.gate(_fc(self.fc, self.squeezed(x, squeezed)))
        return x * _per_channel(s)


_CLASSES = {"se": SEGate, "eca": ECAGate, "ese": EffectiveSEGate}


def make_gate(channels: int, ratio: int, spec: GateSpec | None = None, *, device=None,
              dtype=None) -> ChannelGate:
    spec = spec or GateSpec()
    try:
        return _CLASSES[spec.kind](channels, ratio, spec=spec, device=device, dtype=dtype)
    except (RuntimeError, TypeError) as exc:  # (TypeError: a width past int64 overflows)
        reduced = spec.reduced(channels, ratio)
        if reduced is None or reduced <= channels or \
                not any(w in str(exc).lower() for w in ("alloc", "overflow")):
            raise
        count = gate_parameters(channels, ratio, spec)
        raise InvalidArgumentError(
            f"a gate of {channels} channels would have a bottleneck of {reduced:,} (min_channels="
            f"{spec.min_channels}, divisor={spec.divisor}): {count:,} parameters, which cannot "
            f"be allocated. The bottleneck is C // ratio (C / ratio rounded to a multiple of "
            f"divisor), at least min_channels and divisor: give smaller values") from None


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA's kernel size for C channels: the odd number nearest |log2(C) + b| / gamma, at least 3
    (as timm's EcaModule computes it)."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


def gate_parameters(channels: int, ratio: int, spec: GateSpec | None = None) -> int:
    """Weights and biases of one gate: 2·C·C/r + C/r + C for SE; k for ECA; C·C + C for
    effective SE."""
    spec = spec or GateSpec()
    if spec.kind == "eca":
        return eca_kernel_size(channels)
    if spec.kind == "ese":
        return channels * channels + channels
    rd = spec.reduced(channels, ratio)
    return 2 * channels * rd + rd + channels
