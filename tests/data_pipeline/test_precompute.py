"""Precompute on a real local Ray instance: output shards keep their names and original
members and add latents and T5/CLIP embeddings equal to direct encoder calls; an
interrupted run (some shards done, one caught mid-upload) resumes to exactly a clean
run's output through the CLI joined to the running cluster; a re-run does nothing; the
trainer's loader reads the result; the CLI writes to S3, skipping undecodable samples."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, launch_env

from configlib import from_dict
from data_pipeline.build import main as build_main
from data_pipeline.loader import WebDatasetConfig, WebDatasetSource, decode_image
from data_pipeline.precompute import MANIFEST, load_spec, main, precompute
from data_pipeline.shards import INDEX_SUFFIX, ShardWriter, load_index, parse_sample
from data_pipeline.tokenizer import train_tokenizer

NUM_SHARDS, SHARD_SIZE = 4, 50
WIDTH, HEIGHT = 12, 10  # decoded size differs from the 16 x 16 shards: the spec decides
SCALE, SHIFT = 2.0, 0.5
NEW_MEMBERS = {"latent.npy", "t5.npy", "t5_mask.npy", "clip.npy", "clip_pooled.npy"}


def spec_dict(tokenizer: str, **overrides) -> dict:
    spec = {
        "resolution": [WIDTH, HEIGHT],
        "autoencoder": {"name": "identity", "scale": SCALE, "shift": SHIFT},
        "t5": {"random_init": True, "tokenizer_path": tokenizer, "max_length": 12},
        "clip": {"arch": "ViT-L-14", "random_init": True, "max_length": 16},
        "dtype": "float32",
    }
    return {**spec, **overrides}


def write_spec(path: Path, spec: dict) -> str:
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Digit shards (4 x 50 samples, 16 x 16), a tokenizer trained on their captions, a spec."""
    root = tmp_path_factory.mktemp("precompute")
    shards = root / "shards"
    build_main(["builtin:digits", "--out", str(shards), "--size", "16", "--shard-size"]
               + [str(SHARD_SIZE), "--limit", str(NUM_SHARDS * SHARD_SIZE)])  # fmt: skip
    train_tokenizer([str(shards)], str(root / "spm"), 48, model_type="bpe", progress=False)
    tokenizer = str(root / "spm.model")
    spec = write_spec(root / "spec.yaml", spec_dict(tokenizer))
    return {"root": root, "shards": shards, "tokenizer": tokenizer, "spec": spec}


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module; precompute() reuses it, the CLI joins it."""
    import logging

    import ray

    ray.init(
        address="local",  # a new instance, never a head another test started on this machine
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 << 20,
        logging_level=logging.WARNING,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def clean(data, ray_address):
    dest = data["root"] / "clean"
    summary = precompute(
        [str(data["shards"])],
        str(dest),
        load_spec(data["spec"]),
        num_workers=2,
        batch_size=16,
        progress=False,
    )
    return dest, summary


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.tar"))


def read_samples(url: str) -> dict[str, dict[str, bytes]]:
    import fsspec

    index = load_index(url)
    with fsspec.open(url, "rb") as fh:
        out = {}
        for entry in index.samples:
            fh.seek(entry.offset)
            out[entry.key] = parse_sample(fh.read(entry.size))
    return out


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def error_lines(stderr: str) -> list[str]:
    """The CLI's own ``error:`` lines. Ray forwards its daemons' log lines (e.g. the
    raylet's disk monitor) to the driver's stderr, so they may come before or after."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.precompute", "--no-progress", *map(str, args)],
        cwd=REPO,
        env=env or launch_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )


