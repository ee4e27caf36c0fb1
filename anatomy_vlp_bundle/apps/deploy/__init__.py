"""MONAI Deploy App SDK 4 application: a DICOM CT series in, the bundle's contract result, a DICOM SEG of
the present anatomies' boxes and a Basic Text SR of the report out (:mod:`.app`).

Needs the deploy environment (``bash scripts/deploy_env.sh``): ``monai-deploy-app-sdk``, ``highdicom``.
"""

from .app import (
    CT_SELECTION_RULES,
    AnatomyBoxSegWriterOperator,
    AnatomyVLPDeployApp,
    AnatomyVLPInferenceOperator,
    DeployInputError,
    SeriesPrediction,
    anatomy_code,
    box_segmentation,
    order_along_slice_axis,
    resolve_model_file,
)

__all__ = [
    "CT_SELECTION_RULES",
    "AnatomyBoxSegWriterOperator",
    "AnatomyVLPDeployApp",
    "AnatomyVLPInferenceOperator",
    "DeployInputError",
    "SeriesPrediction",
    "anatomy_code",
    "box_segmentation",
    "order_along_slice_axis",
    "resolve_model_file",
]
