"""Several devices: replicas and tensor parallelism on simulated CPU devices, and two processes
that generate together with jax.distributed. Each run needs its own process (see multidevice_worker.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice_worker.py")


def _run(*args: str, timeout: int = 600) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _result(proc.stdout)


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def _assert_same(reference: dict, other: dict) -> None:
    assert set(reference) == set(other)
    for name in reference:
        if name == "score":
            for a, b in zip(reference[name], other[name]):
                np.testing.assert_allclose(a, b, atol=1e-4)
            continue
        for (ids_a, scores_a), (ids_b, scores_b) in zip(reference[name], other[name]):
            assert ids_a == ids_b, name
            np.testing.assert_allclose(scores_a, scores_b, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("multidevice") / "model")
    subprocess.run([sys.executable, WORKER, "build", directory], check=True)
    return directory


def test_replicas_and_tensor_parallel_match_one_device(tiny_model_dir):
    report = _run("compare", tiny_model_dir, "4")
    assert report["num_replicas"] == 4
    _assert_same(report["single"], report["replicas"])
    _assert_same(report["single"], report["tensor_parallel"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_together_like_one(tiny_model_dir):
    single = _run("single", tiny_model_dir)
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, WORKER, "host", tiny_model_dir, str(i), "2", port],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        report = _result(out)
        assert report["devices"] == 2
        _assert_same(single, report["outputs"])


def test_bad_device_arguments(tiny_model_dir):
    import jaxgen

    with pytest.raises(ValueError, match="unsupported device"):
        jaxgen.Generator(tiny_model_dir, device="quantum")
    with pytest.raises(ValueError, match="device_index 99 does not exist"):
        jaxgen.Generator(tiny_model_dir, device_index=99)
    with pytest.raises(ValueError, match="must not be empty"):
        jaxgen.Generator(tiny_model_dir, device_index=[])
    with pytest.raises(TypeError, match="device_index"):
        jaxgen.Generator(tiny_model_dir, device_index="0")


def test_tensor_parallel_head_count_must_divide(tiny_model_dir):
    report_dir = tiny_model_dir
    code = ("import os; os.environ['XLA_FLAGS']='--xla_force_host_platform_device_count=3'; import jaxgen\n"
            "try:\n"
            f"    jaxgen.Generator({report_dir!r}, device_index=[0, 1, 2], tensor_parallel=True)\n"
            "except ValueError as e:\n"
            "    print('RESULT ' + __import__('json').dumps(str(e)))\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    message = _result(proc.stdout)
    assert "num_heads (4) divisible by 3" in message