# ------------------------------------------------------------------------------ tests
def test_outputs_match_direct_encoders(data, clean):
    from data_pipeline.text_encoders import build_text_encoder

    dest, summary = clean
    assert (summary.done, summary.skipped, summary.failed) == (NUM_SHARDS, 0, [])
    assert (summary.samples, summary.failed_samples) == (NUM_SHARDS * SHARD_SIZE, 0)
    assert shard_names(dest) == shard_names(data["shards"])
    spec = load_spec(data["spec"])
    t5, clip = build_text_encoder(spec.t5), build_text_encoder(spec.clip)
    for name in shard_names(dest):
        original = read_samples(str(data["shards"] / name))
        written = read_samples(str(dest / name))
        assert list(written) == list(original)  # same keys, same order
        in_meta = [e.meta for e in load_index(str(data["shards"] / name)).samples]
        assert [e.meta for e in load_index(str(dest / name)).samples] == in_meta
        captions = []
        for key, fields in written.items():
            assert set(fields) == set(original[key]) | NEW_MEMBERS
            for ext, value in original[key].items():  # originals byte for byte
                assert fields[ext] == value
            image = decode_image(original[key]["png"], WIDTH, HEIGHT)
            latent = npy(fields["latent.npy"])
            assert latent.shape == (3, HEIGHT, WIDTH) and latent.dtype == np.float32
            assert np.array_equal(latent, ((image - SHIFT) * SCALE).numpy())
            captions.append(original[key]["txt"].decode())
        expect_t5, expect_clip = t5(captions), clip(captions)
        stored = {
            ext: np.stack([npy(fields[ext]) for fields in written.values()]) for ext in NEW_MEMBERS
        }
        assert stored["t5.npy"].shape == (SHARD_SIZE, 12, t5.width)
        assert stored["clip.npy"].shape == (SHARD_SIZE, 16, clip.width)
        assert stored["clip_pooled.npy"].shape == (SHARD_SIZE, expect_clip["pooled"].shape[1])
        assert stored["t5_mask.npy"].dtype == np.bool_
        assert np.array_equal(stored["t5_mask.npy"], expect_t5["mask"].numpy())
        for ext, expected in (
            ("t5.npy", expect_t5["sequence"]),
            ("clip.npy", expect_clip["sequence"]),
            ("clip_pooled.npy", expect_clip["pooled"]),
        ):
            assert np.allclose(stored[ext], expected.numpy(), atol=1e-5), ext
        # one embedding per distinct caption, not one constant vector
        pooled = {caption: stored["clip_pooled.npy"][i] for i, caption in enumerate(captions)}
        vectors = np.stack(list(pooled.values()))
        gaps = np.abs(vectors[:, None] - vectors[None]).max(-1) + np.eye(len(vectors))
        assert len(pooled) > 1 and gaps.min() > 1e-3
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["spec"]["t5"]["tokenizer_path"] == data["tokenizer"]


def test_interrupted_run_resumes_to_the_clean_output(data, clean, ray_address):
    clean_dest, _ = clean
    dest = data["root"] / "resumed"
    spec = load_spec(data["spec"])
    # the "interruption": a run that stops after two shards ...
    first = precompute(
        [str(data["shards"])], str(dest), spec, num_workers=1, batch_size=16, limit_shards=2
    )
    assert (first.done, first.skipped, first.left) == (2, 0, 2)
    assert len(list(dest.glob("*" + INDEX_SUFFIX))) == 2
    # ... and a third shard caught mid-upload: a partial tar without its index
    partial = dest / "shard-000002.tar"
    partial.write_bytes((clean_dest / partial.name).read_bytes()[:5000])
    done_before = {p.name: p.stat().st_mtime_ns for p in dest.glob("*.tar")}

    # resumed through the CLI, joining the running cluster
    proc = run_cli("--in", data["shards"], "--out", dest, "--encoders", data["spec"],
                   "--address", ray_address, "--batch-size", 16, "--num-workers", 1)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 shards done, 2 skipped as already complete, 0 failed" in proc.stdout
    assert "200 samples" not in proc.stdout and "100 samples" in proc.stdout
    for name in ("shard-000000.tar", "shard-000001.tar"):  # complete shards untouched
        assert (dest / name).stat().st_mtime_ns == done_before[name]
    for name in shard_names(clean_dest):  # same bytes as the uninterrupted run
        for suffix in ("", INDEX_SUFFIX):
            assert (dest / name).with_name(name + suffix).read_bytes() == (
                clean_dest / (name + suffix)
            ).read_bytes(), name + suffix
    assert shard_names(dest) == shard_names(clean_dest)

    # idempotent: nothing left to do, nothing rewritten, Ray not even needed
    stamps = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    again = precompute([str(data["shards"])], str(dest), spec, num_workers=2)
    assert (again.done, again.skipped, again.samples, again.failed) == (0, NUM_SHARDS, 0, [])
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == stamps

    # a different spec into the same destination is refused instead of mixing encoders
    other = write_spec(
        data["root"] / "other.yaml", spec_dict(data["tokenizer"], resolution=[16, 16])
    )
    code = main(["--in", str(data["shards"]), "--out", str(dest), "--encoders", other])
    assert code == 2
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == stamps


