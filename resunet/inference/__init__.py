"""resunet.inference: segment scans with a trained model, one at a time or in batches.

- :class:`Predictor` / :class:`Prediction` (:mod:`resunet.inference.predictor`): one case in, a mask on
  exactly the input's grid out (sliding window, mirror TTA, post-processing, uncertainty).
- :func:`load_model` (:mod:`resunet.inference.model`): checkpoints, ONNX and TorchScript exports.
- :func:`export_model` (:mod:`resunet.inference.export`): ONNX/TorchScript with the checkpoint's metadata.
- :func:`discover_cases` (:mod:`resunet.inference.cases`) and :func:`run_batch`
  (:mod:`resunet.inference.batch`): the ``resunet predict`` batch runner.
"""

import importlib
from typing import Any

#: what ``resunet predict --format`` (and a service job's ``formats``) can write; here so that the
#: service checks options without importing torch (:data:`resunet.inference.batch.FORMATS` is this)
OUTPUT_FORMATS = ("nifti", "seg", "rtstruct", "sr")

#: public name -> submodule, imported on first use (torch and MONAI: seconds), so that light modules
#: such as :mod:`resunet.inference.bundled` import without them
_WHERE = {"LoadedModel": "model", "load_model": "model", "PostProcess": "postprocess", "Prediction": "predictor",
          "Predictor": "predictor"}
__all__ = sorted([*_WHERE, "OUTPUT_FORMATS"])


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'resunet.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(f"resunet.inference.{_WHERE[name]}"), name)
