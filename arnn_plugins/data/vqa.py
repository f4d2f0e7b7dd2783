"""VQA v2 in its published JSON format, with precomputed image features.

Files (as released on visualqa.org):

- questions, e.g. ``v2_OpenEnded_mscoco_train2014_questions.json``:
  ``{"questions": [{"image_id": int, "question": str, "question_id": int}, ...]}``
- annotations (optional; absent for test splits), e.g.
  ``v2_mscoco_train2014_annotations.json``:
  ``{"annotations": [{"question_id": int, "image_id": int,
  "multiple_choice_answer": str, "answers": [{"answer": str,
  "answer_id": int, ...}] * 10, ...}, ...]}``

Image features, one ``(C, H, W)`` array per image (e.g. ResNet-152 ``res5c``,
2048 x 14 x 14), in any of these layouts:

- a directory of ``<name>.npy`` or ``<name>.pt`` files, one per image, where
  the trailing digits of ``<name>`` are the image id (``123.npy``,
  ``COCO_val2014_000000000123.npy``); files are read when an item is fetched;
- one ``.pt`` file holding a dict ``{image_id: tensor}`` (int or str keys);
- one ``.npz`` file whose keys are image ids (or names ending in them);
- an in-memory dict ``{image_id: tensor or array}``.

:func:`vqa_accuracy` is the official VQA evaluation's per-question accuracy,
answer normalisation included.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "QuestionTokenizer",
    "VQADataset",
    "build_answer_vocab",
    "load_vqa_features",
    "load_vqa_json",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "vqa_accuracy",
]

PathOrData = Union[str, os.PathLike, dict]
_TRAILING_DIGITS = re.compile(r"(\d+)$")


def load_vqa_json(obj: PathOrData, key: str) -> list:
    """The ``key`` list (``"questions"`` / ``"annotations"``) of a VQA JSON file or of its loaded dict."""
    if isinstance(obj, (str, os.PathLike)):
        with open(obj, "r", encoding="utf-8") as f:
            obj = json.load(f)
    if not isinstance(obj, dict) or key not in obj or not isinstance(obj[key], list):
        raise ValueError(f"VQADataset: expected a VQA JSON object with a {key!r} list")
    return obj[key]


class QuestionTokenizer:
    """Lowercase word tokenizer with a vocabulary built from questions.

    Ids: 0 padding, 1 unknown word, then the words by decreasing frequency.

    Args:
        vocab: word -> id (must hold ``"<pad>": 0`` and ``"<unk>": 1``).
        max_len: questions are cut or padded to this many tokens.
    """

    PAD, UNK = "<pad>", "<unk>"
    pad_token_id = 0
    _WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

    def __init__(self, vocab: Mapping[str, int], max_len: int = 14) -> None:
        if vocab.get(self.PAD) != 0 or vocab.get(self.UNK) != 1:
            raise ValueError("QuestionTokenizer: vocab must map '<pad>' to 0 and '<unk>' to 1")
        self.vocab = dict(vocab)
        self.max_len = max_len

    @classmethod
    def split(cls, text: str) -> List[str]:
        """``"What's the dog doing?"`` -> ``["what's", "the", "dog", "doing"]``."""
        return cls._WORD.findall(text.lower())

    @classmethod
    def build(cls, questions: Sequence[str], min_count: int = 1, max_len: int = 14) -> "QuestionTokenizer":
        """Vocabulary of every word seen at least ``min_count`` times in ``questions``."""
        counts = Counter(w for q in questions for w in cls.split(q))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        vocab = {cls.PAD: 0, cls.UNK: 1}
        vocab.update({w: i + 2 for i, w in enumerate(words)})
        return cls(vocab, max_len)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``, cut to ``max_len`` (not padded)."""
        return [self.vocab.get(w, 1) for w in self.split(text)][: self.max_len]


def build_answer_vocab(annotations: Sequence[dict], top_k: int = 3000) -> List[str]:
    """The ``top_k`` most frequent (normalised) ``multiple_choice_answer`` strings, most frequent first."""
    counts: Counter = Counter()
    for ann in annotations:
        ans = ann.get("multiple_choice_answer")
        if ans is None:
            ans = Counter(a["answer"] for a in ann["answers"]).most_common(1)[0][0]
        counts[normalize_answer(ans)] += 1
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]


