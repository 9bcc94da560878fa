"""benchmarks/gpu_check.py runs where only some libraries exist: its CPU smoke mode, here, says what it skipped."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_cpu_smoke_runs_what_it_can_says_what_it_skipped_and_resumes(tmp_path):
    pytest.importorskip("transformers")
    gpu_check = load_script()
    out = tmp_path / "check"
    assert gpu_check.main(["--cpu-smoke", "--out", str(out), "--runs", "2"]) == 0
    first = {r["key"]: r for r in rows(out)}
    assert first["parity: ours vs transformers fp32"]["metrics"]["pass"] is True
    assert first["onnxruntime cpu fp32"]["metrics"]["max_abs_masks"] < 1e-4
    for precision in ("fp32", "fp16", "int8"):
        row = first[f"TensorRT engine {precision}"]
        assert row["status"] == "skipped" and "TensorRT is not installed" in row["reason"]
    assert "CUDAExecutionProvider" in first["onnxruntime cuda fp32"]["reason"]
    assert "not part of the CPU smoke run" in first["torch.compile fp32 vs eager"]["reason"]
    variants = {v["variant"] for v in first["latency"]["metrics"]["variants"]}
    assert {"eager float32", "transformers eager fp32", "onnxruntime cpu fp32"} <= variants
    table = (out / "results.md").read_text()
    assert "| parity: ours vs transformers fp32 | ok |" in table and "| TensorRT engine int8 | skipped |" in table
    # a re-run keeps what is done: no finished row is recorded twice
    lines = len(rows(out))
    assert gpu_check.main(["--cpu-smoke", "--out", str(out), "--runs", "2"]) == 0
    again = rows(out)[lines:]
    assert again and all(r["status"] != "ok" for r in again)  # only the skipped rows were tried again
    # the INT8 export of the TensorRT rows (skipped above without TensorRT): its code path runs here too
    from m2f_deploy.artifact import read_onnx_metadata

    int8 = gpu_check.export(gpu_check.Check(gpu_check.parse_args(["--cpu-smoke", "--out", str(out)])), "int8")
    meta = read_onnx_metadata(int8)
    assert int8 == out / "model-int8.onnx" and meta["precision"] == "int8"
    assert meta["exporter"]["int8"]["target"] == "tensorrt"


def test_a_spent_budget_leaves_rows_for_the_next_run(tmp_path):
    gpu_check = load_script()
    out = tmp_path / "check"
    assert gpu_check.main(["--cpu-smoke", "--out", str(out), "--budget", "0"]) == 0
    recorded = {r["key"]: r for r in rows(out)}
    assert recorded["environment"]["status"] == "ok"  # what the machine is: always recorded
    for key in ("parity: ours vs transformers fp32", "onnxruntime cpu fp32", "latency"):
        assert recorded[key]["status"] == "skipped" and "time budget (0 s) spent: re-run" in recorded[key]["reason"]


@pytest.mark.parametrize("script", sorted(SCRIPT.parent.glob("*.py")), ids=lambda p: p.name)
def test_every_project_import_in_the_benchmarks_resolves(script):
    """Imports inside functions run only on the paths that need them (e.g. the INT8 export on a GPU machine): a moved
    module must still be caught here, on CPU."""
    import ast
    import importlib

    for node in ast.walk(ast.parse(script.read_text(), str(script))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("m2f_deploy"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
                    f"{script.name}:{node.lineno}: {node.module} has no {alias.name}"
                )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("m2f_deploy"):
                    importlib.import_module(alias.name)


@pytest.mark.parametrize("args, message", [
    (["--runs", "0"], "--runs 0: at least 1 timed run"),
    (["--runs", "-2"], "--runs -2: at least 1 timed run"),
    (["--size", "100"], "--size 100: a positive multiple of 32"),
    (["--size", "0"], "--size 0: a positive multiple of 32"),
    (["--budget", "nan"], "--budget nan: seconds, a finite number >= 0"),
    (["--budget", "-1"], "--budget -1.0: seconds, a finite number >= 0"),
])  # fmt: skip
def test_bad_options_are_one_usage_error_before_anything_runs(tmp_path, capsys, args, message):
    gpu_check = load_script()
    out = tmp_path / "check"
    with pytest.raises(SystemExit) as info:
        gpu_check.main(["--cpu-smoke", "--out", str(out), *args])
    assert info.value.code == 2 and capsys.readouterr().err.strip().endswith(f"error: {message}")
    assert not out.exists()
    assert gpu_check.parse_args(["--cpu-smoke"]).runs == 3 and gpu_check.parse_args([]).size == 384
