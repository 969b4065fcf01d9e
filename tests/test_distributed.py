"""Fine-tuning a gated model on 2 processes with PyTorch's own engines, DDP and FSDP2
(fully_shard), on the CPU with gloo: examples/finetune.py under torchrun."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import se_inject

from conftest import gates

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "finetune.py"


def _torchrun(tmp_path, *extra) -> tuple[str, Path]:
    out = tmp_path / ("fsdp.safetensors" if "--fsdp" in extra else "ddp.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29500 + os.getpid() % 1000 + len(extra)),
                        str(EXAMPLE), "--steps", "3", "--out", str(out), *extra],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ddp_and_fsdp2_keep_gates_identical_across_ranks_and_agree(tmp_path):
    ddp_out, ddp_file = _torchrun(tmp_path)
    fsdp_out, fsdp_file = _torchrun(tmp_path, "--fsdp")
    for text, engine in ((ddp_out, "DDP"), (fsdp_out, "FSDP2")):
        assert f"processes: 2, engine: {engine}" in text
        assert "gate parameters identical across ranks: True" in text
        assert "gates learned (excitation weights left zero): True" in text
    a, b = se_inject.load(ddp_file), se_inject.load(fsdp_file)
    assert len(gates(a)) == len(gates(b)) == 8
    sb = b.state_dict()
    for k, v in a.state_dict().items():     # the same steps on the same data: the same weights
        if v.is_floating_point():
            torch.testing.assert_close(v, sb[k], rtol=1e-4, atol=1e-5, msg=k)