class _FeatureDir(Mapping):
    """Lazy ``image_id -> tensor`` view of a directory of ``.npy`` / ``.pt`` files."""

    def __init__(self, root: str) -> None:
        self.files: Dict[int, str] = {}
        for name in os.listdir(root):
            stem, ext = os.path.splitext(name)
            m = _TRAILING_DIGITS.search(stem)
            if ext in (".npy", ".pt") and m:
                self.files[int(m.group(1))] = os.path.join(root, name)
        if not self.files:
            raise ValueError(f"VQADataset: no <image_id>.npy or <image_id>.pt feature files in {root}")

    def __getitem__(self, image_id):
        path = self.files[int(image_id)]
        if path.endswith(".npy"):
            return torch.from_numpy(np.load(path))
        return torch.load(path, map_location="cpu", weights_only=True)

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _int_keys(d: Mapping) -> Dict[int, object]:
    out = {}
    for k, v in d.items():
        m = _TRAILING_DIGITS.search(str(k))
        if m is None:
            raise ValueError(f"VQADataset: feature key {k!r} does not end in an image id")
        out[int(m.group(1))] = v
    return out


def load_vqa_features(source: Union[str, os.PathLike, Mapping]) -> Mapping:
    """``image_id -> (C, H, W)`` features from a directory, a ``.pt``/``.npz`` file or a dict (module docstring)."""
    if isinstance(source, Mapping):
        return _int_keys(source)
    source = os.fspath(source)
    if os.path.isdir(source):
        return _FeatureDir(source)
    if source.endswith(".npz"):
        with np.load(source) as z:
            return _int_keys({k: z[k] for k in z.files})
    if source.endswith(".pt"):
        data = torch.load(source, map_location="cpu", weights_only=True)
        if not isinstance(data, Mapping):
            raise ValueError(f"VQADataset: {source} must hold a dict {{image_id: (C, H, W) tensor}}")
        return _int_keys(data)
    raise ValueError(f"VQADataset: features must be a directory, a .pt or .npz file, or a dict; got {source!r}")


class VQADataset(Dataset):
    """VQA v2 questions (+ answers) with precomputed image features.

    Args:
        questions: path of the questions JSON, or its loaded dict.
        features: image features (see the module docstring for layouts).
        annotations: path or dict of the annotations JSON; ``None`` for
            splits without answers.
        answer_vocab: answer strings (the classifier's classes); built from
            ``annotations`` (top ``top_k``) when ``None``. Pass the training
            set's ``answer_vocab`` to validation sets.
        top_k: answer vocabulary size when it is built here.
        tokenizer: a :class:`QuestionTokenizer`, or any object with
            ``encode(str) -> list[int]`` (e.g. a ``transformers`` tokenizer);
            built from these questions when ``None``. Pass the training set's
            to validation sets.
        max_question_len: tokens per question (cut or padded).

    Items (dicts; the default collate batches them):
        ``image`` ``(C, H, W)`` float32; ``question`` ``(L,)`` long, padded
        with the tokenizer's pad id; ``question_id`` int; with annotations
        also ``answer`` (index of the normalised
        ``multiple_choice_answer``, -1 when outside the vocabulary) and
        ``answer_scores`` ``(K,)``, the official accuracy of every vocabulary
        answer (soft targets for a BCE loss).
    """

    def __init__(
        self,
        questions: PathOrData,
        features: Union[str, os.PathLike, Mapping],
        annotations: Optional[PathOrData] = None,
        answer_vocab: Optional[Sequence[str]] = None,
        top_k: int = 3000,
        tokenizer=None,
        max_question_len: int = 14,
    ) -> None:
        self.questions = load_vqa_json(questions, "questions")
        self.annotations: Optional[Dict[int, dict]] = None
        if annotations is not None:
            anns = load_vqa_json(annotations, "annotations")
            self.annotations = {a["question_id"]: a for a in anns}
            missing = [q["question_id"] for q in self.questions if q["question_id"] not in self.annotations]
            if missing:
                raise ValueError(f"VQADataset: {len(missing)} questions have no annotation, e.g. {missing[:3]}")
            if answer_vocab is None:
                answer_vocab = build_answer_vocab(anns, top_k)
        self.answer_vocab: List[str] = list(answer_vocab or [])
        self.answer_index = {a: i for i, a in enumerate(self.answer_vocab)}
        if tokenizer is None:
            tokenizer = QuestionTokenizer.build([q["question"] for q in self.questions], max_len=max_question_len)
        if not callable(getattr(tokenizer, "encode", None)):
            raise TypeError("VQADataset: tokenizer must have an encode(str) -> list[int] method")
        self.tokenizer = tokenizer
        self.max_question_len = max_question_len
        self.pad_id = int(getattr(tokenizer, "pad_token_id", 0) or 0)
        self.features = load_vqa_features(features)
        absent = {q["image_id"] for q in self.questions} - set(self.features.keys())
        if absent:
            raise ValueError(f"VQADataset: no features for {len(absent)} images, e.g. {sorted(absent)[:3]}")

    def __len__(self) -> int:
        return len(self.questions)

    def human_answers(self, question_id: int) -> List[str]:
        """The raw human answers of a question (for :func:`~arnn_plugins.models.mcb.vqa_accuracy`)."""
        if self.annotations is None:
            raise ValueError("VQADataset: this split was loaded without annotations")
        return [a["answer"] for a in self.annotations[int(question_id)]["answers"]]

    def encode_question(self, text: str) -> torch.Tensor:
        """``str`` -> ``(max_question_len,)`` long, padded."""
        ids = list(self.tokenizer.encode(text))[: self.max_question_len]
        ids += [self.pad_id] * (self.max_question_len - len(ids))
        return torch.tensor(ids, dtype=torch.long)

    def __getitem__(self, idx: int) -> dict:
        q = self.questions[idx]
        feat = torch.as_tensor(self.features[int(q["image_id"])]).float()
        if feat.dim() != 3:
            raise ValueError(
                f"VQADataset: features of image {q['image_id']} must have shape (C, H, W), got {tuple(feat.shape)}"
            )
        item = {"image": feat, "question": self.encode_question(q["question"]), "question_id": int(q["question_id"])}
        if self.annotations is not None:
            ann = self.annotations[q["question_id"]]
            humans = [a["answer"] for a in ann["answers"]]
            mc = ann.get("multiple_choice_answer")
            mc = normalize_answer(mc) if mc is not None else None
            item["answer"] = torch.tensor(self.answer_index.get(mc, -1), dtype=torch.long)
            scores = torch.zeros(len(self.answer_vocab))
            for cand in {normalize_answer(h) for h in humans}:
                if cand in self.answer_index:
                    scores[self.answer_index[cand]] = vqa_accuracy(cand, humans, strict=False)
            item["answer_scores"] = scores
        return item


