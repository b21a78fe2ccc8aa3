"""Heavy optional modules load only on the paths that use them, so `import trainer` is fast
and a GPU box with only torch can run the models."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, launch_env

HEAVY = (
    "ray",
    "deepspeed",
    "open_clip",
    "transformers",
    "s3fs",
    "wandb",
    "tensorboard",
    "webdataset",
)


def test_core_modules_do_not_import_heavy_dependencies():
    code = (
        "import sys, trainer, models, data_pipeline, cluster\n"
        "import trainer.launch, trainer.loop, trainer.config, trainer.checkpoint, trainer.export\n"
        "import models.flow_mlp, data_pipeline.synthetic, cluster.env, cluster.ray_train\n"
        "import data_pipeline.tokenizer, data_pipeline.text_encoders, data_pipeline.loader\n"
        "import data_pipeline.build, data_pipeline.shards, models.autoencoder, data_pipeline.precompute\n"
        "import trainer.sample, trainer.objectives.conditioning, models.mmdit\n"
        "import cluster.slurm, models.dlm, data_pipeline.text_tokens, data_pipeline.arith\n"
        "import trainer.objectives.mdlm, trainer.objectives.sedd, trainer.objectives.bd3lm\n"
        "import trainer.objectives.ar, trainer.objectives.text_eval, trainer.samplers.discrete\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=launch_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported eagerly: {proc.stdout.strip()}"
