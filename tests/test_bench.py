"""m2f-bench on a tiny model: it runs, the JSON has every field, percentiles are ordered, and a backend that is not
present is a skipped row with its reason (no timing asserts)."""

from __future__ import annotations

import json

import pytest
from factory import save_hf_checkpoint, tiny_config
from PIL import Image

from m2f_deploy.bench import Row, format_table, summarize
from m2f_deploy.cli.bench import main
from m2f_deploy.errors import InputError
from m2f_deploy.runtime import available_backends

FIELDS = set(Row.__dataclass_fields__)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf_checkpoint(tiny_config(), tmp_path_factory.mktemp("bench"))


def test_bench_checkpoint_all_default_backends(checkpoint, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = [str(checkpoint), "--size", "64", "96", "--runs", "3", "--warmup", "1", "--threads", "2", "--batch", "1",
            "2", "--end-to-end", "--json", str(out), "--plot", str(tmp_path / "plot.png"), "-q"]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert {"machine", "settings", "matmul_gflops", "gflop", "date", "rows"} <= set(report)
    assert report["gflop"] > 0 and report["matmul_gflops"] > 0 and report["machine"]["cores"] >= 1
    rows = report["rows"]
    assert all(set(r) == FIELDS for r in rows)
    ran = {(r["backend"], r["mode"], r["batch"]) for r in rows if r["status"] == "ok"}
    for backend in ("transformers", "torch", "cpu"):
        assert {(backend, "model", 1), (backend, "model", 2), (backend, "end-to-end", 1)} <= ran
    for r in rows:
        if r["status"] == "ok":
            assert r["runs"] == 3
            assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
            assert r["throughput_ips"] == pytest.approx(1000 * r["batch"] / r["mean_ms"])
            assert r["peak_host_mb"] > 0 and r["device"]
            if r["mode"] == "end-to-end":
                assert set(r["stages_ms"]) == {"preprocess", "inference", "postprocess"}
            else:
                assert 0 < r["roofline_share"] < 1
    absent = [b for b in ("cuda", "ort-tensorrt", "tensorrt") if b not in available_backends()]
    for r in rows:
        if r["backend"] in absent:
            assert r["status"] == "skipped" and "not installed" in r["reason"]
    table = capsys.readouterr().out
    assert "| transformers | fp32 | model | 1 |" in table and "1.00x" in table
    assert Image.open(tmp_path / "plot.png").size[0] > 0


def test_bench_artifact_has_no_pytorch_rows(checkpoint, tmp_path):
    from m2f_deploy import load_model
    from m2f_deploy.export import export_onnx

    onnx_path = export_onnx(load_model(checkpoint), tmp_path / "m.onnx", height=64, width=64)
    out = tmp_path / "r.json"
    assert (
        main([str(onnx_path), "--runs", "2", "--warmup", "0", "--backends", "torch,cpu", "--json", str(out), "-q"]) == 0
    )
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["torch"]["status"] == "skipped" and "needs a checkpoint or preset" in rows["torch"]["reason"]
    assert rows["cpu"]["status"] == "ok" and rows["cpu"]["roofline_share"] is None  # no FLOP count without the model


def test_summary_and_errors():
    row = summarize(Row("cpu", "fp32", 2, "model"), [0.010, 0.030, 0.020, 0.040])
    assert (row.p50_ms, row.mean_ms, row.throughput_ips) == (
        pytest.approx(25.0),
        pytest.approx(25.0),
        pytest.approx(80.0),
    )
    assert row.p90_ms == pytest.approx(37.0) and row.p99_ms == pytest.approx(39.7)
    assert "| cpu | fp32 | model | 2 | 25.0 |" in format_table({"rows": [{**row.__dict__, "peak_host_mb": 1.0}]})
    with pytest.raises(InputError, match="unknown backend 'onnxruntime'"):
        main(["--preset", "swin-tiny-coco-panoptic", "--backends", "onnxruntime"])
    with pytest.raises(InputError, match="nope.onnx: no such file"):
        main(["nope.onnx"])
