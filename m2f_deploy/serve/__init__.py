"""Serving on Triton Inference Server (no torch): the model-repository writer, ``m2f-serve`` and its client.

- :mod:`m2f_deploy.serve.repository`: a Triton model repository from an ``.onnx`` / ``.engine`` artifact;
- :mod:`m2f_deploy.serve.server`: ``m2f-serve``, the artifact on a real Triton server through PyTriton;
- :mod:`m2f_deploy.serve.client`: :class:`Client`, images in and ``Segmenter.predict``'s structures out;
- :mod:`m2f_deploy.serve.protocol`: the tensors between them.

PyTriton and tritonclient are imported only when used (``pip install 'm2f-deploy[serve]'``).
"""

from m2f_deploy.serve.client import Client, ServeError

__all__ = ["Client", "ServeError"]
