"""A non-editable install ships the built-in rules inside the package."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True)
    return next(out.glob("se_inject-*.whl"))


def test_wheel_holds_every_builtin_rule(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for rule in (ROOT / "rules").glob("*.yaml"):
        assert f"se_inject/rules/{rule.name}" in names


def test_installed_wheel_finds_its_rules_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True)
    code = ("import se_inject.rules as r; d = r.builtin_rules_dir(); "
            "print(d); print(','.join(x.name for x in r.resolve_rules(None)))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    # run from tmp_path, so that the checkout is not on sys.path
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, check=True)
    where, names = r.stdout.split()
    assert Path(where) == target / "se_inject" / "rules"
    assert names == "residual,inception"
