"""Storage, credential and weight failures end a run with one ``error:`` line naming the
recipe key and the URL (exit 2, no traceback), from the launcher before ranks start or
from rank 0 alone after. Against a real S3 endpoint: moto's server in its own process
with request authentication on, so wrong keys and a read-only user are refused as AWS
would refuse them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest
from conftest import REPO, launch_cmd, launch_env, run_module

RECIPE = REPO / "recipes" / "tiny" / "digits_flow.yaml"
READ_ONLY = ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"]


@dataclass
class Store:
    url: str
    admin: tuple[str, str]
    reader: tuple[str, str]
    shards: str  # s3:// prefix holding the digit shards


def _policy(actions) -> str:
    statement = {"Effect": "Allow", "Action": actions, "Resource": "*"}
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """moto with authentication after its first 6 requests (the IAM set-up below): an
    admin user, a read-only user, and bucket 'data' with digit shards."""
    import boto3

    from cluster.env import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="6"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert time.time() < deadline, "moto server did not start"
            time.sleep(0.1)
    anon = dict(aws_access_key_id="x", aws_secret_access_key="x")
    iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", **anon)
    keys = {}
    for user, actions in (("admin", "*"), ("reader", READ_ONLY)):
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=_policy(actions))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
    admin = dict(aws_access_key_id=keys["admin"][0], aws_secret_access_key=keys["admin"][1])
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", **admin)
    s3.create_bucket(Bucket="data")
    local = tmp_path_factory.mktemp("digits")
    args = ["builtin:digits", "--out", str(local), "--size", "8", "--shard-size", "600"]
    build = run_module("data_pipeline.build", *args)
    assert build.returncode == 0, build.stderr[-3000:]
    for path in sorted(local.iterdir()):
        s3.upload_file(str(path), "data", f"digits/{path.name}")
    yield Store(url, keys["admin"], keys["reader"], "s3://data/digits")
    server.terminate()
    server.wait(timeout=30)


def env_for(store: Store, credentials: tuple[str, str] | None) -> dict[str, str]:
    """The launcher's environment: the endpoint, and these keys or none at all (no shared
    files, no instance metadata: nothing is looked up off this machine)."""
    env = launch_env()
    for name in list(env):
        if name.startswith("AWS_") or name.startswith("FSSPEC_S3"):
            del env[name]
    env.update(
        AWS_ENDPOINT_URL=store.url,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_CONFIG_FILE=os.devnull,
    )
    if credentials is not None:
        env.update(AWS_ACCESS_KEY_ID=credentials[0], AWS_SECRET_ACCESS_KEY=credentials[1])
    return env


def launch(env, *overrides, check=False, timeout=240, recipe=RECIPE) -> subprocess.CompletedProcess:
    cmd = launch_cmd(recipe, *overrides)
    return subprocess.run(
        [*cmd, "--check"] if check else cmd,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The run's single error line (exit 2, no traceback, no rank noise)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "launch: rank" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-4000:]
    return proc.stderr[proc.stderr.index("error:") :].strip()


def s3_run(store: Store, tmp_path, *extra: str) -> list[str]:
    ckpt = f"s3://data/ckpt/{uuid.uuid4().hex[:8]}"
    return [
        f"data.urls={store.shards}",
        f"checkpoint.dir={ckpt}",
        f"run.output_dir={tmp_path / 'run'}",
        "run.max_steps=6",
        "eval.every=0",
        "cluster.num_workers=2",
        *extra,
    ]


NO_CREDENTIALS = "no S3 credentials found"


@pytest.mark.e2e
def test_check_prints_what_it_found_and_exits_0(store, tmp_path):
    proc = launch(env_for(store, store.admin), *s3_run(store, tmp_path), check=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = {line.split()[1]: line for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"data.urls", "checkpoint.dir", "run.output_dir"}, proc.stdout
    assert all(line.startswith("ok ") for line in rows.values()), proc.stdout
    assert rows["data.urls"].endswith("3 shards"), proc.stdout
    assert rows["checkpoint.dir"].endswith("writable"), proc.stdout
    assert not (tmp_path / "run").exists()  # a check trains nothing and writes nothing


@pytest.mark.e2e
@pytest.mark.parametrize(
    "case, expected",
    [
        ("no credentials", f"data.urls: s3://data/digits: {NO_CREDENTIALS}"),
        (
            "wrong key",
            "data.urls: s3://data/digits: the store rejected the credentials (InvalidAccessKeyId)",
        ),
        (
            "wrong secret",
            "data.urls: s3://data/digits: the store rejected the credentials (SignatureDoesNotMatch)",
        ),
        ("missing bucket", "data.urls: s3://no-such-bucket/digits: the bucket does not exist"),
        (
            "read-only checkpoints",
            "checkpoint.dir: s3://data/ckpt/{id}: access denied (AccessDenied)",
        ),
    ],
)
def test_the_launcher_names_the_key_and_url_in_one_line(store, tmp_path, case, expected):
    credentials = {
        "no credentials": None,
        "wrong key": ("AKIANOSUCHKEY", "secret"),
        "wrong secret": (store.admin[0], "not-the-secret"),
        "read-only checkpoints": store.reader,
    }.get(case, store.admin)
    overrides = s3_run(store, tmp_path)
    if case == "missing bucket":
        overrides[0] = "data.urls=s3://no-such-bucket/digits"
    ckpt_id = overrides[1].rsplit("/", 1)[1]
    started = time.time()
    proc = launch(env_for(store, credentials), *overrides)
    line = one_error_line(proc)
    assert line.startswith("error: "), line
    wanted = f"  - {expected.format(id=ckpt_id)}"
    assert any(item.startswith(wanted) for item in line.splitlines()), line
    assert time.time() - started < 60  # found before any rank started, not after retries
    assert not (tmp_path / "run").exists()
    # --check says the same, in its table
    check = launch(env_for(store, credentials), *overrides, check=True)
    assert check.returncode == 2
    key = expected.split(":", 1)[0]
    assert any(row.startswith(f"ERR {key} ") for row in check.stdout.splitlines()), check.stdout


@pytest.mark.e2e
def test_the_headline_recipe_without_credentials_is_checked_in_one_table(store, tmp_path):
    """recipes/sd3_like.yaml as shipped, on a machine with none of its inputs: the table
    names the shards' and checkpoints' store (asked once) and every missing weight path."""
    proc = launch(
        env_for(store, None),
        f"run.output_dir={tmp_path / 'run'}",
        check=True,
        timeout=120,
        recipe="recipes/sd3_like.yaml",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    rows = {line.split()[1]: line for line in proc.stdout.splitlines()[1:]}
    for key in (
        "data.urls",
        "checkpoint.dir",
        "objective.conditioning.clip[0].path",
        "objective.conditioning.clip[1].path",
        "objective.conditioning.t5.path",
    ):
        assert rows[key].startswith("ERR "), proc.stdout
    assert rows["run.output_dir"].startswith("ok "), proc.stdout
    problems = proc.stderr.splitlines()[1:]
    shard = "s3://my-bucket/latents-1024/shard-000000.tar"
    assert problems[0].startswith(f"  - data.urls: {shard}: {NO_CREDENTIALS}"), problems
    ckpt = "s3://my-bucket/checkpoints/sd3_like"
    assert problems[-1].startswith(f"  - checkpoint.dir: {ckpt}: {NO_CREDENTIALS}"), problems
    assert "  - objective.conditioning.t5.path: /models/sd3/t5xxl does not exist" in problems


@pytest.mark.e2e
def test_after_ranks_start_only_rank_0_says_it(store, tmp_path):
    """Credentials that go missing after the launcher's check (here: ranks started by
    hand, as a supervisor starts them, without keys): rank 0 prints the one line, rank 1
    exits 2 in silence, and neither prints a traceback."""
    from cluster.env import free_port

    env = env_for(store, None)
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.update(LOCAL_WORLD_SIZE="2", GENFLOW_LOCAL_SUPERVISOR="1")
    cmd = launch_cmd(RECIPE, *s3_run(store, tmp_path))
    ranks = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [proc.communicate(timeout=240) for proc in ranks]
    codes = [proc.returncode for proc in ranks]
    assert codes == [2, 2], outputs
    assert "Traceback" not in outputs[0][1] + outputs[1][1], outputs
    assert "error:" not in outputs[1][1], outputs[1][1]
    errors = [line for line in outputs[0][1].splitlines() if "error:" in line]
    assert len(errors) == 1, outputs[0][1][-3000:]
    assert f": {NO_CREDENTIALS}: " in errors[0], errors
    assert errors[0].startswith(
        ("error: data.urls: s3://data/", "error: checkpoint.dir: s3://data/")
    )
