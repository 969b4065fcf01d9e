"""Turn a plain checkpoint into an SE checkpoint with the command line, load it with one call,
and fine-tune it briefly on a small synthetic task.

    python examples/convert_and_finetune.py

In real use the checkpoint is one you trained (or timm's pretrained weights saved with
torch.save); here a ResNet-18 with 4 classes stands in for it, and the data are random images
whose class sets the mean of each colour channel.
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import se_inject

torch.manual_seed(0)
with tempfile.TemporaryDirectory() as tmp:
    plain = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    torch.save(plain.state_dict(), Path(tmp) / "resnet18.pth")

    # 1. Convert: the same command a user types.
    out = Path(tmp) / "se_resnet18.safetensors"
    subprocess.run([sys.executable, "-m", "se_inject", "convert", str(Path(tmp) / "resnet18.pth"),
                    "--model", "resnet18", "-o", str(out)], check=True)

    # 2. Load: the file alone rebuilds the gated model (architecture, classes, gates, weights).
    model = se_inject.load(out)

x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    same = (model.eval()(x) - plain(x)).abs().max() <= 1e-6 * plain(x).abs().max()
print(f"{type(model).__name__}: {len(se_inject.plan(model).skipped)} blocks already gated, "
      f"{sum(p.numel() for p in model.parameters()):,} parameters")
print("converted outputs equal the original:", bool(same))

# 3. Fine-tune briefly on synthetic data: class k shifts the channel means by a fixed pattern.
pattern = torch.randn(4, 3, 1, 1)
labels = torch.randint(0, 4, (128,))
images = 2 * torch.randn(128, 3, 32, 32) + pattern[labels]
gate_params = [p for n, p in model.named_parameters() if ".se_gate." in n]
others = [p for n, p in model.named_parameters() if ".se_gate." not in n]
opt = torch.optim.AdamW([{"params": gate_params, "lr": 1e-2},   # new layers learn faster
                         {"params": others, "lr": 1e-3}])


def loss_on_all() -> float:
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(images), labels).item()


before = loss_on_all()
model.train()
for step in range(20):
    idx = torch.randint(0, 128, (32,))
    loss = F.cross_entropy(model(images[idx]), labels[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
after = loss_on_all()
moved = sum(1 for n, m in model.named_modules() if isinstance(m, se_inject.SEGate)
            and m.fc2.weight.abs().sum() > 0)
print(f"loss before fine-tuning: {before:.4f}")
print(f"loss after 20 steps: {after:.4f}")
print(f"gates whose excitation weights left zero: {moved}")
