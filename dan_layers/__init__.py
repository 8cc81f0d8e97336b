"""dan-layers: the Distract-your-Attention Network (DAN) as reusable PyTorch building blocks.

Losses: ``AffinityLoss``, ``CenterLoss``, ``PartitionLoss``, and DAN's whole objective
``DANLoss``. Attention: ``SpatialAttention``, ``ChannelAttention``,
``MultiHeadAttentionBlock``. Fusion: ``AttentionFusion``. DAN on any backbone:
``DANHead``. Deployment: ``reparameterize_model``, ``can_reparameterize``. Parameter-free maths:
``dan_layers.functional``.
"""

from dan_layers import functional
from dan_layers.attention import ChannelAttention, MultiHeadAttentionBlock, SpatialAttention
from dan_layers.deploy import can_reparameterize, reparameterize_model
from dan_layers.fusion import AttentionFusion
from dan_layers.head import DANHead, DANHeadOutput
from dan_layers.losses import AffinityLoss, CenterLoss, DANLoss, DANLossOutput, PartitionLoss

__version__ = "0.2.0"

__all__ = [
    "AffinityLoss",
    "AttentionFusion",
    "CenterLoss",
    "ChannelAttention",
    "DANHead",
    "DANHeadOutput",
    "DANLoss",
    "DANLossOutput",
    "MultiHeadAttentionBlock",
    "PartitionLoss",
    "SpatialAttention",
    "__version__",
    "can_reparameterize",
    "functional",
    "reparameterize_model",
]
