"""Metric learning under DDP mines and computes the loss on the global batch: two gloo processes, each with half of a
batch, give the loss a single process computes on the whole batch and, once their gradients are averaged as DDP does,
the single process's gradient (pytorch-metric-learning's MultiSimilarity loss and miner, written nowhere here)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning.losses import MultiSimilarityLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

from aggnets_train.tasks import metric_loss


def _batch():
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    labels = torch.arange(4).repeat_interleave(4)[torch.randperm(16, generator=gen)]
    weight = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    return inputs, labels, weight


def _loss_and_grad(inputs, labels, weight):
    weight = weight.clone().requires_grad_()
    embeddings = torch.nn.functional.normalize(inputs @ weight.T, dim=1)
    loss, scale = metric_loss(MultiSimilarityLoss(alpha=1.0, beta=50.0, base=0.0),
                              MultiSimilarityMiner(epsilon=0.1), embeddings, labels)
    (loss * scale).backward()
    return loss.detach(), weight.grad, scale


SPLITS = [(8, 8), (10, 6)]  # equal halves, and ranks holding different counts


def _rank(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        inputs, labels, weight = _batch()
        for index, sizes in enumerate(SPLITS):
            start = sum(sizes[:rank])
            part = slice(start, start + sizes[rank])
            loss, grad, scale = _loss_and_grad(inputs[part], labels[part], weight)
            dist.all_reduce(grad)
            grad /= world  # what DDP does to the gradients
            torch.save({"loss": loss, "grad": grad, "scale": scale}, f"{out}.{index}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_global_batch(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(2, init, out), nprocs=2, join=True)
    inputs, labels, weight = _batch()
    loss, grad, scale = _loss_and_grad(inputs, labels, weight)
    assert scale == 1 and float(loss) > 0
    for index, sizes in enumerate(SPLITS):
        for rank in range(2):
            got = torch.load(f"{out}.{index}.{rank}")
            assert got["scale"] == 2
            torch.testing.assert_close(got["loss"], loss, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got["grad"], grad, rtol=1e-10, atol=1e-12)
        local, _, _ = _loss_and_grad(inputs[:sizes[0]], labels[:sizes[0]], weight)
        assert not torch.allclose(local, loss)  # mining on the local part alone differs


def test_several_nodes_without_a_rendezvous_stop_with_what_a_node_needs():
    from omegaconf import OmegaConf

    from aggnets_train.config import ConfigError
    from aggnets_train.run import check_multi_node

    cfg = OmegaConf.create({"trainer": {"num_nodes": 2}})
    with pytest.raises(ConfigError, match=r"trainer.num_nodes=2: .*MASTER_ADDR.*NODE_RANK \(0\.\.1\).*MASTER_ADDR, "
                                          r"MASTER_PORT, NODE_RANK not set.*trainer.num_nodes=1"):
        check_multi_node(cfg, {})
    check_multi_node(cfg, {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "NODE_RANK": "1"})
    check_multi_node(cfg, {"SLURM_JOB_ID": "7"})
    check_multi_node(OmegaConf.create({"trainer": {"num_nodes": 1}}), {})
