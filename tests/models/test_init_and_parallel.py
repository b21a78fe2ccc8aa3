"""Weight init is independent of sharding; parallelize keeps parameter names."""

from __future__ import annotations

import torch

from models.common.init import ParamInit
from models.common.parallelize import ParallelPlan
from models.flow_mlp import FlowMLPConfig, build, parallelize


def test_init_depends_on_seed_and_name_not_order():
    a, b = build(FlowMLPConfig()), build(FlowMLPConfig())
    a.init_weights(3)
    # initialise b's parameters in reverse order through the same initialiser
    init = ParamInit(b, 3)
    for _, param in reversed(list(b.named_parameters())):
        init.normal_(param, 1.0)
    b.init_weights(3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    c = build(FlowMLPConfig())
    c.init_weights(4)
    assert not torch.equal(a.in_proj.weight, c.in_proj.weight)


def test_blocks_start_as_identity():
    model = build(FlowMLPConfig())
    model.init_weights(0)
    h, temb = torch.randn(4, 128), torch.randn(4, 64)
    assert torch.equal(model.blocks[0](h, temb), h)


def test_parallelize_without_sharding_keeps_state_dict_keys():
    plain = build(FlowMLPConfig())
    keys = list(plain.state_dict())
    wrapped = parallelize(
        build(FlowMLPConfig()), ParallelPlan(backend="none", activation_checkpointing=True)
    )
    assert list(wrapped.state_dict()) == keys


def test_flops_per_sample_counts_every_matmul():
    model = build(FlowMLPConfig(size="tiny"))
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.flops_per_sample() == 6 * weights
