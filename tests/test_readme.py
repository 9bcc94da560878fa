"""The README's two commands stay true: CI runs the test command, and the demo runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_demo_and_test_commands():
    demo, tests = _readme_commands()[:2]
    assert demo.endswith("python -m m2f_deploy.demo")
    assert "pip install -c .ci/constraints.txt" in demo
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci], "the README's test command is what .ci/run runs"


def test_demo_runs(tmp_path, capsys):
    """The demo on the shipped checkpoint and samples: export, m2f-predict, segments, latency."""
    from m2f_deploy.demo import SAMPLES, main

    assert main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "latency of one image" in out and "| id | label | score | area px |" in out
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "predictions" / "panoptic.json").is_file()
    for sample in sorted(SAMPLES.glob("*.png")):
        assert (tmp_path / "predictions" / "overlays" / sample.name).is_file()
        assert (tmp_path / "predictions" / "panoptic" / sample.name).is_file()
