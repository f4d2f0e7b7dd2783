"""arnn-plugins: AttentionRNN structured spatial attention for existing model zoos."""

from .arnn import ARNNStats, AttentionRNN, BlockAttentionRNN, product_of_gaussians
from .gate import ARNNGate, zero_init_attention
from .registry import (
    get_adapter,
    insert_attention,
    list_adapters,
    register_adapter,
    remove_attention,
    swap_attention,
)
from .ops import available_backends, diagonal_lstm
from . import finetune  # noqa: F401  (ap.finetune.load_pretrained, param_groups, ...)

__version__ = "0.1.0"

__all__ = [
    "ARNNGate",
    "ARNNStats",
    "AttentionRNN",
    "BlockAttentionRNN",
    "available_backends",
    "diagonal_lstm",
    "get_adapter",
    "insert_attention",
    "list_adapters",
    "product_of_gaussians",
    "register_adapter",
    "remove_attention",
    "swap_attention",
    "zero_init_attention",
]
