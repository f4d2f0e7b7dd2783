"""Host models that no model zoo provides."""

from .mcb import CompactBilinearPooling, MCBGlimpseAttention, MCBVQA, build_mcb_vqa, vqa_accuracy
from .pan import PAN, mask_correctness
from .modular_gan import CelebA, LocalMask, ModularGAN, ModularGANTrainer
from .vqa_data import QuestionTokenizer, VQADataset