def test_loader_reads_precomputed_shards(clean):
    dest, _ = clean
    cfg = from_dict(WebDatasetConfig, {"urls": str(dest), "kind": "latents"})
    source = WebDatasetSource(cfg, seed=0, rank=0, world_size=1, micro_batch=8, accum_steps=1)
    try:
        batch = source.next_batch()
        assert source.sample_shape() == (3, HEIGHT, WIDTH)
    finally:
        source.close()
    assert batch["x"].shape == (8, 3, HEIGHT, WIDTH) and batch["x"].dtype == torch.float32
    assert batch["t5"].shape == (8, 12, 32) and batch["t5_mask"].dtype == torch.bool
    assert batch["clip"].shape == (8, 16, 32) and batch["clip_pooled"].shape[0] == 8
    assert len(batch["caption"]) == 8 and batch["label"].shape == (8,)
    by_key = {}
    for name in shard_names(dest):
        by_key.update(read_samples(str(dest / name)))
    for i, key in enumerate(batch["key"]):
        assert torch.equal(batch["x"][i], torch.from_numpy(npy(by_key[key]["latent.npy"])))
        assert torch.equal(batch["t5"][i], torch.from_numpy(npy(by_key[key]["t5.npy"])))


def test_user_mistakes_exit_2_with_key_paths(data, ray_address, tmp_path, capsys):
    bad = {
        **spec_dict(data["tokenizer"]),
        "t5": {"tokenizer_path": data["tokenizer"]},  # neither path nor random_init
        "clip": {"random_init": True, "colour": "red"},
        "extra": 1,
    }
    out = tmp_path / "out"
    proc = run_cli("--in", data["shards"], "--out", out, "--encoders",
                   write_spec(tmp_path / "bad.yaml", bad))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert len(error_lines(proc.stderr)) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for problem in ("t5.path: missing", "clip.colour: unknown key", "extra: unknown key"):
        assert problem in proc.stderr
    assert not out.exists()

    def run(*args) -> tuple[int, str]:
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    spec = data["spec"]
    code, err = run("--in", tmp_path / "nowhere", "--out", out, "--encoders", spec)
    assert code == 2 and error_lines(err), err
    assert error_lines(err)[0].startswith("error: --in:"), err
    code, err = run("--in", data["shards"], "--out", data["shards"], "--encoders", spec)
    assert code == 2 and "choose another --out" in err
    code, err = run("--in", data["shards"], "--out", out, "--encoders", spec, "--batch-size", 0)
    assert code == 2 and "--batch-size must be >= 1" in err
    code, err = run("--in", data["shards"], "--out", out, "--encoders", tmp_path / "none.yaml")
    assert code == 2 and "not found" in err
    # a spec that validates but whose encoders cannot be built (the tokenizer is missing):
    # reported from the Ray worker in one line, and the spec is not recorded in --out
    missing = spec_dict(str(tmp_path / "missing.model"))
    missing_spec = write_spec(tmp_path / "missing.yaml", missing)
    code, err = run("--in", data["shards"], "--out", out, "--encoders", missing_spec,
                    "--num-workers", 1)  # fmt: skip
    assert len(error_lines(err)) == 1, err
    (line,) = error_lines(err)
    assert (
        code == 2 and line.startswith("error: building the encoders:") and "missing.model" in line
    )
    assert not (out / MANIFEST).exists() and not list(out.glob("*.tar"))


