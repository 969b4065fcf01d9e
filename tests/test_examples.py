"""The examples run and reach the results they print."""
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_matches_timm_and_restores_the_model():
    r = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True,
                       text=True, check=True)
    assert "ResNet with 28,088,024 parameters" in r.stdout
    assert "max |gated - seresnet50|: 0.0\n" in r.stdout
    assert "outputs equal the original: True" in r.stdout


def test_convert_and_finetune_keeps_outputs_and_learns():
    r = subprocess.run([sys.executable, str(EXAMPLES / "convert_and_finetune.py")],
                       capture_output=True, text=True, check=True)
    out = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    assert out["converted outputs equal the original"] == "True"
    assert out["ResNet"].startswith("8 blocks already gated")     # all of ResNet-18's blocks
    before, after = float(out["loss before fine-tuning"]), float(out["loss after 20 steps"])
    assert after < 0.5 * before
    assert out["gates whose excitation weights left zero"] == "8"
