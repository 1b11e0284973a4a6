"""Fixtures for the remote cache and Ray executor tests.

- ``s3``: a moto S3 server on 127.0.0.1 for the whole session (``ThreadedMotoServer``); ``s3.bucket()``
  makes a fresh bucket and returns its ``s3://`` URL. Clients find it the usual AWS way
  (``AWS_ENDPOINT_URL`` and the ``AWS_*`` credentials in ``s3.env``).
- ``ray_address``: one local Ray cluster for the session (2 CPUs, a fake ``macos`` resource), on the
  loopback address; the workers inherit ``s3.env`` and find the test stages on PYTHONPATH.
- ``sdk``: runs real ``sdkiln`` processes with this folder's test stages plugged in, a private
  artifact root, worker cache and run log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SUPPORT = Path(__file__).resolve().parents[3] / "support"  # stages_for_remote.py
# moto does not check signatures: any value works, and this one must never show up in output or files.
AWS_SECRET = "sdkilnTestSecret-9f2c71d04be3"
# Ray resolves 127.0.0.1 to the machine's outward address unless clustering across machines is off.
RAY_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass
class S3:
    endpoint: str
    env: dict[str, str]
    _count: int = 0

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def bucket(self) -> str:
        """A fresh, empty bucket; returns ``s3://<bucket>/cache``."""
        self._count += 1
        name = f"sdkiln-test-{self._count}-{secrets.token_hex(3)}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}/cache"

    def objects(self, url: str) -> dict[str, bytes]:
        """{key relative to the cache prefix: bytes} of every object under ``url``."""
        bucket, _, prefix = url[len("s3://") :].partition("/")
        client = self.client()
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            for obj in page.get("Contents", []):
                body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                out[obj["Key"][len(prefix) + 1 :]] = body
        return out

    def put(self, url: str, rel: str, data: bytes) -> None:
        bucket, _, prefix = url[len("s3://") :].partition("/")
        self.client().put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)

    def assert_entries_whole(self, url: str) -> int:
        """Every ``entries/<key>.json`` under ``url`` lists only blobs present with their sha256, and no
        temp file is left; returns the number of entries."""
        objects = self.objects(url)
        assert not [k for k in objects if ".tmp-" in k], "a temp upload was left on the remote"
        n = 0
        for name, data in objects.items():
            if not name.startswith("entries/"):
                continue
            manifest = json.loads(data)
            assert name == f"entries/{manifest['key']}.json"
            for rel, meta in manifest["files"].items():
                blob = objects.get(f"cas/{meta['sha256'][:2]}/{meta['sha256']}")
                assert blob is not None, f"{name}: {rel} has no blob"
                assert hashlib.sha256(blob).hexdigest() == meta["sha256"], f"{name}: {rel} blob is torn"
            n += 1
        return n

    def delete(self, url: str, rel: str) -> None:
        bucket, _, prefix = url[len("s3://") :].partition("/")
        self.client().delete_object(Bucket=bucket, Key=f"{prefix}/{rel}")


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "sdkilntestkeyid",
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never look for instance credentials off this machine
    }
    try:
        yield S3(endpoint, env)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_address(s3: S3) -> Iterator[str]:
    """The GCS address of a Ray cluster started for this session (2 CPUs, fake ``macos`` resource)."""
    import ray

    # Short: Ray's Unix socket paths live below it and must stay under ~107 characters.
    temp = tempfile.mkdtemp(prefix="sdkray-")
    env = {
        **s3.env,
        **RAY_LOOPBACK,
        "PYTHONPATH": os.pathsep.join([str(SUPPORT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    with pytest.MonkeyPatch.context() as mp:  # the raylet and its workers inherit these at start
        for k, v in env.items():
            mp.setenv(k, v)
        ctx = ray.init(
            address="local",
            num_cpus=2,
            resources={"macos": 1},
            include_dashboard=False,
            object_store_memory=100 * 2**20,
            _temp_dir=temp,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@dataclass
class Sdk:
    root: Path
    artifacts: Path
    log: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SDKILN_", "AWS_", "RAY_ADDRESS"))}
        env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), env.get("PYTHONPATH", "")])
        env["SDKILN_STAGE_PLUGINS"] = "stages_for_remote:STAGES"
        env["SDKILN_ARTIFACTS"] = str(self.artifacts)
        env["SDKILN_TEST_LOG"] = str(self.log)
        env["SDKILN_WORKER_CACHE"] = str(self.root / "worker-cache")
        env.update(RAY_LOOPBACK)
        env.update(self.extra_env)
        return env

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "sdkiln.stages.cli", *args]

    def run(self, *args: str, check: int | None = 0, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            self.cmd(*args), env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )
        if check is not None:
            assert proc.returncode == check, (
                f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.cmd(*args),
            env=self.env,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def recipe(self, name: str, body: str) -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(textwrap.dedent(body).lstrip())
        return path

    def events(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def started(self) -> list[str]:
        return [e.split()[1] for e in self.events() if e.startswith("start ")]

    @staticmethod
    def tree(root: Path) -> dict[str, bytes]:
        """{relative path: bytes} of every file below ``root``."""
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }

    def wipe_local(self) -> None:
        """Forget everything this machine built: the artifact root (cache and bundles) and worker cache."""
        shutil.rmtree(self.artifacts, ignore_errors=True)
        shutil.rmtree(self.root / "worker-cache", ignore_errors=True)


@pytest.fixture
def sdk(tmp_path: Path, s3: S3) -> Sdk:
    return Sdk(
        root=tmp_path, artifacts=tmp_path / "artifacts", log=tmp_path / "runs.log", extra_env=dict(s3.env)
    )
