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
