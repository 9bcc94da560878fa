"""Run in the serving environment (PyTriton's numpy<2 venv) by tests/test_serve.py: query a running m2f-serve.

    python tests/serve_probe.py HTTP_URL GRPC_URL MODEL OUT_DIR IMAGE...

Writes OUT_DIR/results.npz (every map, by protocol, task and image) and OUT_DIR/report.json (segments, errors
of the bad requests, the model config Triton reports). The comparison with Segmenter.predict is the test's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from m2f_deploy.serve import Client, ServeError


def errors_then_ok(client: Client, images: list[str], max_batch: int, served: list[str], only=None) -> dict[str, str]:
    """Each bad request's error message, and whether a good request still works after each."""
    bad = {
        "not_an_image": lambda: client.predict([b"this is not an image"], served[0]),
        "truncated": lambda: client.predict([Path(images[0]).read_bytes()[:100]], served[0]),
        "unknown_task": lambda: client.predict(images[:1], "panoptik"),
        "unserved_task": lambda: client.predict(images[:1], next(t for t in ("panoptic", "instance", "semantic")
                                                                if t not in served)) if len(served) < 3 else None,
        "oversized_batch": lambda: client.predict(images[:1] * (max_batch + 1), served[0]),
        "bad_threshold": lambda: client.predict(images[:1], served[0], threshold=float("nan")),
        "one_bad_among_good": lambda: client.predict([images[0], b"junk", images[1]], served[0]),
    }
    out = {}
    for name, call in bad.items():
        if only and name not in only:
            continue
        try:
            result = call()
            out[name] = "NO ERROR" if result is not None else "n/a"
        except ServeError as e:
            out[name] = str(e)
        ok = client.predict(images[:1], served[0])  # the server still serves
        out[name + ":then"] = "ok" if len(ok) == 1 else "bad"
    return out


def main() -> int:
    http_url, grpc_url, model, out_dir, *images = sys.argv[1:]
    out_dir = Path(out_dir)
    arrays, report = {}, {"segments": {}, "errors": {}, "config": {}}
    with Client(http_url, model=model) as http:
        import tritonclient.http

        config = tritonclient.http.InferenceServerClient(http_url).get_model_config(model)
        report["config"] = {
            "max_batch_size": config.get("max_batch_size"),
            "max_queue_delay_microseconds": int(config.get("dynamic_batching", {}).get("max_queue_delay_microseconds", -1)),
            "instances": sum(g.get("count", 0) for g in config.get("instance_group", [])),
            "ready": http.ready(),
        }
        served = json.loads((out_dir / "served.json").read_text())
        max_batch = report["config"]["max_batch_size"]
        for protocol, url in (("http", http_url), ("grpc", grpc_url)):
            with Client(url, protocol=protocol, model=model) as client:
                for task in served:
                    # all images in one request (batched on the server), and the first one alone
                    for how, batch in (("batch", images[:max_batch]), ("single", images[:1]))[: 2 if protocol == "http" else 1]:
                        for i, result in enumerate(client.predict(batch, task, threshold=0.4)):
                            key = f"{protocol}/{task}/{how}/{i}"
                            if task == "semantic":
                                arrays[key] = result
                            else:
                                arrays[key] = result["segmentation"]
                                report["segments"][key] = result["segments_info"]
                only = None if protocol == "http" else ("not_an_image", "oversized_batch")
                report["errors"][protocol] = errors_then_ok(client, images, max_batch, served, only)
    np.savez(out_dir / "results.npz", **{k.replace("/", "__"): v for k, v in arrays.items()})
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
