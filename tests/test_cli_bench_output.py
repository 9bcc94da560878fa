"""m2f-bench's own output around benchmark(): the header line, the progress lines, the --backends list.

benchmark() is replaced by a recorder returning a fixed report (the flags reaching it are test_flags_validate_bench's).
"""

from __future__ import annotations

import pytest

from m2f_deploy.cli.bench import main
from m2f_deploy.errors import M2FError


@pytest.fixture
def recorded(monkeypatch):
    import m2f_deploy.bench as bench

    calls = []
    report = {"machine": {"cpu": "Xeon", "cores": 2}, "gflop": 12.34, "settings": {"source": "m.onnx", "height": 64,
              "width": 96}, "matmul_gflops": 150.4, "matmul_gflops_by_library": {"numpy": 150.4, "torch": 99.6},
              "date": "2026-12-03"}  # fmt: skip
    monkeypatch.setattr(bench, "benchmark", lambda target, **kw: calls.append(kw) or report)
    monkeypatch.setattr(bench, "format_table", lambda r: "TABLE" if r is report else "NOT THE REPORT")
    return calls, report


def test_header_line_and_table(recorded, capsys):
    calls, report = recorded
    assert main(["m.onnx", "--threads", "3", "-q"]) == 0
    assert capsys.readouterr().out == (
        "m.onnx at 64x96: 12.3 GFLOP/image, matmul 150 GFLOP/s (best of numpy 150, torch 100); Xeon, 2 cores, "
        "threads 3, 2026-12-03\n\nTABLE\n"
    )
    report["gflop"] = None  # not counted (an engine): no GFLOP part; no --threads: "default"
    assert main(["m.onnx", "-q"]) == 0
    assert capsys.readouterr().out.startswith("m.onnx at 64x96: matmul 150 GFLOP/s (best of numpy 150, torch 100); "
                                              "Xeon, 2 cores, threads default, 2026-12-03\n")  # fmt: skip


def test_progress_lines_unless_quiet(recorded, capsys):
    calls, _ = recorded
    assert main(["m.onnx"]) == 0
    capsys.readouterr()
    calls[0]["progress"]("exporting fp32")
    assert capsys.readouterr().err == "m2f-bench: exporting fp32 ...\n"
    assert main(["m.onnx", "-q"]) == 0
    capsys.readouterr()
    calls[1]["progress"]("exporting fp32")
    assert capsys.readouterr().err == ""


def test_backends_list_drops_blanks(recorded):
    calls, _ = recorded
    assert main(["m.onnx", "--backends", " ort-cpu,, torch ,", "-q"]) == 0
    assert calls[0]["backends"] == ["ort-cpu", "torch"]


def test_json_file_and_log_lines(recorded, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["m.onnx", "--json", str(out)]) == 0
    assert out.read_text().startswith('{\n "machine": {\n  "cpu": "Xeon",')  # indented by one space, as documented
    assert f"wrote {out}" in capsys.readouterr().err
    assert main(["m.onnx", "--json", str(out), "-q"]) == 0
    assert capsys.readouterr().err == ""  # -q: nothing but the table


def test_parser_usage_and_choices(recorded, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    assert usage.startswith("usage: m2f-bench ") and "--size H [W ...]" in usage
    with pytest.raises(M2FError, match="^one of the arguments target --preset is required$"):
        main([])
    with pytest.raises(M2FError, match="invalid choice: 'everything'"):
        main(["m.onnx", "--task", "everything"])
    with pytest.raises(M2FError, match="^--calib is for --int8$"):
        main(["m.onnx", "--calib", "images"])
