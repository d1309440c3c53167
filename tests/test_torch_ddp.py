"""bnfast.torch's modules under torch.nn.parallel.DistributedDataParallel: gloo ranks spawned
by torch.multiprocessing (tests/torch_ddp_main.py, in a subprocess with a timeout); converted
and fused nets against the stock net, each under DDP, step by step, on every rank."""
import pytest

pytest.importorskip("torch")

from ranks import run_script  # noqa: E402


@pytest.mark.parametrize("ranks", [2, 3])
def test_ddp_training_steps_match_stock(ranks, tmp_path):
    run_script("torch_ddp_main.py", ranks, tmp_path)
