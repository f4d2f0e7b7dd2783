"""VQA with MCB, MCB+ATT and MCB+ARNN (paper 4.3): model, data set and metric."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS
from torch.utils.data import Dataset

from ..data.vqa import QuestionTokenizer, VQADataset, build_answer_vocab, load_vqa_json
from ..models.mcb import build_mcb_vqa
from .metric import CollectMetric

__all__ = ["MCBModel", "VQADict", "VQAMetric"]


@MODELS.register_module()
class MCBModel(BaseModel):
    """mmengine model around :func:`~arnn_plugins.models.mcb.build_mcb_vqa`.

    Args:
        kind: ``"mcb"``, ``"mcb_att"`` or ``"mcb_arnn"``.
        **kwargs: :class:`~arnn_plugins.models.mcb.MCBVQA` arguments
            (``num_answers``, ``img_channels``, ``vocab_size``, ...).

    Loss: binary cross-entropy against the soft VQA scores of every answer.
    ``'predict'`` gives one ``{'pred', 'score'}`` per question, ``score``
    the official VQA accuracy of the predicted answer.
    """

    def __init__(self, kind: str = "mcb_arnn", data_preprocessor=None, init_cfg=None, **kwargs) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.vqa = build_mcb_vqa(kind, **kwargs)

    def forward(self, image, question, question_id=None, answer=None, answer_scores=None, mode: str = "tensor"):
        logits = self.vqa(image, question)
        if mode == "tensor":
            return logits
        if answer_scores is None:
            raise ValueError(f"MCBModel: mode={mode!r} needs answer_scores (a split with annotations)")
        k = self.vqa.num_answers
        scores = answer_scores.to(logits.dtype)
        if scores.shape[1] < k:  # a data set with fewer answers than classifier outputs
            scores = F.pad(scores, (0, k - scores.shape[1]))
        if mode == "loss":
            return {"loss": F.binary_cross_entropy_with_logits(logits.float(), scores.float()) * k}
        if mode == "predict":
            pred = logits.argmax(1)
            return [dict(pred=int(p), score=float(s[p])) for p, s in zip(pred, scores)]
        raise ValueError(f"MCBModel: mode must be 'loss', 'predict' or 'tensor', got {mode!r}")


@DATASETS.register_module()
class VQADict(Dataset):
    """:class:`~arnn_plugins.data.vqa.VQADataset` with fixed vocabularies for training and evaluation.

    The answer vocabulary (``num_answers`` most frequent answers) and the
    word vocabulary come from ``vocab_questions`` / ``vocab_annotations``
    (the training files), so every split agrees with the model's sizes;
    words beyond ``vocab_size`` ids map to the unknown token.
    """

    def __init__(self, questions: str, features: str, annotations: Optional[str] = None,
                 vocab_questions: Optional[str] = None, vocab_annotations: Optional[str] = None,
                 num_answers: int = 3000, vocab_size: int = 15000, max_question_len: int = 14) -> None:
        vq = load_vqa_json(vocab_questions or questions, "questions")
        va = load_vqa_json(vocab_annotations or annotations, "annotations")
        tok = QuestionTokenizer.build([q["question"] for q in vq], max_len=max_question_len)
        tok = QuestionTokenizer({w: i for w, i in tok.vocab.items() if i < vocab_size}, max_question_len)
        self.ds = VQADataset(questions, features, annotations, answer_vocab=build_answer_vocab(va, num_answers),
                             tokenizer=tok, max_question_len=max_question_len)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.ds[i]


@METRICS.register_module()
class VQAMetric(CollectMetric):
    """Mean official VQA accuracy of the predicted answers (key ``accuracy``)."""

    default_prefix = "vqa"

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        return {"accuracy": sum(r["score"] for r in results) / max(len(results), 1)}
