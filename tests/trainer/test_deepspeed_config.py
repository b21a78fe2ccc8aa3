"""Validation of the DeepSpeed backend's recipe keys, before any rank starts: impossible
combinations, keys without effect under the other backend, the ``parallel.deepspeed``
passthrough checked against DeepSpeed's own config reader, and the engine config the
trainer builds (accepted by DeepSpeed as it is)."""

from __future__ import annotations

import subprocess

import pytest
from conftest import REPO, launch_cmd, launch_env

from trainer.config import ConfigError
from trainer.registry import load_config

RECIPE = REPO / "recipes" / "tiny" / "flow2d.yaml"
DS = "parallel.backend=deepspeed"


def problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(RECIPE, list(overrides))
    return info.value.problems


def test_deepspeed_recipe_validates_with_defaults():
    cfg = load_config(RECIPE, [DS, "parallel.offload_optimizer=cpu"])
    p = cfg.parallel
    assert (p.backend, p.zero_stage, p.offload_optimizer, p.offload_params) == (
        "deepspeed",
        3,
        "cpu",
        "none",
    )
    cfg = load_config(RECIPE, [DS, "parallel.zero_stage=3", "parallel.offload_params=cpu"])
    assert cfg.parallel.offload_params == "cpu"
    cfg = load_config(RECIPE, [DS, "cluster.num_workers=1"])  # one rank is fine
    assert cfg.cluster.num_workers == 1


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        (
            "parallel.zero_stage=2",
            "parallel.zero_stage: has no effect when parallel.backend is 'fsdp2'",
        ),
        (
            "parallel.nvme_path=/nvme",
            "parallel.nvme_path: has no effect when parallel.backend is 'fsdp2'",
        ),
        ("parallel.deepspeed={steps_per_print: 10}", "parallel.deepspeed: has no effect"),
        (
            "parallel.offload_optimizer=cpu",
            "parallel.offload_optimizer: offloading to cpu needs parallel.backend 'deepspeed'",
        ),
        (
            "parallel.offload_params=nvme",
            "parallel.offload_params: offloading to nvme needs parallel.backend 'deepspeed'",
        ),
    ],
)
def test_deepspeed_keys_under_fsdp2_are_errors(override, fragment):
    found = problems(override)
    assert any(fragment in p for p in found), found


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            ["parallel.reshard_after_forward=false"],
            "parallel.reshard_after_forward: has no effect with parallel.backend 'deepspeed'",
        ),
        (
            ["parallel.mixed_precision=bf16", "parallel.reduce_dtype=bf16"],
            "parallel.reduce_dtype: has no effect with parallel.backend 'deepspeed'; set "
            "parallel.deepspeed.communication_data_type",
        ),
        (
            ["parallel.zero_stage=2", "parallel.offload_params=cpu"],
            "parallel.offload_params: parameter offload needs parallel.zero_stage 3 (got 2)",
        ),
        (
            ["parallel.offload_optimizer=nvme"],
            "parallel.nvme_path: required when offload_optimizer or offload_params is 'nvme'",
        ),
        (
            ["parallel.nvme_path=/nvme"],
            "parallel.nvme_path: has no effect unless offload_optimizer or offload_params",
        ),
        (
            ["checkpoint.async_save=true"],
            "checkpoint.async_save: not supported with parallel.backend 'deepspeed'",
        ),
        (
            ["checkpoint.dir=s3://bucket/run"],
            "checkpoint.dir: 's3://bucket/run': DeepSpeed checkpoints need a local",
        ),
        (
            [
                "parallel.offload_params=nvme",
                "parallel.nvme_path=/nvme",
                "ema.enabled=true",
                "eval.every=10",
            ],
            "eval.use_ema: evaluating the EMA needs the parameters in memory",
        ),
    ],
)
def test_impossible_deepspeed_combinations(overrides, fragment):
    found = problems(DS, *overrides)
    assert any(fragment in p for p in found), found


