"""Networks: the AnatomyViT backbone, box geometry and the detection / region heads."""

from anatomy_vlp_bundle.networks.anatomy_vit import (
    AnatomyTransformerBlock,
    AnatomyViT,
    interpolate_pos_embed,
    masks_to_token_mask,
    query_attention_mask,
    remap_anatomy_queries,
)
from anatomy_vlp_bundle.networks.box_ops import (
    boxes_to_normalized_cxcywh,
    boxes_to_token_mask,
    corners_to_cxcywh,
    cxcywh_to_corners,
    elementwise_giou,
    elementwise_iou,
    normalized_cxcywh_to_boxes,
    pairwise_giou,
    pairwise_iou,
)
from anatomy_vlp_bundle.networks.heads import BoxHead, Projection, RegionPooling

__all__ = [
    "AnatomyViT",
    "AnatomyTransformerBlock",
    "masks_to_token_mask",
    "query_attention_mask",
    "interpolate_pos_embed",
    "remap_anatomy_queries",
    "corners_to_cxcywh",
    "cxcywh_to_corners",
    "boxes_to_normalized_cxcywh",
    "normalized_cxcywh_to_boxes",
    "pairwise_iou",
    "pairwise_giou",
    "elementwise_iou",
    "elementwise_giou",
    "boxes_to_token_mask",
    "BoxHead",
    "RegionPooling",
    "Projection",
]

# model assembly and deploy wrapper (appended)
from anatomy_vlp_bundle.networks.vlp_model import AnatomyVLPModel, RegionFusion  # noqa: E402
from anatomy_vlp_bundle.networks.deploy import DeployWrapper, describe_layout, export_program, export_torchscript, script_deploy  # noqa: E402

__all__ += ["AnatomyVLPModel", "RegionFusion", "DeployWrapper", "describe_layout", "export_program", "export_torchscript", "script_deploy"]
