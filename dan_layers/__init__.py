"""dan-layers: the Distract-your-Attention Network (DAN) as reusable PyTorch building blocks.

Losses: ``AffinityLoss``, ``CenterLoss``, ``PartitionLoss``. Attention:
``SpatialAttention``, ``ChannelAttention``, ``MultiHeadAttentionBlock``. Fusion:
``AttentionFusion``. Deployment: ``reparameterize_model``. Parameter-free maths:
``dan_layers.functional``.
"""

from dan_layers import functional
from dan_layers.attention import ChannelAttention, MultiHeadAttentionBlock, SpatialAttention
from dan_layers.deploy import reparameterize_model
from dan_layers.fusion import AttentionFusion
from dan_layers.losses import AffinityLoss, CenterLoss, PartitionLoss

__version__ = "0.1.0"

__all__ = [
    "AffinityLoss",
    "AttentionFusion",
    "CenterLoss",
    "ChannelAttention",
    "MultiHeadAttentionBlock",
    "PartitionLoss",
    "SpatialAttention",
    "__version__",
    "functional",
    "reparameterize_model",
]
