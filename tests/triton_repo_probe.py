"""Run in the serving environment by tests/test_serve.py: load a generated model repository into a real Triton
server (PyTriton's bundled one) and query its ensemble.

    python tests/triton_repo_probe.py REPO OUT_DIR HTTP_PORT GRPC_PORT METRICS_PORT IMAGE...

PyTriton's bundle holds Triton's Python backend but not its onnxruntime backend, so the repository's ``m2f_model``
(platform ``onnxruntime_onnx``) is swapped for a Python-backend model that runs the same ``model.onnx`` under
onnxruntime with m2f-deploy's session options. Everything else is loaded as ``m2f-export --triton-repo`` wrote it:
the pre- and post-processing models (their ``config.pbtxt`` and ``model.py``), the ensemble, and the model's
tensors, batch and batcher settings.

Writes OUT_DIR/results.npz (each answer's tensors) and OUT_DIR/report.json (models ready, the ensemble's config
as Triton reports it, the errors of bad requests). The comparison with Segmenter.predict is the test's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

STAND_IN = '''"""Test stand-in for Triton's onnxruntime backend (tests/triton_repo_probe.py): the same model.onnx, run by
onnxruntime in Triton's Python backend."""

import os

import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from m2f_deploy.runtime.onnxrt import session_options


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, sess_options=session_options(ort), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            out = self.session.run(self.outputs, feed)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in zip(self.outputs, out)]))
        return responses
'''


def swap_model_backend(repo: Path) -> None:
    config = repo / "m2f_model" / "config.pbtxt"
    text = config.read_text()
    if text.count('platform: "onnxruntime_onnx"') != 1:
        raise SystemExit(f"{config}: expected one onnxruntime_onnx platform line")
    config.write_text(text.replace('platform: "onnxruntime_onnx"', 'backend: "python"'))
    (repo / "m2f_model" / "1" / "model.py").write_text(STAND_IN)


def main() -> int:
    import os

    import tritonclient.http as httpclient
    from pytriton.triton import Triton, TritonConfig

    from m2f_deploy.serve.server import python_library_path

    repo, out_dir, http, grpc, metrics, *images = sys.argv[1:]
    repo, out_dir = Path(repo), Path(out_dir)
    http, grpc, metrics = int(http), int(grpc), int(metrics)
    swap_model_backend(repo)
    blobs = [Path(p).read_bytes() for p in images]
    os.environ["LD_LIBRARY_PATH"] = python_library_path()  # as m2f-serve does (see its docstring)
    config = TritonConfig(
        model_repository=repo, http_address="127.0.0.1", http_port=http, grpc_address="127.0.0.1", grpc_port=grpc,
        metrics_address="127.0.0.1", metrics_port=metrics, exit_on_error=True, log_verbose=0,
    )  # fmt: skip
    arrays: dict[str, np.ndarray] = {}
    report: dict = {"ready": {}, "errors": {}}
    with Triton(config=config) as triton:
        triton.run()
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}", network_timeout=120, connection_timeout=120)
        for model in ("m2f_model", "m2f_preprocess", "m2f_postprocess", "m2f"):
            report["ready"][model] = client.is_model_ready(model)
        report["ensemble_config"] = client.get_model_config("m2f")

        def infer(blobs_: list[bytes], task: str, **thresholds: list[float]) -> dict[str, np.ndarray]:
            n = len(blobs_)
            feed = {"image": np.array(blobs_, dtype=object).reshape(n, 1),
                    "task": np.array([task.encode()] * n, dtype=object).reshape(n, 1),
                    **{k: np.asarray(v, np.float32).reshape(n, 1) for k, v in thresholds.items()}}  # fmt: skip
            inputs = []
            for name, array in feed.items():
                tensor = httpclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else "FP32")
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            names = ("segmentation", "segments_info", "original_size")
            response = client.infer("m2f", inputs, outputs=[httpclient.InferRequestedOutput(k) for k in names])
            return {k: response.as_numpy(k) for k in names}

        for task in ("semantic", "instance", "panoptic"):
            for key, value in infer(blobs, task).items():  # no thresholds sent: the defaults
                arrays[f"{task}/default/{key}"] = value
        # thresholds per image: the first image at 0.995, the others at the default; then a threshold no query passes
        n = len(blobs)
        for name, thresholds in (("mixed", [0.995] + [0.5] * (n - 1)), ("none_pass", [1.0] * n)):
            for key, value in infer(blobs, "panoptic", threshold=thresholds).items():
                arrays[f"panoptic/{name}/{key}"] = value
        bad = {
            "not_an_image": lambda: infer([b"junk"], "panoptic"),
            "unknown_task": lambda: infer(blobs[:1], "panoptik"),
            "bad_threshold": lambda: infer(blobs[:1], "panoptic", threshold=[1.5]),
        }
        for name, call in bad.items():
            try:
                call()
                report["errors"][name] = "NO ERROR"
            except Exception as e:  # noqa: BLE001 - tritonclient's InferenceServerException, its text is the answer
                report["errors"][name] = " ".join(str(e).split())
        report["after_errors"] = infer(blobs[:1], "semantic")["segmentation"].shape[0] == 1  # still serving
        client.close()
    np.savez(out_dir / "results.npz", **arrays)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