@pytest.mark.parametrize(
    ("passthrough", "fragment"),
    [
        (
            "{train_batch_size: 8}",
            "deepspeed.train_batch_size: set by the recipe; use train.batch_size",
        ),
        (
            "{gradient_clipping: 0.5}",
            "deepspeed.gradient_clipping: set by the recipe; use train.grad_clip",
        ),
        (
            "{optimizer: {type: Adam}}",
            "deepspeed.optimizer: set by the recipe; use the optimizer section",
        ),
        (
            "{scheduler: {type: WarmupLR}}",
            "deepspeed.scheduler: set by the recipe; use the schedule",
        ),
        (
            "{bf16: {enabled: true}}",
            "deepspeed.bf16: set by the recipe; use parallel.mixed_precision",
        ),
        (
            "{zero_optimization: {stage: 2}}",
            "deepspeed.zero_optimization.stage: set by the recipe; use parallel.zero_stage",
        ),
        (
            "{zero_optimization: {offload_param: {device: cpu}}}",
            "deepspeed.zero_optimization.offload_param: set by the recipe; use parallel.offload_params",
        ),
        (
            "{checkpoint: {load_universal: true}}",
            "deepspeed.checkpoint.load_universal: set by the trainer",
        ),
        (
            "{steps_per_prnt: 10}",
            "deepspeed.steps_per_prnt: unknown DeepSpeed config key (did you mean 'steps_per_print'?)",
        ),
        (
            "{zero_optimization: {reduce_bucket_sise: 1000}}",
            "deepspeed.zero_optimization.reduce_bucket_sise: unknown key in DeepSpeed's "
            "zero_optimization schema (did you mean 'reduce_bucket_size'?)",
        ),
        (
            "{zero_optimization: {overlap_comm: maybe}}",
            "deepspeed.zero_optimization.overlap_comm: Input should be a valid boolean",
        ),
        ("{gradient_allreduce_op: product}", "parallel.deepspeed: DeepSpeed rejects this config"),
    ],
)
def test_passthrough_is_checked_against_deepspeed(passthrough, fragment):
    found = problems(DS, f"parallel.deepspeed={passthrough}")
    assert any(fragment in p for p in found), found


def test_valid_passthrough_keys_are_accepted():
    """Real DeepSpeed keys at the top level and inside zero_optimization pass; the same
    reader rejects the misspelt ones above, so acceptance is not a blanket yes."""
    extra = (
        "{steps_per_print: 50, wall_clock_breakdown: false, communication_data_type: fp32,"
        " zero_optimization: {reduce_bucket_size: 1000000, overlap_comm: true,"
        " stage3_param_persistence_threshold: 0}}"
    )
    cfg = load_config(RECIPE, [DS, f"parallel.deepspeed={extra}"])
    assert cfg.parallel.deepspeed["zero_optimization"]["reduce_bucket_size"] == 1000000


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_engine_config_is_accepted_by_deepspeed(stage):
    """The config built from the recipe: batch = micro x accumulation x ranks, clipping,
    precision, stage and offload where the recipe put them, passthrough merged in."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from trainer.backends.deepspeed_backend import engine_config

    overrides = [
        DS,
        f"parallel.zero_stage={stage}",
        "parallel.mixed_precision=bf16",
        "parallel.offload_optimizer=cpu",
        "parallel.deepspeed={zero_optimization: {reduce_bucket_size: 1000000}}",
    ]
    if stage == 3:
        overrides.append("parallel.offload_params=cpu")
    parallel = load_config(RECIPE, overrides).parallel
    config = engine_config(
        parallel, micro_batch=4, accum_steps=3, world_size=1, grad_clip=0.5, load_universal=True
    )
    ds = DeepSpeedConfig(config)
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu) == (12, 4)
    assert ds.gradient_accumulation_steps == 3 and ds.gradient_clipping == 0.5
    assert ds.zero_optimization_stage == stage and ds.bfloat16_config.enabled
    assert not ds.float16_config.enabled
    assert ds.zero_config.offload_optimizer.device == "cpu"
    assert (ds.zero_config.offload_param is not None) == (stage == 3)
    assert ds.zero_config.reduce_bucket_size == 1000000
    assert ds.load_universal_checkpoint


def test_launcher_exits_2_on_an_impossible_combination(tmp_path):
    proc = subprocess.run(
        launch_cmd(
            RECIPE,
            f"run.output_dir={tmp_path}",
            DS,
            "parallel.zero_stage=1",
            "parallel.offload_params=cpu",
        ),
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "parallel.offload_params: parameter offload needs parallel.zero_stage 3" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
