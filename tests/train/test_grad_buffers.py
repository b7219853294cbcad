"""The Trainer's gradients are views of two persistent flat buffers (dense weights, experts):
they must stay views through steps and a checkpoint round trip, and anything that replaces a
.grad is refused before the all-reduce would miss it. One process, no launcher."""

import pytest

torch = pytest.importorskip("torch")

from piper_moe.train import config as C  # noqa: E402
from piper_moe.train.trainer import Trainer, _is_expert  # noqa: E402


def _trainer(tmp_path):
    cfg = C.load("tiny", {"steps": 3, "rebalance": {"enabled": False},
                          "strategy": {"pp": 1, "dp": 1, "ep": 1},
                          "checkpoint": {"dir": str(tmp_path / "ckpt")},
                          "batch": {"micro_batch": 2, "global_batch": 4, "seq_len": 16}})
    return Trainer(cfg, progress=False)


def _views(t: Trainer) -> bool:
    for expert, buf in t._grad_buffers.items():
        lo = buf.data_ptr()
        hi = lo + buf.numel() * buf.element_size()
        for name, p in t.params:
            if _is_expert(name) == expert and not lo <= p.grad.data_ptr() < hi:
                return False
    return True


def test_grads_stay_views_of_the_buffers(tmp_path):
    t = _trainer(tmp_path)
    assert set(t._grad_buffers) == {False, True}  # dense and expert buffers
    total = sum(p.numel() for _, p in t.params)
    assert sum(b.numel() for b in t._grad_buffers.values()) == total
    for _ in range(2):
        t.train_step()
        assert _views(t)
        assert any(bool(b.abs().sum() > 0) for b in t._grad_buffers.values())
    t.save(tmp_path / "ckpt")
    fresh = _trainer(tmp_path)
    assert fresh.resume(tmp_path / "ckpt")
    fresh.train_step()
    assert _views(fresh)


def test_a_replaced_grad_is_refused(tmp_path):
    t = _trainer(tmp_path)
    t.train_step()
    t.optimizer.zero_grad(set_to_none=True)  # what a plain PyTorch loop would do
    with pytest.raises(RuntimeError, match="no longer a view"):
        t.train_step()
