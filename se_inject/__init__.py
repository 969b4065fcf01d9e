"""se-inject: Squeeze-and-Excitation gates for PyTorch CNNs that already exist."""
from .api import apply, part_input_size, plan, remove
from .checkpoint import load, save
from .cost import CostReport, cost
from .errors import SEInjectError
from .fuse import fuse, unfuse
from .gate import ChannelGate, ECAGate, EffectiveSEGate, GateSpec, SEGate
from .plan import Plan, Site

__version__ = "0.1.0"

__all__ = sorted(["apply", "plan", "remove", "part_input_size", "fuse", "unfuse", "save",
                  "load", "cost", "CostReport", "Plan", "Site", "ChannelGate", "SEGate", "ECAGate",
                  "EffectiveSEGate", "GateSpec", "SEInjectError", "__version__"])
