"""Serving on Triton: the model-repository writer and its checks, m2f-serve on a real Triton server, the client.

PyTriton pins numpy<2, so the server (and Triton's own schema, which comes with tritonclient) run in a separate
serving environment: the interpreter named by ``M2F_SERVE_PYTHON`` (``bash .ci/run`` builds one), or this one when
it has PyTriton and tritonclient. The in-process references (``Segmenter.predict``) run here. Where no serving
environment exists the serving tests skip, saying so; under CI (``CI`` set) they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from m2f_deploy.artifact import METADATA_KEY, build_metadata, read_onnx_metadata
from m2f_deploy.errors import InputError
from m2f_deploy.runtime import Segmenter
from m2f_deploy.serve import protocol, triton_python
from m2f_deploy.serve.repository import RepoOptions, write_repository

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "shapes-demo"
SAMPLES = [str(p) for p in sorted((ROOT / "checkpoints" / "samples").glob("*.png"))]
TASKS = ("semantic", "instance", "panoptic")
SERVED = ["semantic", "panoptic"]  # m2f-serve --task semantic --task panoptic


def _serve_python() -> str | None:
    if os.environ.get("M2F_SERVE_PYTHON"):
        return os.environ["M2F_SERVE_PYTHON"]
    if find_spec("pytriton") and find_spec("tritonclient"):
        return sys.executable
    return None


SERVE_PYTHON = _serve_python()


def serving() -> str:
    """The serving interpreter; skip (fail under CI) without one."""
    if SERVE_PYTHON:
        return SERVE_PYTHON
    if os.environ.get("CI"):
        pytest.fail("no serving environment under CI: .ci/run must build it and export M2F_SERVE_PYTHON")
    pytest.skip("no serving environment: set M2F_SERVE_PYTHON to a python with m2f-deploy[serve] (.ci/run builds one)")


def serve_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def in_serving(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([serving(), *args], capture_output=True, text=True, timeout=timeout, env=serve_env())


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The shipped demo checkpoint exported to ONNX at its own 160 x 160 (dynamic batch)."""
    from m2f_deploy.cli.export import main as export_main

    path = tmp_path_factory.mktemp("serve") / "demo.onnx"
    assert export_main([str(DEMO), "--size", "160", "-o", str(path), "-q", "--no-validate"]) == 0
    return path


@pytest.fixture(scope="module")
def reference_default(demo):
    """Segmenter.predict on the samples (one batch), every task, default thresholds."""
    with Segmenter(demo) as segmenter:
        yield {task: segmenter.predict(SAMPLES, task) for task in TASKS}


@pytest.fixture(scope="module")
def reference(demo):
    with Segmenter(demo) as segmenter:
        yield {task: segmenter.predict(SAMPLES, task, threshold=0.4) for task in SERVED}


