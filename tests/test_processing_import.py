"""m2f_deploy.processing runs on a box without PyTorch: importing and using it never imports torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_processing_never_imports_torch():
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import m2f_deploy.processing
        from m2f_deploy.processing import ImageProcessor
        from m2f_deploy.testing.logits import synthetic_outputs

        processor = ImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
        processor(np.zeros((40, 50, 3), np.uint8), np.zeros((40, 50), np.uint8))
        outputs = synthetic_outputs(num_queries=8, num_classes=5, mask_size=(16, 16))
        for post in (processor, ImageProcessor(postprocess="reference"), ImageProcessor(threads=2)):
            for task in ("semantic", "instance", "panoptic"):
                getattr(post, f"post_process_{task}_segmentation")(outputs, target_sizes=[(30, 20)])
        heavy = sorted(m for m in ("torch", "torchvision", "transformers") if m in sys.modules)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_serving_never_imports_torch():
    """The serving box (m2f-serve, its client, the repository writer and Triton's Python models) has no PyTorch."""
    script = textwrap.dedent(
        """
        import sys
        import m2f_deploy.serve
        from m2f_deploy.serve import client, protocol, repository, server, triton_python
        from m2f_deploy.cli import serve as cli_serve
        meta = {"input": {"dynamic_hw": False, "height": 64, "width": 64}, "preprocessing": {}}
        triton_python.Preprocess(meta), triton_python.Postprocess(meta)
        cli_serve.build_parser()
        heavy = sorted(m for m in ("torch", "torchvision", "transformers") if m in sys.modules)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
