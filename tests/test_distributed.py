"""recbook's training loops under torchrun (2 CPU processes, gloo) give the one-process result."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def run(*command, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RECBOOK_DEVICE": "cpu"}
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    run(str(WORKER), str(one))
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(two))
    return one, two


@pytest.mark.parametrize("loop", ["bi", "scorer", "distil"])
def test_two_processes_train_like_one(trained, loop):
    one, two = (folder / f"{loop}.safetensors" for folder in trained)
    a, b = load_file(one), load_file(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)
    meta = [safe_open(str(f), "pt").metadata() for f in (one, two)]
    assert [m["world"] for m in meta] == ["1", "2"]
    losses = [json.loads(m["losses"]) for m in meta]
    assert len(losses[0]) == len(losses[1]) == 6  # 21 examples, batch 8, 2 epochs: every batch seen by both
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5, rtol=1e-4)
    assert float(meta[0]["moved"]) > 1e-3  # training moved the weights: not a comparison of two untouched models
