"""bnfast.torch.SyncBatchNorm: gloo ranks spawned by torch.multiprocessing (in a subprocess
with a timeout, so a hang fails instead of stalling), and its single-process surface."""
import os
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
import bnfast.torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 300


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_training_over_gloo_equals_single_process(ranks, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # localhost only, whatever the host's interfaces
    try:
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "torch_sync_main.py"), str(ranks), str(tmp_path)],
            capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{ranks} gloo ranks did not finish in {TIMEOUT} s (a hang?):\n"
                    f"{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = sorted(re.findall(r"rank (\d+) of (\d+): ok", proc.stdout))
    assert done == [(str(r), str(ranks)) for r in range(ranks)], proc.stdout + proc.stderr


def test_without_a_process_group_it_is_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    sync = bnfast.torch.SyncBatchNorm(3, dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    y, y_ref = sync(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    (gx,) = torch.autograd.grad(y.sum() + (y ** 2).sum(), x)
    (gx_ref,) = torch.autograd.grad(y_ref.sum() + (y_ref ** 2).sum(), x)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(sync.running_var, ref.running_var)
    assert sync.num_batches_tracked == 1
    with pytest.raises(ValueError, match="at least 2D"):
        sync(torch.ones(3, dtype=torch.float64))


def test_convert_sync_batchnorm():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                                bnfast.torch.BatchNorm1d(2))
    bn_weight, bn_mean = model[1].weight, model[1].running_mean
    converted = bnfast.torch.convert_sync_batchnorm(model)
    assert [type(m) for m in converted[1:]] == [bnfast.torch.SyncBatchNorm] * 2
    assert converted[1].weight is bn_weight and converted[1].running_mean is bn_mean
    assert set(converted.state_dict()) == set(model.state_dict())
    fused = torch.nn.Sequential(bnfast.torch.FusedBatchNorm2d(4))
    with pytest.raises(TypeError, match="fused"):
        bnfast.torch.convert_sync_batchnorm(fused)
