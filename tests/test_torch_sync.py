"""bnfast.torch.SyncBatchNorm: gloo ranks spawned by torch.multiprocessing (in a subprocess
with a timeout, so a hang fails instead of stalling), and its single-process surface."""
import pytest

torch = pytest.importorskip("torch")
import bnfast.torch  # noqa: E402
from ranks import run_script  # noqa: E402


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_training_over_gloo_equals_single_process(ranks, tmp_path):
    run_script("torch_sync_main.py", ranks, tmp_path)


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
