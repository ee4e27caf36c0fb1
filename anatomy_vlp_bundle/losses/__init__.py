"""Vision-language losses (contrastive, alignment), the zero-shot scorer and the loss criterion.

Embedding tensors only: boxes and the normality prior have their own losses, registered into
:class:`VLPCriterion` by name.
"""

from .alignment import (
    VLPCriterion,
    builtin_terms,
    global_finding_labels,
    global_sigmoid_loss,
    label_targets,
    prompt_pair_loss,
    zero_shot_logits,
    zero_shot_probs,
)
from .contrastive import (
    ContrastiveLoss,
    LogitScale,
    anatomy_infonce,
    calibrated_infonce,
    calibrated_targets,
    disease_contrastive,
    soft_cross_entropy,
    text_key_ids,
)
from .distributed import gather_objects, gather_tensor, gather_with_grad, get_rank, get_world_size, is_distributed

__all__ = [
    "ContrastiveLoss",
    "LogitScale",
    "VLPCriterion",
    "anatomy_infonce",
    "builtin_terms",
    "calibrated_infonce",
    "calibrated_targets",
    "disease_contrastive",
    "gather_objects",
    "gather_tensor",
    "gather_with_grad",
    "get_rank",
    "get_world_size",
    "global_finding_labels",
    "global_sigmoid_loss",
    "is_distributed",
    "label_targets",
    "prompt_pair_loss",
    "soft_cross_entropy",
    "text_key_ids",
    "zero_shot_logits",
    "zero_shot_probs",
]

# detection loss and the model's criterion (appended)
from .detection import detection_loss, present_box_mask  # noqa: E402
from .criterion import (  # noqa: E402
    DEFAULT_WEIGHTS,
    anatomy_abnormal,
    anatomy_normal,
    build_criterion,
    detection_term,
    make_targets,
    normality_term,
)

__all__ += [
    "detection_loss",
    "present_box_mask",
    "DEFAULT_WEIGHTS",
    "anatomy_abnormal",
    "anatomy_normal",
    "build_criterion",
    "detection_term",
    "make_targets",
    "normality_term",
]
