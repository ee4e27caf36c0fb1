"""Inference on new images: ``python -m anatomy_vlp_bundle infer`` / ``infer-batch`` and ``configs/inference.yaml``.

- :mod:`.predictor`: rebuild the model from a training checkpoint or an exported TorchScript file,
  preprocess one image, predict, and write the contract result (``../shared/DATA_CONTRACT.md``);
- :mod:`.geometry`: boxes and label maps back into the input image's own space;
- :mod:`.overlay`: boxes and the abnormality heatmap drawn on the image;
- :mod:`.batch`: a datalist or folder, bad cases reported and skipped.
"""

from .batch import collect_inputs, run_batch
from .overlay import draw_overlay
from .predictor import NOTICE, Prediction, Predictor, deploy_from_checkpoint, format_report, model_from_checkpoint

__all__ = [
    "NOTICE", "Prediction", "Predictor", "collect_inputs", "deploy_from_checkpoint", "draw_overlay", "format_report",
    "model_from_checkpoint", "run_batch",
]
