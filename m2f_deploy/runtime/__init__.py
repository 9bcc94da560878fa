"""Run an exported artifact (ONNX or a TensorRT engine) without PyTorch: numpy, Pillow and onnxruntime or TensorRT.

from m2f_deploy.runtime import Segmenter

segmenter = Segmenter("model.onnx")                    # backend="auto": the fastest one present
results = segmenter.predict(images, task="panoptic")  # the post-processes' structures, one per image
raw = segmenter.infer(pixel_values)                   # {"class_queries_logits": ..., "masks_queries_logits": ...}
"""

from m2f_deploy.runtime.segmenter import BACKENDS, TASKS, Segmenter, available_backends

__all__ = ["BACKENDS", "TASKS", "Segmenter", "available_backends"]
