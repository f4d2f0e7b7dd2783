"""mmengine glue: the package's training tasks in mmengine's registries.

One module per task, each registering (in mmengine's root registries, so
configs need no ``default_scope``) its model, data sets and metric:

===============  ================================================================
``pan``          :class:`PANModel`, :class:`MultiDigitTensors` (cached multi-digit
                 data), ``MultiDigitDataset``, :class:`PANMetric` (paper 4.1)
``cifar``        :class:`CifarResNet`, :class:`CIFAR100Dict`, :class:`AccuracyMetric`
                 (paper 4.2)
``vqa``          :class:`MCBModel`, :class:`VQADict`, :class:`VQAMetric` (paper 4.3)
``mgan``         :class:`MGANModel`, :class:`MGANOptimWrapperConstructor`,
                 :class:`CelebADict` (paper 4.4)
``hooks``        :class:`ProgressBarHook`
``distributed``  launchers (torchrun, srun, mpirun), process groups, threads per
                 process, :class:`BufferSyncHook`
``runner``       :func:`load_config`, :func:`build_runner`, :func:`checkpoint_loading`
``checkpoints``  :class:`CheckpointRunner` (atomic checkpoint writes),
                 :func:`find_resume_checkpoint`, :func:`load_weights` (strict)
===============  ================================================================

Configs load them all with ``custom_imports = dict(imports=['arnn_plugins.engine'])``
(the CLI imports it anyway).
"""

from .checkpoints import CheckpointRunner, find_resume_checkpoint, load_weights
from .cifar import AccuracyMetric, CIFAR100Dict, CifarResNet
from .distributed import BufferSyncHook
from .hooks import ProgressBarHook
from .metric import CollectMetric
from .mgan import CelebADict, MGANModel, MGANOptimWrapperConstructor
from .pan import SCALE_BINS, MultiDigitTensors, PANMetric, PANModel
from .runner import build_model, build_runner, checkpoint_loading, last_checkpoint, load_config, prepare_runner
from .vqa import MCBModel, VQADict, VQAMetric

__all__ = [
    "PANModel",
    "PANMetric",
    "MultiDigitTensors",
    "CifarResNet",
    "CIFAR100Dict",
    "AccuracyMetric",
    "CollectMetric",
    "MCBModel",
    "VQADict",
    "VQAMetric",
    "MGANModel",
    "CelebADict",
    "MGANOptimWrapperConstructor",
    "ProgressBarHook",
    "CheckpointRunner",
    "find_resume_checkpoint",
    "load_weights",
    "BufferSyncHook",
    "SCALE_BINS",
    "load_config",
    "build_runner",
    "build_model",
    "checkpoint_loading",
    "last_checkpoint",
    "prepare_runner",
]
