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
    with pytest.raises(InputError, match="threads must be a positive whole number or None, got 0"):
        main(["--preset", "swin-tiny-coco-panoptic", "--threads", "0"])  # as m2f-predict and Segmenter: refused


def test_bench_int8_rows_and_several_tasks(checkpoint, tmp_path):
    out = tmp_path / "r.json"
    assert main([str(checkpoint), "--size", "64", "64", "--backends", "cpu,cuda", "--int8", "--end-to-end", "--task",
                 "semantic", "panoptic", "--runs", "3", "--rounds", "2", "--warmup", "0", "--json", str(out),
                 "-q"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["settings"]["rounds"] == 2
    assert all(r["runs"] == 3 for r in report["rows"] if r["status"] == "ok")  # 2 + 1 over the two rounds
    assert report["settings"]["msda"] == "deform_conv" and report["settings"]["tasks"] == ["semantic", "panoptic"]
    assert {"numpy", "torch"} <= set(report["matmul_gflops_by_library"])  # torch is loaded: both are measured
    assert report["matmul_gflops"] == max(report["matmul_gflops_by_library"].values())
    cpu_rows = [r for r in report["rows"] if r["backend"] == "cpu"]
    ran = {(r["precision"], r["mode"], r["task"]) for r in cpu_rows if r["status"] == "ok"}
    for precision in ("fp32", "int8"):
        assert {(precision, "model", ""), (precision, "end-to-end", "semantic"),
                (precision, "end-to-end", "panoptic")} <= ran  # fmt: skip
    shares = {r["precision"]: r["roofline_share"] for r in cpu_rows if r["mode"] == "model"}
    assert 0 < shares["fp32"] < 1 and shares["int8"] is None  # int8 products are not bound by the float32 roofline
    if "cuda" not in available_backends():
        assert all(r["status"] == "skipped" for r in report["rows"] if r["backend"] == "cuda")
    with pytest.raises(InputError, match="--calib is for --int8"):
        main([str(checkpoint), "--calib", str(tmp_path)])
    with pytest.raises(InputError, match="rounds from 1 to runs"):
        main([str(checkpoint), "--runs", "2", "--rounds", "3"])


def test_threads_reach_every_post_processing_and_each_row_closes_what_it_opened(checkpoint, tmp_path, monkeypatch):
    from m2f_deploy.processing import ImageProcessor
    from m2f_deploy.runtime import segmenter

    used, closed = [], []
    post, close = ImageProcessor.post_process_panoptic_segmentation, segmenter.Segmenter.close
    def recorded(self, *a, **k):
        used.append(self)
        return post(self, *a, **k)

    monkeypatch.setattr(ImageProcessor, "post_process_panoptic_segmentation", recorded)
    monkeypatch.setattr(segmenter.Segmenter, "close", lambda self: closed.append(self) or close(self))
    args = [str(checkpoint), "--size", "64", "96", "--runs", "1", "--warmup", "0", "--threads", "2", "--backends",
            "torch,cpu", "--end-to-end", "--json", str(tmp_path / "r.json"), "-q"]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    ran = {(r["backend"], r["mode"]) for r in rows if r["status"] == "ok"}
    assert {("torch", "end-to-end"), ("cpu", "end-to-end")} <= ran
    # torch's "ours" row and each Segmenter's processor post-process on the same threads
    rows_used = [p for p in used if p.canvas is not None]  # not the export's validation (no canvas, one thread)
    assert len({id(p) for p in rows_used}) >= 2 and all(p.workers.threads == 2 for p in rows_used)
    segmenters = sum(r["backend"] == "cpu" and r["status"] == "ok" for r in rows)
    assert len(closed) == segmenters  # one Segmenter per row, each closed after it
