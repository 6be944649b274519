"""What each install extra pulls in, resolved by pip itself (a dry run against the package
index): a trainer's `augserve[client]` is grpcio, protobuf and numpy, nothing of the server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = {"opencv-python-headless", "opencv-python", "pillow", "nvidia-dali-cuda130", "prometheus-client", "torch"}


def resolved(requirement: str, tmp_path: Path) -> set[str]:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(report), requirement],
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        if "Could not find a version" in result.stderr or "connection" in result.stderr.lower():
            pytest.skip(f"the package index cannot be reached: {result.stderr.strip()[-300:]}")
        raise AssertionError(result.stderr[-3000:])
    return {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}


def test_the_client_extra_is_grpc_protobuf_and_numpy(tmp_path):
    names = resolved(f"{ROOT}[client]", tmp_path)
    assert {"augserve", "grpcio", "protobuf", "numpy"} <= names
    assert not names & SERVER_ONLY, sorted(names & SERVER_ONLY)
    assert names <= {"augserve", "grpcio", "protobuf", "numpy", "typing-extensions"}, sorted(names)


def test_the_server_extra_brings_the_server(tmp_path):
    names = resolved(f"{ROOT}[server]", tmp_path)
    assert {"opencv-python-headless", "pillow", "grpcio-health-checking", "grpcio-reflection", "prometheus-client"} <= names
    assert "torch" not in names


def test_the_compression_extra_adds_the_codecs_only(tmp_path):
    names = resolved(f"{ROOT}[compression]", tmp_path)
    assert {"zstandard", "lz4"} <= names
    assert names <= {"augserve", "grpcio", "protobuf", "numpy", "typing-extensions", "zstandard", "lz4"}, sorted(names)