# --------------------------------------------------------------------------
# Official VQA accuracy (github.com/GT-Vision-Lab/VQA, vqaEval.py)

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = ("a", "an", "the")
# Kept byte for byte from the official code, including its "(?!<=\d)" (meant
# as a look-behind; in effect it drops every period not followed by a digit).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: drop or space out punctuation, strip sentence periods."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, number words to digits, no articles, contractions."""
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Full official normalisation of one answer string (whitespace, punctuation, digits, articles)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: Sequence, strict: bool = True) -> float:
    """Official VQA accuracy of one predicted answer against the (10) human answers.

    ``acc = mean over the leave-one-out subsets of min(#matches among the
    other humans / 3, 1)``: with 10 humans, 1 match gives 0.3, 2 give 0.6, 3
    give 0.9 and 4 or more give 1.0.

    Args:
        prediction: the predicted answer string.
        human_answers: the human answers, as strings or as the annotation
            dicts ``{"answer": ...}`` (10 in VQA; any number >= 1 is accepted).
        strict: follow ``vqaEval.py`` of the official VQA toolkit exactly:
            the prediction is stripped, then punctuation, number words,
            articles and contractions are normalised; the human answers (which
            the released annotations already store normalised) only get the
            punctuation step, and only when the humans disagree.
            ``strict=False`` fully normalises the human answers too (for
            annotations that were not normalised beforehand).

    Returns:
        Accuracy in ``[0, 1]``.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"vqa_accuracy: prediction must be a str, got {type(prediction).__name__}")
    answers = [a["answer"] if isinstance(a, dict) else a for a in human_answers]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("vqa_accuracy: human_answers must be a non-empty sequence of strings or {'answer': str} dicts")
    pred = normalize_answer(prediction)
    if not strict:
        answers = [normalize_answer(a) for a in answers]
    elif len(set(answers)) > 1:
        answers = [process_punctuation(a) for a in answers]
    accs = []
    # Leave out one human at a time (by position: the official code compares
    # annotation dicts, whose answer_id makes every human distinct).
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1:]
        accs.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(accs) / len(accs)