# -- the server ------------------------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    def __init__(self, artifact: Path, *flags: str, host: str = "127.0.0.1"):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.host = host
        self.proc = subprocess.Popen(
            [serving(), "-m", "m2f_deploy.cli.serve", str(artifact), "--port", str(self.http),
             "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=serve_env(), start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.err: list[str] = []
        ready = threading.Event()

        def read(stream, into, watch):
            for line in stream:
                into.append(line)
                if watch and line.startswith("serving "):
                    ready.set()
            ready.set()

        threading.Thread(target=read, args=(self.proc.stdout, self.lines, True), daemon=True).start()
        threading.Thread(target=read, args=(self.proc.stderr, self.err, False), daemon=True).start()
        ready.wait(120)
        if not any(line.startswith("serving ") for line in self.lines):
            self.kill()
            raise AssertionError("m2f-serve did not become ready:\n" + "".join(self.lines + self.err[-30:]))

    def url(self, port: int) -> str:
        return f"{self.host}:{port}"

    def session_processes(self) -> list[int]:
        """Processes still in the server's session (tritonserver, its Python-backend stubs, ...)."""
        left = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.proc.pid:  # field 6 of stat: the session id
                left.append(int(stat.parent.name))
        return left

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        for _ in range(100):  # the Python-backend stubs exit a moment after the server
            if not self.session_processes():
                break
            time.sleep(0.1)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def listening_hosts(port: int) -> set[str]:
    """The addresses TCP sockets listen on at ``port`` (/proc/net/tcp and tcp6; IPv4-mapped ones as IPv4)."""
    import ipaddress

    out = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is little-endian
            ip = ipaddress.ip_address(raw)
            out.add(str(getattr(ip, "ipv4_mapped", None) or ip))
    return out


def probe(server: Server, model: str, served: list[str], tmp_path: Path) -> tuple[dict, dict]:
    out = tmp_path / "probe"
    out.mkdir()
    (out / "served.json").write_text(json.dumps(served))
    done = in_serving(str(ROOT / "tests" / "serve_probe.py"), server.url(server.http), server.url(server.grpc), model,
                      str(out), *SAMPLES, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with np.load(out / "results.npz") as arrays:
        maps = {k.replace("__", "/"): arrays[k] for k in arrays.files}
    return maps, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def server(demo):
    serving()
    # every flag away from its default (the default host, loopback, is the parser's: test_serve_defaults)
    s = Server(demo, "--max-batch", "4", "--queue-delay-us", "2000", "--instances", "2", "--model-name", "seg",
               "--host", "127.0.0.2", "--task", "semantic", "--task", "panoptic", "--exit-timeout-s", "3",
               host="127.0.0.2")  # fmt: skip
    yield s
    s.kill()


@pytest.fixture(scope="module")
def probed(server, tmp_path_factory):
    return probe(server, "seg", SERVED, tmp_path_factory.mktemp("probe"))


def test_served_results_equal_segmenter_predict_over_http_and_grpc(probed, reference):
    maps, report = probed
    for protocol_name in ("http", "grpc"):
        for task in SERVED:
            for how, count in (("batch", 3), ("single", 1))[: 2 if protocol_name == "http" else 1]:
                for i in range(count):
                    key = f"{protocol_name}/{task}/{how}/{i}"
                    want = reference[task][i] if task == "semantic" else reference[task][i]["segmentation"]
                    assert maps[key].dtype == want.dtype and maps[key].shape == want.shape, key
                    assert np.array_equal(maps[key], want), key
                    if task != "semantic":
                        assert report["segments"][key] == reference[task][i]["segments_info"], key
    assert any(reference["panoptic"][i]["segments_info"] for i in range(3))  # not comparing empty results


def test_bad_requests_are_answered_with_an_error_and_the_server_goes_on(probed):
    _, report = probed
    errors = report["errors"]["http"]
    assert "not an image" in errors["not_an_image"]
    assert "image 0" in errors["truncated"]
    assert "unknown task 'panoptik'" in errors["unknown_task"]
    assert "task 'instance' is not served here" in errors["unserved_task"]
    assert "batch-size must be <= 4" in errors["oversized_batch"]
    assert "threshold must be a number in [0, 1]" in errors["bad_threshold"]
    assert errors["one_bad_among_good"].startswith("image 1:")
    grpc = report["errors"]["grpc"]
    assert "not an image" in grpc["not_an_image"] and "batch-size must be <= 4" in grpc["oversized_batch"]
    for e in (errors, grpc):
        assert all(e[k] == "ok" for k in e if k.endswith(":then")), e


def test_serve_flags_reach_triton(server, probed):
    _, report = probed
    assert report["config"] == {"max_batch_size": 4, "max_queue_delay_microseconds": 2000, "instances": 2,
                                "ready": True}  # fmt: skip
    assert any(line.startswith("serving demo.onnx as model 'seg' (semantic, panoptic;") for line in server.lines)
    for port in (server.http, server.grpc, server.metrics):
        assert listening_hosts(port) == {"127.0.0.2"}, port
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.2:{server.metrics}/metrics", timeout=10) as r:
        assert b"nv_inference_request_success" in r.read()


def test_sigterm_stops_the_server_and_everything_it_started(server, probed):
    # (SIGINT takes the same handler: checked by hand, not here, to keep CI short)
    assert server.session_processes()  # tritonserver and its stubs run now
    # Triton's own start-up table shows the exit timeout it was given
    assert any(re.match(r"\|\s*exit_timeout\s*\|\s*3\s*\|", line) for line in server.err)
    # a client's open keep-alive connection holds Triton's exit for the whole timeout (30 s by Triton's default)
    import http.client

    connection = http.client.HTTPConnection(server.host, server.http, timeout=10)
    connection.request("GET", "/v2/health/ready")
    assert connection.getresponse().status == 200
    start = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    assert time.monotonic() - start < 20
    connection.close()
    # stdout holds m2f-serve's own two lines, whole: Triton's log (printed by PyTriton in chunks) goes to stderr
    assert [line.split(" as model")[0] for line in server.lines] == ["serving demo.onnx", "m2f-serve: stopped\n"]
    assert server.session_processes() == []


def test_serve_defaults():
    from m2f_deploy.cli.serve import build_parser

    args = build_parser().parse_args(["x.onnx"])
    assert (args.host, args.port, args.grpc_port, args.max_batch, args.task) == ("127.0.0.1", 8000, None, 8, None)
    assert (args.queue_delay_us, args.exit_timeout_s) == (0, 10)


def test_readme_serve_flag_table_matches_the_parser():
    """Every m2f-serve flag has a row in the README's table, every row is a flag, and each default shown is the
    parser's (the table had drifted: -q had no row)."""
    from m2f_deploy.cli.serve import build_parser

    text = (ROOT / "README.md").read_text()
    table = text[text.index("**`m2f-serve`"):].split("\n\n| flag | default | meaning |\n|---|---|---|\n", 1)[1]
    rows = [line.split(" | ") for line in table.split("\n\n", 1)[0].splitlines()]
    parser = build_parser()
    actions = {o: a for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")}
    shown = set()
    for row in rows:
        flags = [f.split()[0] for f in re.findall(r"`([^`]+)`", row[0].strip("| ")) if f.startswith("-")]
        shown.update(flags)
        for flag, default in zip(flags, re.findall(r"`([^`]+)`", row[1])):  # defaults written as `value`
            assert str(actions[flag].default) == default, (flag, default)
    assert shown == set(actions)


def test_infer_function_answers_each_image_of_mixed_requests(demo):
    """The function Triton calls, without Triton: images grouped by task, each bad image answered on its own."""
    from m2f_deploy.serve.server import InferFunction

    def request(blobs, tasks):
        n = len(blobs)
        return {
            "image": np.array([[b] for b in blobs], dtype=object),
            "task": np.array([[t.encode()] for t in tasks], dtype=object),
            **{k: np.full((n, 1), protocol.DEFAULTS[k], np.float32) for k in protocol.THRESHOLDS},
        }

    png0, png1 = (Path(p).read_bytes() for p in SAMPLES[:2])
    with Segmenter(demo, batch_size=4) as segmenter:
        call = InferFunction(segmenter, ("semantic", "panoptic"))
        first, second = call([request([png0, b"junk", png1], ["semantic", "semantic", "panoptic"]),
                              request([png1], ["instance"])])  # fmt: skip
        assert [e[0] for e in first["error"]] == [b"", b"image 1: not an image Pillow can read", b""]
        assert b"task 'instance' is not served here" in second["error"][0, 0]
        semantic = protocol.decode_result("semantic", first["segmentation"][0], first["size"][0], "[]")
        assert np.array_equal(semantic, segmenter.predict(SAMPLES[0], "semantic")[0])
        panoptic = protocol.decode_result("panoptic", first["segmentation"][2], first["size"][2],
                                          first["segments_info"][2, 0].decode())  # fmt: skip
        want = segmenter.predict(SAMPLES[1], "panoptic")[0]
        assert np.array_equal(panoptic["segmentation"], want["segmentation"])
        assert panoptic["segments_info"] == want["segments_info"]
        # no query passes threshold 1.0: transformers' float -1 map, and the client gives it back as float32
        empty = request([png0], ["panoptic"])
        empty["threshold"][:] = 1.0
        (out,) = call([empty])
        got = protocol.decode_result("panoptic", out["segmentation"][0], out["size"][0], out["segments_info"][0, 0].decode())
        want = segmenter.predict(SAMPLES[0], "panoptic", threshold=1.0)[0]
        assert want["segments_info"] == [] and got["segments_info"] == []
        assert got["segmentation"].dtype == want["segmentation"].dtype == np.float32
        assert np.array_equal(got["segmentation"], want["segmentation"])


def test_segmenter_gets_backend_threads_and_max_batch(demo):
    from m2f_deploy.serve.server import ServeOptions, _segmenter

    calls = []

    def fake(path, backend, **kwargs):
        calls.append((path, backend, kwargs))
        return object()

    _segmenter(fake, demo, ServeOptions(backend="cpu", threads=3, max_batch=6))
    assert calls == [(demo, "cpu", {"threads": 3, "batch_size": 6})]


def test_serve_cli_errors_are_one_line(demo, capsys):
    from m2f_deploy.cli.serve import main
    from m2f_deploy.cli.common import run

    cases = {
        ("--port", "8000", "--grpc-port", "8000"): "must differ",
        ("--max-batch", "0"): "--max-batch 0: at least 1",
        ("--queue-delay-us", "-1"): "--queue-delay-us -1",
        ("--instances", "0"): "--instances 0: at least 1",
        ("--exit-timeout-s", "-1"): "--exit-timeout-s -1: must be 0 or more",
        ("--port", "70000"): "not a TCP port",
        ("--task", "panoptik"): "invalid choice",
    }
    for flags, message in cases.items():
        assert run("m2f-serve", main, [str(demo), *flags]) == 1, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)
    assert run("m2f-serve", main, [str(demo.with_name("missing.onnx"))]) == 1
    assert "no such file" in capsys.readouterr().err
    with socket.socket() as taken:  # a port in use: said at once (Triton itself would only time out)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        http, metrics = free_ports(2)
        flags = ["--port", str(http), "--grpc-port", str(port), "--metrics-port", str(metrics)]
        assert run("m2f-serve", main, [str(demo), *flags]) == 1
        err = capsys.readouterr().err
        assert f"--grpc-port {port}: cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1


def test_serve_a_fused_head_artifact_serves_its_task_only(tmp_path, capsys, monkeypatch):
    # a fused-head graph returns one task's results: m2f-serve announced all three and refused each other request
    import m2f_deploy.serve.server as server_module
    from m2f_deploy.cli.common import run
    from m2f_deploy.cli.serve import main

    artifact = fused_artifact(tmp_path / "fused.onnx")  # --heads semantic
    assert run("m2f-serve", main, [str(artifact), "--task", "panoptic"]) == 1
    err = capsys.readouterr().err
    assert "--task panoptic: " in err and "returns semantic results" in err and err.count("\n") == 1, err
    seen = []
    monkeypatch.setattr(server_module, "serve", lambda path, options, **_: seen.append(options.tasks))
    assert main([str(artifact), "-q"]) == 0 and seen == [("semantic",)]


def test_triton_errors_become_one_line():
    from m2f_deploy.serve.server import triton_error

    text = ("[400] load failed for model 'm2f': version 1 is at UNAVAILABLE state: Internal: TritonModelException: "
            "Model initialize error: Traceback (most recent call last):\\n  File \"model.py\", line 419, in "
            "initialize\\n    x._recursion_count()\\nAttributeError: '_thread.RLock' object has no attribute "
            "'_recursion_count'\\n\\nAt:\\n  model.py(454): initialize\\n")  # fmt: skip
    line = triton_error(RuntimeError(text))
    assert "\n" not in line and line.startswith("[400] load failed for model 'm2f'")
    assert line.endswith("(AttributeError: '_thread.RLock' object has no attribute '_recursion_count')")


@pytest.mark.skipif(find_spec("pytriton") is not None, reason="PyTriton is installed in this interpreter")
def test_serve_without_pytriton_says_how_to_install(demo, capsys):
    from m2f_deploy.cli.common import run
    from m2f_deploy.cli.serve import main

    assert run("m2f-serve", main, [str(demo)]) == 1
    err = capsys.readouterr().err
    assert "pip install 'm2f-deploy[serve]'" in err and err.count("\n") == 1


def test_python_library_path_puts_the_interpreters_lib_first():
    import sysconfig

    from m2f_deploy.serve.server import python_library_path

    libdir = sysconfig.get_config_var("LIBDIR")
    assert python_library_path({}) == libdir
    assert python_library_path({"LD_LIBRARY_PATH": "/opt/x"}).split(os.pathsep) == [libdir, "/opt/x"]
    assert python_library_path({"LD_LIBRARY_PATH": f"/opt/x{os.pathsep}{libdir}"}).count(libdir) == 1


# -- the model repository --------------------------------------------------------------------------------------------


def check_in_serving(repo: Path, artifact: Path) -> str:
    done = in_serving("-m", "m2f_deploy.serve.repository", str(repo), str(artifact))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_generated_repository_runs_on_a_real_triton_server(demo, reference_default, tmp_path):
    """The repository m2f-export writes, loaded by a real Triton (PyTriton's bundled server): its pre/post-processing
    models, their model.py and the ensemble as written; only the model's onnxruntime backend, which that bundle lacks,
    is stood in for by a Python-backend model running the same model.onnx (tests/triton_repo_probe.py)."""
    from m2f_deploy.cli.export import main as export_main

    repo = tmp_path / "repo"
    assert export_main([str(demo), "--triton-repo", str(repo), "--triton-device", "cpu", "--triton-max-batch", "4",
                        "-q"]) == 0  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    ports = [str(p) for p in free_ports(3)]
    done = in_serving(str(ROOT / "tests" / "triton_repo_probe.py"), str(repo), str(out), *ports, *SAMPLES, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["ready"] == {"m2f_model": True, "m2f_preprocess": True, "m2f_postprocess": True, "m2f": True}
    optional = {t["name"]: t.get("optional", False) for t in report["ensemble_config"]["input"]}
    assert optional == {"image": False, "task": False, **{k: True for k in protocol.THRESHOLDS}}
    arrays = np.load(out / "results.npz", allow_pickle=True)

    def results(key: str, task: str) -> list:
        info = arrays[f"{key}/segments_info"].reshape(-1)
        return [protocol.decode_result(task, arrays[f"{key}/segmentation"][i], arrays[f"{key}/original_size"][i],
                                       protocol.as_text(info[i])) for i in range(len(SAMPLES))]  # fmt: skip

    def assert_same(got: list, want: list, task: str) -> None:
        for g, w in zip(got, want, strict=True):
            if task == "semantic":
                assert g.dtype == w.dtype and np.array_equal(g, w)
            else:
                assert g["segmentation"].dtype == w["segmentation"].dtype
                assert np.array_equal(g["segmentation"], w["segmentation"]) and g["segments_info"] == w["segments_info"]

    for task in TASKS:  # no thresholds sent: transformers' defaults
        assert_same(results(f"{task}/default", task), reference_default[task], task)
    with Segmenter(demo) as segmenter:
        # the first image at threshold 0.995 (drops a segment of this confident model), the others at the default,
        # in one request
        mixed = segmenter.predict(SAMPLES[:1], "panoptic", threshold=0.995) + segmenter.predict(SAMPLES[1:], "panoptic")
        assert len(mixed[0]["segments_info"]) < len(reference_default["panoptic"][0]["segments_info"])
        assert_same(results("panoptic/mixed", "panoptic"), mixed, "panoptic")
        none_pass = segmenter.predict(SAMPLES, "panoptic", threshold=1.0)
        assert all(r["segments_info"] == [] for r in none_pass)
        assert_same(results("panoptic/none_pass", "panoptic"), none_pass, "panoptic")
    errors = report["errors"]
    assert "image 0: not an image Pillow can read" in errors["not_an_image"]
    assert "unknown task 'panoptik'" in errors["unknown_task"]
    assert "threshold must be a number in [0, 1], got 1.5" in errors["bad_threshold"]
    assert report["after_errors"] is True


def test_repository_from_onnx_with_the_export_flags(demo, tmp_path):
    from m2f_deploy.cli.export import main as export_main

    repo = tmp_path / "repo"
    # from an existing .onnx: no engine build is attempted (TensorRT is absent here)
    assert export_main([str(demo), "--triton-repo", str(repo), "--triton-instances", "2", "--triton-device", "cpu",
                        "--triton-max-batch", "4", "-q"]) == 0  # fmt: skip
    model = (repo / "m2f_model" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in model and "max_batch_size: 4" in model
    assert "count: 2 kind: KIND_CPU" in model and "execution_accelerators" not in model
    assert 'name: "pixel_values" data_type: TYPE_FP32 dims: [ 3, 160, 160 ]' in model
    assert 'name: "class_queries_logits" data_type: TYPE_FP32 dims: [ 20, 8 ]' in model
    assert (repo / "m2f_model" / "1" / "model.onnx").read_bytes() == demo.read_bytes()
    for name in ("m2f_preprocess", "m2f_postprocess"):
        assert "count: 2 kind: KIND_CPU" in (repo / name / "config.pbtxt").read_text()
        meta = json.loads((repo / name / "1" / triton_python.METADATA_FILE).read_text())
        assert meta["input"] == read_onnx_metadata(demo)["input"]
    ensemble = (repo / "m2f" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in ensemble
    # each image's size leaves the ensemble: a request of several images gets maps padded to the largest
    assert 'name: "original_size" data_type: TYPE_INT64 dims: [ 2 ]' in ensemble.split("output [")[1]
    assert "ok: m2f, m2f_model, m2f_postprocess, m2f_preprocess" in check_in_serving(repo, demo)
    # defaults: GPU, one instance, max batch 8, onnxruntime's TensorRT accelerator at the graph's precision
    default = write_repository(demo, tmp_path / "default")
    text = (default / "m2f_model" / "config.pbtxt").read_text()
    assert "count: 1 kind: KIND_GPU" in text and "max_batch_size: 8" in text
    assert 'value: "FP32"' in text
    check_in_serving(default, demo)


def fake_engine(demo: Path, folder: Path, *, with_onnx: bool, meta_changes: dict | None = None) -> Path:
    """A fake engine file and its sidecar (the writer reads only the sidecar and, if present, the source ONNX)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = read_onnx_metadata(demo)
    meta = {**meta, "id2label": {str(k): v for k, v in meta["id2label"].items()}, **(meta_changes or {})}
    meta["tensorrt"] = {
        "version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7",
        "profile": {"min": [1, 3, 160, 160], "opt": [4, 3, 160, 160], "max": [8, 3, 160, 160]},
        "onnx": {"file": demo.name, "sha256": "0"}, "plugin_libraries": [],
    }  # fmt: skip
    engine = folder / "model.engine"
    engine.write_bytes(b"not really an engine\x00\x01")
    (folder / "model.engine.json").write_text(json.dumps(meta))
    if with_onnx:
        shutil.copyfile(demo, folder / demo.name)
    return engine


def test_repository_from_engine(demo, tmp_path):
    from m2f_deploy.cli.common import run
    from m2f_deploy.cli.export import main as export_main

    for with_onnx in (True, False):  # tensors from the source ONNX beside it, or from the sidecar's metadata
        engine = fake_engine(demo, tmp_path / f"e{with_onnx}", with_onnx=with_onnx)
        repo = tmp_path / f"repo{with_onnx}"
        assert export_main([str(engine), "--triton-repo", str(repo), "-q"]) == 0
        text = (repo / "m2f_model" / "config.pbtxt").read_text()
        assert 'platform: "tensorrt_plan"' in text and "max_batch_size: 8" in text  # the profile's max
        assert "preferred_batch_size: [ 4, 8 ]" in text and "graphs: true" in text and "KIND_GPU" in text
        assert (repo / "m2f_model" / "1" / "model.plan").read_bytes() == engine.read_bytes()
        assert "TensorRT (10.3.0)" in (repo / "README.md").read_text()
        check_in_serving(repo, engine)
    assert run("m2f-export", export_main, [str(engine), "--triton-repo", str(tmp_path / "x"),
                                           "--triton-max-batch", "16"]) == 1  # fmt: skip
    assert run("m2f-export", export_main, [str(engine), "--triton-repo", str(tmp_path / "y"),
                                           "--triton-device", "cpu"]) == 1  # fmt: skip
    assert run("m2f-export", export_main, [str(engine)]) == 1  # an engine input is for --triton-repo only
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def fused_artifact(path: Path) -> Path:
    """A graph with fused heads: uint8 NHWC ``images`` in, an int32 ``semantic_map`` and a float ``scores`` out."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["wide"], to=TensorProto.INT32),
         helper.make_node("ReduceMax", ["wide"], ["semantic_map"], keepdims=0, axes=[3]),
         helper.make_node("Cast", ["semantic_map"], ["as_float"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["as_float"], ["scores"], keepdims=0, axes=[2]),
         helper.make_node("Identity", ["threshold"], ["kept_threshold"])],
        "fused",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 96, 128, 3]),
         helper.make_tensor_value_info("threshold", TensorProto.FLOAT, ["batch"])],  # as a head's threshold input
        [helper.make_tensor_value_info("semantic_map", TensorProto.INT32, ["batch", 96, 128]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 96]),
         helper.make_tensor_value_info("kept_threshold", TensorProto.FLOAT, ["batch"])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = build_metadata(
        id2label={0: "a", 1: "b"}, num_queries=10, preprocessing={}, height=96, width=128, batch=1,
        dynamic_batch=True, dynamic_hw=False, msda="gather", precision="fp32", source={}, exporter={},
        fused_heads=("semantic",),
    )  # fmt: skip
    meta["input"].update(name="images", layout="NHWC uint8")
    meta["outputs"] = ["semantic_map", "scores", "kept_threshold"]
    helper.set_model_props(model, {METADATA_KEY: json.dumps(meta)})
    onnx.save(model, path)
    return path


def test_repository_of_a_fused_head_graph_reads_its_tensors_from_the_graph(tmp_path):
    # issue 14's fused-head exporter is not on this branch: the artifact is synthesized, its metadata as the
    # contract describes it (fused_heads non-empty, other outputs, a uint8 images input)
    artifact = fused_artifact(tmp_path / "fused.onnx")
    repo = write_repository(artifact, tmp_path / "repo", RepoOptions(max_batch=2))
    text = (repo / "m2f_model" / "config.pbtxt").read_text()
    assert 'name: "images" data_type: TYPE_UINT8 dims: [ 96, 128, 3 ]' in text
    assert 'name: "semantic_map" data_type: TYPE_INT32 dims: [ 96, 128 ]' in text
    assert 'name: "scores" data_type: TYPE_FP32 dims: [ 96 ]' in text
    # batch-only tensors (a head's per-image thresholds): Triton's loader refuses empty dims ("must specify 'dims'")
    for name in ("threshold", "kept_threshold"):
        assert f'name: "{name}" data_type: TYPE_FP32 dims: [ 1 ] reshape: {{ shape: [ ] }}' in text
    emptied = tmp_path / "emptied"
    shutil.copytree(repo, emptied)
    config = emptied / "m2f_model" / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ 1 ] reshape: { shape: [ ] }", "dims: [ ]"))
    done = in_serving("-m", "m2f_deploy.serve.repository", str(emptied), str(artifact))
    assert done.returncode == 1 and "tensor 'threshold' has no dims" in done.stdout + done.stderr, done.stderr
    assert not (repo / "m2f").exists() and "No pre/post-processing ensemble" in (repo / "README.md").read_text()
    check_in_serving(repo, artifact)
    # an engine of it without its ONNX beside: the dims of fused outputs cannot be guessed, and it says so
    meta = read_onnx_metadata(artifact)
    engine = fake_engine(artifact, tmp_path / "e", with_onnx=False, meta_changes={
        "input": meta["input"], "outputs": meta["outputs"], "fused_heads": ["semantic"]})  # fmt: skip
    with pytest.raises(InputError, match="cannot tell the dims of semantic_map, scores, kept_threshold"):
        write_repository(engine, tmp_path / "repo2")
    assert not (tmp_path / "repo2").exists()


TAMPER = [
    ("m2f_model", "max_batch_size: 8", "max_batch_size: 8\nmax_batchsize: 8", ":4:1 : Message type"),
    ("m2f_model", "preferred_batch_size: [ 8 ]", "preferred_batch_size: [ 16 ]", "preferred_batch_size [16] outside"),
    ("m2f_model", "dims: [ 20, 8 ]", "dims: [ 20, 9 ]", "has dims [20, 9], the artifact's are [20, 8]"),
    ("m2f_model", "data_type: TYPE_FP32 dims: [ 3", "data_type: TYPE_FP16 dims: [ 3", "is TYPE_FP16, the artifact"),
    ("m2f", 'model_name: "m2f_postprocess"', 'model_name: "m2f_post"', "step model 'm2f_post' is not in"),
    ("m2f", 'input_map { key: "task" value: "task" }', "", "inputs ['task'] are not mapped"),
    ("m2f_preprocess", 'name: "m2f_preprocess"', 'name: "pre"', "is not its folder's name"),
    ("m2f_postprocess", "max_batch_size: 8", "max_batch_size: 4", "m2f_postprocess has max_batch_size 4"),
    ("m2f_postprocess", 'name: "threshold" data_type: TYPE_FP32 dims: [ 1 ] optional: true',
     'name: "threshold" data_type: TYPE_FP32 dims: [ 1 ]',
     "the optional input 'threshold' feeds m2f_postprocess's required input 'threshold'"),
]


def test_repository_checks_catch_what_the_schema_cannot(demo, tmp_path):
    repo = write_repository(demo, tmp_path / "repo")
    copies = []
    for i, (model, old, new, _) in enumerate(TAMPER):
        copy = tmp_path / f"t{i}"
        shutil.copytree(repo, copy)
        config = copy / model / "config.pbtxt"
        text = config.read_text()
        assert old in text, (model, old)
        config.write_text(text.replace(old, new, 1))
        copies.append(str(copy))
    script = (
        "import sys\nfrom m2f_deploy.errors import InputError\n"
        "from m2f_deploy.serve.repository import check_repository, read_artifact\n"
        "io = read_artifact(sys.argv[1])\n"
        "for d in sys.argv[2:]:\n"
        "    try:\n        check_repository(d, io); print('PASSED')\n"
        "    except InputError as e:\n        print(str(e).replace(chr(10), ' '))\n"
    )
    done = in_serving("-c", script, str(demo), str(repo), *copies)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "PASSED"
    for (model, _, _, message), line in zip(TAMPER, lines[1:]):
        assert message in line, (model, message, line)


def test_export_triton_flags_need_triton_repo_and_a_new_folder(demo, tmp_path, capsys):
    from m2f_deploy.cli.common import run
    from m2f_deploy.cli.export import main as export_main

    assert run("m2f-export", export_main, [str(demo), "--triton-instances", "2"]) == 1
    assert "without --triton-repo" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    # refused before the (slow) export from a checkpoint starts
    assert run("m2f-export", export_main, [str(DEMO), "--triton-repo", str(taken), "-o", str(tmp_path / "a.onnx")]) == 1
    assert "not an empty folder" in capsys.readouterr().err and not (tmp_path / "a.onnx").exists()
    assert run("m2f-export", export_main, [str(demo), "--triton-repo", str(tmp_path / "r"),
                                           "--triton-instances", "0"]) == 1  # fmt: skip
    assert "--triton-instances 0" in capsys.readouterr().err


# -- the Python-backend steps, without Triton ------------------------------------------------------------------------


def test_python_backend_steps_equal_segmenter_predict(demo):
    meta = read_onnx_metadata(demo)
    pre, post = triton_python.Preprocess(meta), triton_python.Postprocess(meta)
    blobs = np.array([[Path(p).read_bytes()] for p in SAMPLES], dtype=object)
    with Segmenter(demo, batch_size=4) as segmenter:
        tensors = pre({"image": blobs})
        logits = segmenter.infer(tensors["pixel_values"])
        for task in TASKS:
            out = post({**logits, **tensors, "task": np.array([[task.encode()]] * len(SAMPLES), dtype=object)})
            want = segmenter.predict(SAMPLES, task)
            for i in range(len(SAMPLES)):
                got = protocol.decode_result(task, out["segmentation"][i], tensors["original_size"][i],
                                             out["segments_info"][i, 0].decode())  # fmt: skip
                if task == "semantic":
                    assert got.dtype == want[i].dtype and np.array_equal(got, want[i])
                else:
                    assert np.array_equal(got["segmentation"], want[i]["segmentation"])
                    assert got["segments_info"] == want[i]["segments_info"]


def test_postprocess_thresholds_per_image_and_bad_inputs_named(demo):
    """The ensemble's post-processing: thresholds per image for instance too, checked for semantic (as
    Segmenter.predict checks them) though unused; each bad input refused with its name (and image)."""
    meta = read_onnx_metadata(demo)
    pre, post = triton_python.Preprocess(meta), triton_python.Postprocess(meta)
    blobs = np.array([[Path(p).read_bytes()] for p in SAMPLES[:2]], dtype=object)

    def task(*names: str) -> np.ndarray:
        return np.array([[n.encode()] for n in names], dtype=object)

    def column(*values: float) -> np.ndarray:
        return np.array(values, np.float32).reshape(-1, 1)

    with Segmenter(demo, batch_size=2) as segmenter:
        tensors = pre({"image": blobs})
        base = {**segmenter.infer(tensors["pixel_values"]), **tensors}
        out = post({**base, "task": task("instance", "instance"), "threshold": column(0.995, 0.5)})
        want = segmenter.predict(SAMPLES[:1], "instance", threshold=0.995) + segmenter.predict(SAMPLES[1:2], "instance")
        assert len(want[0]["segments_info"]) < len(segmenter.predict(SAMPLES[0], "instance")[0]["segments_info"])
        for i in range(2):
            got = protocol.decode_result("instance", out["segmentation"][i], tensors["original_size"][i],
                                         out["segments_info"][i, 0].decode())  # fmt: skip
            assert np.array_equal(got["segmentation"], want[i]["segmentation"])
            assert got["segments_info"] == want[i]["segments_info"]
        with pytest.raises(InputError) as e:
            segmenter.predict(SAMPLES[0], "semantic", threshold=1.5)
        assert "threshold" in str(e.value)
        refusals = {
            r"task: one task per request, got \['instance', 'panoptic'\]": {"task": task("panoptic", "instance")},
            r"threshold: one value per image \(2\), got 1": {"task": task("panoptic", "panoptic"),
                                                                "threshold": column(0.5)},
            r"image 1: mask_threshold must be a number in \[0, 1\], got -0.5": {
                "task": task("instance", "instance"), "mask_threshold": column(0.5, -0.5)},
            r"image 0: threshold must be a number in \[0, 1\], got 1.5": {"task": task("semantic", "semantic"),
                                                                            "threshold": column(1.5, 0.5)},
        }  # fmt: skip
        for message, arrays in refusals.items():
            with pytest.raises(InputError, match=f"^{message}$"):
                post({**base, **arrays})


def test_generated_model_py_answers_each_request(demo, tmp_path, monkeypatch):
    """The model.py the repository holds, run against a stand-in of Triton's ``triton_python_backend_utils``."""
    import types

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class Response:
        def __init__(self, output_tensors=None, error=None):
            self.outputs, self.error = output_tensors, error

    pb = types.SimpleNamespace(
        Tensor=Tensor, InferenceResponse=Response, TritonError=lambda message: message,
        get_input_tensor_by_name=lambda request, name: Tensor(name, request[name]) if name in request else None,
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    repo = write_repository(demo, tmp_path / "repo")
    namespace: dict = {}
    exec(compile((repo / "m2f_preprocess/1/model.py").read_text(), "model.py", "exec"), namespace)
    model = namespace["TritonPythonModel"]()
    model.initialize({"model_repository": str(repo / "m2f_preprocess"), "model_version": "1"})
    good = {"image": np.array([[Path(SAMPLES[0]).read_bytes()]], dtype=object)}
    bad = {"image": np.array([[b"junk"]], dtype=object)}
    responses = model.execute([good, bad, good])
    assert [r.error is None for r in responses] == [True, False, True]
    assert "not an image" in responses[1].error
    assert {t.name for t in responses[0].outputs} == {"pixel_values", "pixel_mask", "original_size"}
    assert responses[0].outputs[0].array.shape == (1, 3, 160, 160)
    # the post-processing model: the thresholds are optional inputs (absent: None from Triton, the defaults)
    pre = {t.name: t.array for t in responses[0].outputs}
    namespace = {}
    exec(compile((repo / "m2f_postprocess/1/model.py").read_text(), "model.py", "exec"), namespace)
    post = namespace["TritonPythonModel"]()
    post.initialize({"model_repository": str(repo / "m2f_postprocess"), "model_version": "1"})
    with Segmenter(demo) as segmenter:
        common = {**segmenter.infer(pre["pixel_values"]), "pixel_mask": pre["pixel_mask"],
                  "original_size": pre["original_size"], "task": np.array([[b"panoptic"]], dtype=object)}  # fmt: skip
        none_pass = {**common, "threshold": np.array([[1.0]], np.float32)}
        out_of_range = {**common, "mask_threshold": np.array([[-0.5]], np.float32)}
        plain, empty, refused = post.execute([common, none_pass, out_of_range])
        assert plain.error is None and empty.error is None
        assert "mask_threshold must be a number in [0, 1], got -0.5" in refused.error
        segments = {t.name: t.array for t in plain.outputs}["segments_info"][0, 0].decode()
        assert json.loads(segments) == segmenter.predict(SAMPLES[0], "panoptic")[0]["segments_info"] != []
        assert {t.name: t.array for t in empty.outputs}["segments_info"][0, 0] == b"[]"


def test_client_refuses_a_task_that_is_not_a_name():
    """Checked before anything is sent (no server, no tritonclient needed): one typed error, not an AttributeError."""
    from m2f_deploy.errors import InputError
    from m2f_deploy.serve import Client

    with pytest.raises(InputError, match="task must be one of semantic, instance, panoptic, got 3"):
        Client.predict(object.__new__(Client), [b"x"], 3)


def test_serve_load_stops_every_server_it_started_when_a_later_one_fails(monkeypatch):
    """benchmarks/serve_load.py starts one server per queue delay (each in its own session, so not stopped with the
    benchmark): one that fails to start must not leave those started before it running, a delay given twice starts
    one server, and a server that ignores SIGTERM is killed. Fakes only: no server is started here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    started, killed = [], []

    class Proc:
        def __init__(self, flags: tuple[str, ...]):
            self.flags, self.signals, self.pid = flags, [], 100000 + len(started)

        def send_signal(self, sig: int) -> None:
            self.signals.append(sig)

        def wait(self, timeout: float | None = None) -> int:
            if "5000" in self.flags and not killed:  # this one ignores SIGTERM
                raise subprocess.TimeoutExpired("m2f-serve", timeout)
            return 0

    def start_server(artifact: str, *flags: str):
        if "1" in flags:  # the server without dynamic batching, started last, fails
            raise SystemExit(f"m2f-serve {' '.join(flags)} did not start")
        started.append(Proc(flags))
        return started[-1], 8000

    class FakeSegmenter:
        def __init__(self, *args, **kwargs):
            pass

        def predict(self, path, task):
            return [None]

        def close(self):
            pass

    monkeypatch.setattr(serve_load, "start_server", start_server)
    monkeypatch.setattr(serve_load, "Segmenter", FakeSegmenter)
    monkeypatch.setattr(serve_load.os, "killpg", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setattr(sys, "argv", ["serve_load.py", "x.onnx", "--queue-delays", "0", "0", "5000"])
    with pytest.raises(SystemExit, match="did not start"):
        serve_load.main()
    assert [p.flags[-1] for p in started] == ["0", "5000"]
    assert all(p.signals == [signal.SIGTERM] for p in started)
    assert killed == [(started[1].pid, signal.SIGKILL)]
