"""The remote artifact store (:mod:`fkpd.store.remote_artifacts`) against a real
S3-compatible server: ``moto`` in server mode on 127.0.0.1, reached through ``s3fs`` with
the endpoint given the documented way (``FSSPEC_S3_ENDPOINT_URL``).

Atomic writes (nothing under the final key while the writer runs, nothing left when it
fails, the old object kept), sha256 checked on read (a replaced object raises, a damaged
cache copy is fetched again), missing objects, listing, path traversal refused as the
local store refuses it, checkpoint folders through the sha256-keyed cache, a bucket that
does not exist, the ``file://`` protocol's temporary key and move, and the preference
store's segments on S3.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from fkpd.store import (  # noqa: E402
    ArtifactDir,
    ArtifactIntegrityError,
    ArtifactPathError,
    ArtifactUnavailableError,
    Store,
    open_artifacts,
)
from fkpd.store.remote_artifacts import RemoteArtifacts  # noqa: E402

BUCKET = "fkpd-unit"


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1 (a free port), with dummy credentials and the
    endpoint in ``FSSPEC_S3_ENDPOINT_URL``, as a user would configure it; yields the
    endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def bucket(s3_server):
    """A fresh bucket on the module's moto server; the endpoint is in the environment."""
    import s3fs

    s3fs.S3FileSystem(endpoint_url=s3_server).mkdir(BUCKET)
    return f"s3://{BUCKET}"


@pytest.fixture
def remote(bucket, tmp_path) -> RemoteArtifacts:
    store = open_artifacts(f"{bucket}/{uuid.uuid4().hex[:8]}", cache_dir=tmp_path / "cache")
    assert isinstance(store, RemoteArtifacts) and not store.is_local
    return store


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_write_is_atomic_and_verified_on_read(remote: RemoteArtifacts):
    rel, digest = remote.write_atomic("projects/1/a.bin", b"first version")
    assert (rel, digest) == ("projects/1/a.bin", sha(b"first version"))
    assert remote.read_bytes(rel, digest) == b"first version" and remote.sha256(rel) == digest

    seen_while_writing = []

    def writer(f) -> None:
        f.write(b"half of it")
        seen_while_writing.append(remote.read_bytes(rel))  # the old object, untouched
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        remote.write_atomic(rel, writer)
    assert seen_while_writing == [b"first version"]
    assert remote.read_bytes(rel, digest) == b"first version"
    assert remote.list("projects") == ["projects/1/a.bin"]  # no temporary key left behind

    during = []

    def video_writer(path: Path) -> None:  # encoders that need a file name keep the suffix
        assert path.suffix == ".mp4"
        path.write_bytes(b"frames")
        during.append(remote.exists("projects/1/clip.mp4"))

    rel2, digest2 = remote.write_atomic("projects/1/clip.mp4", video_writer, to_path=True)
    assert during == [False] and remote.exists(rel2) and remote.read_bytes(rel2, digest2) == b"frames"


def test_sha256_mismatch_and_damaged_cache(remote: RemoteArtifacts):
    rel, digest = remote.write_atomic("ckpt/model.safetensors", b"weights v1")
    remote.fs.pipe_file(remote._key(rel), b"weights v2 put there by someone else")
    remote.cache_dir.joinpath("sha256").rename(remote.cache_dir / "dropped")  # nothing cached
    for read in (lambda: remote.read_bytes(rel, digest), lambda: remote.local_file(rel, digest)):
        with pytest.raises(ArtifactIntegrityError, match=r"has sha256 [0-9a-f]{64}, but the database recorded"):
            read()

    rel, digest = remote.write_atomic("ckpt/other.bin", b"good bytes")
    cached = remote.local_file(rel, digest)
    assert cached.read_bytes() == b"good bytes" and digest in cached.parts
    cached.write_bytes(b"bit rot")  # a damaged cache copy is never handed out
    assert remote.read_bytes(rel, digest) == b"good bytes"
    assert remote.local_file(rel, digest).read_bytes() == b"good bytes"


def test_missing_object_and_listing(remote: RemoteArtifacts):
    for call in (lambda: remote.read_bytes("projects/9/nope.npz"), lambda: remote.sha256("projects/9/nope.npz"),
                 lambda: remote.local_file("projects/9/nope.npz", "0" * 64)):
        with pytest.raises(ArtifactIntegrityError, match=r"'projects/9/nope.npz' not found at s3://"):
            call()
    assert not remote.exists("projects/9/nope.npz")
    for rel in ("projects/1/b/2.npz", "projects/1/a.npz", "projects/10/c.npz", "imported/x.npz"):
        remote.write_atomic(rel, rel.encode())
    assert remote.list("projects/1") == ["projects/1/a.npz", "projects/1/b/2.npz"]  # not projects/10
    assert remote.list() == ["imported/x.npz", "projects/1/a.npz", "projects/1/b/2.npz", "projects/10/c.npz"]
    assert remote.list("nothing/here") == []
    remote.remove("imported/x.npz")
    remote.remove_tree("projects/1")
    assert remote.list() == ["projects/10/c.npz"]