def test_cli_to_s3_skips_undecodable_samples(data, clean, s3_endpoint, tmp_path):
    """A fresh local Ray instance started by the CLI writes float16 shards to S3; bad
    samples are skipped and reported, a shard with no good sample fails (exit 1)."""
    import fsspec
    import s3fs

    clean_dest, _ = clean
    good = read_samples(str(data["shards"] / "shard-000000.tar"))
    keys = list(good)[:3]
    with ShardWriter(str(tmp_path / "broken"), prefix="broken") as writer:
        for key in keys:
            writer.write(key, good[key])
        writer.write("000999", {**good[keys[0]], "png": b"not a png"})
    with ShardWriter(str(tmp_path / "allbad"), prefix="allbad") as writer:
        writer.write("000000", {**good[keys[0]], "png": b"garbage"})
    spec = write_spec(tmp_path / "f16.yaml", spec_dict(data["tokenizer"], dtype="float16"))
    dest = f"s3://ckpts/precompute/{uuid.uuid4().hex[:8]}"  # moto's store outlives one server
    proc = run_cli("--in", data["shards"] / "shard-{000000..000001}.tar",
                   "--in", tmp_path / "broken", "--in", tmp_path / "allbad",
                   "--out", dest, "--encoders", spec, "--num-workers", 1)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 shards done, 0 skipped as already complete, 1 failed" in proc.stdout
    assert "103 samples, 2 failed samples" in proc.stdout
    assert "broken-000000.tar: skipped 1 samples" in proc.stderr and "000999" in proc.stderr
    assert "allbad-000000.tar: failed, not written" in proc.stderr
    assert "Traceback" not in proc.stderr

    s3fs.S3FileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(dest.removeprefix("s3://")))
    expected = ["broken-000000.tar", "shard-000000.tar", "shard-000001.tar"]
    assert names == sorted([MANIFEST] + expected + [n + INDEX_SUFFIX for n in expected])
    assert list(read_samples(f"{dest}/broken-000000.tar")) == keys
    written = read_samples(f"{dest}/shard-000000.tar")
    reference = read_samples(str(clean_dest / "shard-000000.tar"))
    assert list(written) == list(reference)
    for key in keys:
        for ext in NEW_MEMBERS - {"t5_mask.npy"}:
            array = npy(written[key][ext])
            assert array.dtype == np.float16
            assert np.array_equal(array, npy(reference[key][ext]).astype(np.float16)), ext
    shutil.rmtree(tmp_path / "allbad")  # rerun without the bad shard: nothing left to do
    proc = run_cli("--in", data["shards"] / "shard-{000000..000001}.tar",
                   "--in", tmp_path / "broken", "--out", dest, "--encoders", spec)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 shards done, 3 skipped as already complete" in proc.stdout
    s3fs.S3FileSystem.clear_instance_cache()


def test_example_spec_validates():
    spec = load_spec(str(REPO / "recipes" / "precompute" / "digits_tiny.yaml"))
    assert spec.t5 is not None and spec.clip is not None and spec.dtype == "float16"


def test_kl_vae_latents_are_the_autoencoders(data, ray_address):
    """The Ray precompute with a KL-VAE: each stored latent is the frozen autoencoder's
    normalised posterior mean of the decoded image (f2, 1 channel), computed in batches."""
    from models.autoencoders import build_autoencoder

    vae = {"name": "kl_vae", "random_init": True, "size": "tiny", "latent_channels": 1}
    spec = load_spec(
        write_spec(data["root"] / "vae.yaml", spec_dict(data["tokenizer"], autoencoder=vae))
    )
    dest = data["root"] / "vae_latents"
    summary = precompute(
        [str(data["shards"])], str(dest), spec, num_workers=2, batch_size=16, progress=False
    )
    assert (summary.done, summary.failed, summary.samples) == (
        NUM_SHARDS,
        [],
        NUM_SHARDS * SHARD_SIZE,
    )
    ae = build_autoencoder(spec.autoencoder)
    for name in shard_names(dest):
        original, written = read_samples(str(data["shards"] / name)), read_samples(str(dest / name))
        images = torch.stack([decode_image(f["png"], WIDTH, HEIGHT) for f in original.values()])
        stored = np.stack([npy(written[key]["latent.npy"]) for key in original])
        assert stored.shape == (SHARD_SIZE, 1, HEIGHT // 2, WIDTH // 2)
        with torch.no_grad():
            expected = ae.encode(images).numpy()
        assert np.allclose(stored, expected, atol=1e-5), float(np.abs(stored - expected).max())
        assert stored.std() > 0.05  # latents of digits, not a constant
