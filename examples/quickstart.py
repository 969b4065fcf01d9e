"""Gate a timm ResNet-50, check it against timm's own SE-ResNet-50, and take the gates out again.

    python examples/quickstart.py
"""
import timm
import torch

import se_inject

model = timm.create_model("resnet50", pretrained=False).eval()   # pretrained=True in real use
x = torch.randn(2, 3, 224, 224)
with torch.no_grad():
    before = model(x)

print(se_inject.plan(model, ratio=16))
se_inject.apply(model, ratio=16)
print(f"{type(model).__name__} with {sum(p.numel() for p in model.parameters()):,} parameters")

# The same weights in timm's hand-written SE-ResNet-50 compute the same function.
native = timm.create_model("seresnet50", pretrained=False).eval()
native.load_state_dict({k.replace(".se_gate.", ".se."): v for k, v in model.state_dict().items()})
with torch.no_grad():
    print("max |gated - seresnet50|:", (model(x) - native(x)).abs().max().item())

se_inject.remove(model)
with torch.no_grad():
    print("after remove(), outputs equal the original:", torch.equal(model(x), before))