@pytest.mark.parametrize("bad", ["../escape.bin", "/etc/passwd", "projects/../../x", "C:\\x", "", "a/.."])
def test_path_traversal_refused_as_the_local_store_does(remote: RemoteArtifacts, tmp_path, bad):
    local = ArtifactDir(tmp_path / "local")
    for store in (local, remote):
        for call in (lambda: store.write_atomic(bad, b"x"), lambda: store.read_bytes(bad),
                     lambda: store.local_file(bad), lambda: store.list(bad or "..")):
            with pytest.raises(ArtifactPathError):
                call()
    with pytest.raises(ArtifactPathError, match="no local path"):
        remote.resolve("projects/1/a.bin")
    assert remote.list() == []


def test_checkpoint_folder_through_the_cache(remote: RemoteArtifacts, tmp_path):
    work = remote.workdir("projects/1/rounds/r1")
    assert work.is_relative_to(remote.root) and work.is_dir()
    (work / "checkpoint").mkdir()
    (work / "checkpoint" / "model.safetensors").write_bytes(b"tensor bytes")
    (work / "checkpoint" / "config.json").write_text('{"hidden_dim": 64}')
    (work / "checkpoint" / ".model.safetensors.abc.part").write_bytes(b"left by a crash")
    hashes = remote.publish_dir(work / "checkpoint", "projects/1/rounds/r1/checkpoint")
    weights = "projects/1/rounds/r1/checkpoint/model.safetensors"
    assert sorted(hashes) == ["projects/1/rounds/r1/checkpoint/config.json", weights]
    assert hashes[weights] == sha(b"tensor bytes")

    other = RemoteArtifacts(remote.url, cache_dir=tmp_path / "another-machine")  # no shared disk
    path = other.local_file(weights, hashes[weights], siblings=True)
    assert path.parent.name == hashes[weights] and path.parent.is_relative_to(tmp_path / "another-machine")
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json", "model.safetensors"]
    assert (path.parent / "config.json").read_text() == '{"hidden_dim": 64}'


def test_unknown_bucket_and_no_bucket(s3_server, tmp_path):
    store = RemoteArtifacts("s3://no-such-bucket-here/p", cache_dir=tmp_path)
    with pytest.raises(ArtifactUnavailableError, match=r"cannot write the artifact store s3://no-such-bucket-here/p "
                                                       r"at http://127\.0\.0\.1:\d+.*FKPD_ARTIFACT_URL"):
        store.write_atomic("a.bin", b"x")
    with pytest.raises(ArtifactPathError, match="names no bucket"):
        open_artifacts("s3://")


def test_file_protocol_moves_a_temporary_key(tmp_path):
    """A file system without atomic puts gets a temporary key and a move."""
    store = open_artifacts(f"file://{tmp_path / 'bucket'}", cache_dir=tmp_path / "cache")
    assert isinstance(store, RemoteArtifacts) and not store._atomic_put
    rel, digest = store.write_atomic("projects/1/x.npz", b"payload")
    assert sorted(os.listdir(tmp_path / "bucket" / "projects" / "1")) == ["x.npz"]
    assert store.read_bytes(rel, digest) == b"payload"


def test_store_segments_on_s3(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("FKPD_ARTIFACT_URL", f"{bucket}/store")
    monkeypatch.setenv("FKPD_ARTIFACT_CACHE", str(tmp_path / "cache"))
    with Store(f"sqlite:///{tmp_path / 'db.sqlite'}") as store:
        assert store.artifact_location == f"{bucket}/store" and "store" in repr(store)
        project = store.create_project("p", "metaworld/door-open-v3")
        version = store.add_policy_version(project.id, None)
        obs, act, rew = np.ones((3, 4)), np.zeros((3, 2)), np.arange(3.0)
        seg, seg_sha = store.artifacts.save_segment("projects/1/batches/b/p000_a.npz", obs, act, rew)
        video, video_sha = store.write_artifact_atomic("projects/1/batches/b/p000_a.mp4", b"mp4 bytes")
        clip = store.add_clip(version.id, segment_path=seg, length=3, fps=10.0, video_path=video)  # sha256 read from S3
        assert (clip.segment_sha256, clip.video_sha256) == (seg_sha, video_sha)
        arrays = store.artifacts.load_segment(seg, seg_sha)
        np.testing.assert_array_equal(arrays["rewards"], rew.astype(np.float32))
    assert not (tmp_path / "labels").exists()
