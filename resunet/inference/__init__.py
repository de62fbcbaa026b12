"""resunet.inference: segment scans with a trained model, one at a time or in batches.

- :class:`Predictor` / :class:`Prediction` (:mod:`resunet.inference.predictor`): one case in, a mask on
  exactly the input's grid out (sliding window, mirror TTA, post-processing, uncertainty).
- :func:`load_model` (:mod:`resunet.inference.model`): checkpoints, ONNX and TorchScript exports.
- :func:`export_model` (:mod:`resunet.inference.export`): ONNX/TorchScript with the checkpoint's metadata.
- :func:`discover_cases` (:mod:`resunet.inference.cases`) and :func:`run_batch`
  (:mod:`resunet.inference.batch`): the ``resunet predict`` batch runner.
"""

from resunet.inference.model import LoadedModel, load_model
from resunet.inference.postprocess import PostProcess
from resunet.inference.predictor import Prediction, Predictor

__all__ = ["LoadedModel", "PostProcess", "Prediction", "Predictor", "load_model"]
