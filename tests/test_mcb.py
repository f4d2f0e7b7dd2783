"""Compact bilinear pooling, the MCB VQA models, the ARNN swap, VQA accuracy and the VQA v2 loader."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import arnn_plugins as ap
from arnn_plugins.models.mcb import (
    CompactBilinearPooling,
    MCBGlimpseAttention,
    MCBVQA,
    TransformersQuestionEncoder,
    build_mcb_vqa,
    count_sketch,
)
from arnn_plugins.data.vqa import QuestionTokenizer, VQADataset, normalize_answer, process_punctuation, vqa_accuracy

C, Q_VOCAB, N_ANS, H, W = 8, 30, 6, 6, 6


def small_model(kind="mcb_att", **kw):
    args = dict(num_answers=N_ANS, img_channels=C, vocab_size=Q_VOCAB, mcb_dim=256, att_hidden=16,
                embed_dim=8, hidden_size=8, num_layers=2)
    args.update(kw)
    return build_mcb_vqa(kind, **args)


def batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, C, H, W, generator=g)
    tokens = torch.randint(2, Q_VOCAB, (b, 5), generator=g)
    tokens[0, 3:] = 0  # a padded question
    return x, tokens


# --------------------------------------------------------------------------
# Compact bilinear pooling


def test_cbp_is_count_sketch_of_outer_product():
    # Psi(x) * Psi(q) (circular convolution) is the count sketch of x q^T
    # with hash (h1(i) + h2(j)) mod d and sign s1(i) s2(j): check exactly.
    torch.manual_seed(0)
    d = 64
    cbp = CompactBilinearPooling(5, 7, d, seed=3)
    x, q = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    outer = (x[:, :, None] * q[:, None, :]).reshape(3, -1)
    h = ((cbp.h1[:, None] + cbp.h2[None, :]) % d).reshape(-1)
    s = (cbp.s1[:, None] * cbp.s2[None, :]).reshape(-1).double()
    expected = count_sketch(outer, h, s, d)
    torch.testing.assert_close(cbp(x, q), expected, atol=1e-10, rtol=1e-10)


def test_cbp_inner_products_track_bilinear_inner_product():
    # <MCB(x, q), MCB(x', q')> estimates <x, x'> <q, q'> (Pham & Pagh); over
    # many random pairs with inner products spread from -1 to 1 (in units of
    # the norms) the estimate must follow the truth closely. Error scale is
    # about 1/sqrt(d) ~ 0.03 of the norm product here.
    g = torch.Generator().manual_seed(1)
    n, c1, c2, d = 300, 16, 12, 1024
    cbp = CompactBilinearPooling(c1, c2, d, seed=0)
    x, q = torch.randn(n, c1, generator=g), torch.randn(n, c2, generator=g)
    a, b = torch.rand(n, 1, generator=g) * 2 - 1, torch.rand(n, 1, generator=g) * 2 - 1
    x2 = a * x + (1 - a.abs()) * torch.randn(n, c1, generator=g)
    q2 = b * q + (1 - b.abs()) * torch.randn(n, c2, generator=g)
    est = (cbp(x, q) * cbp(x2, q2)).sum(1)
    true = (x * x2).sum(1) * (q * q2).sum(1)
    scale = x.norm(dim=1) * x2.norm(dim=1) * q.norm(dim=1) * q2.norm(dim=1)
    corr = torch.corrcoef(torch.stack([est, true]))[0, 1]
    assert corr > 0.95, corr
    assert ((est - true).abs() / scale).mean() < 0.08


def test_cbp_is_unbiased_over_hash_draws():
    g = torch.Generator().manual_seed(2)
    x, q = torch.randn(1, 10, generator=g), torch.randn(1, 9, generator=g)
    x2, q2 = x + 0.5 * torch.randn(1, 10, generator=g), q + 0.5 * torch.randn(1, 9, generator=g)
    true = float((x * x2).sum() * (q * q2).sum())
    ests = []
    for seed in range(200):
        cbp = CompactBilinearPooling(10, 9, 32, seed=seed)
        ests.append(float((cbp(x, q) * cbp(x2, q2)).sum()))
    ests = np.array(ests)
    # Mean of 200 draws within 4 standard errors of the truth.
    assert abs(ests.mean() - true) < 4 * ests.std() / np.sqrt(len(ests)) + 1e-6
    assert ests.std() > 0  # the seeds really draw different hashes


def test_cbp_shapes_per_location_and_broadcast():
    cbp = CompactBilinearPooling(C, 5, 40)
    x, q = torch.randn(2, C, 3, 4), torch.randn(2, 5)
    y = cbp(x, q)
    assert y.shape == (2, 40, 3, 4)
    # Per location equals the vector version.
    torch.testing.assert_close(y[:, :, 1, 2], cbp(x[:, :, 1, 2], q), atol=1e-5, rtol=1e-5)
    qmap = q[:, :, None, None].expand(2, 5, 3, 4)
    torch.testing.assert_close(cbp(x, qmap), y, atol=1e-5, rtol=1e-5)
    assert cbp(x[:, :, 0, 0], q).shape == (2, 40)
    # Hashes are buffers, fixed by the seed and saved with the model.
    assert set(dict(cbp.named_buffers())) == {"h1", "h2", "s1", "s2"}
    torch.testing.assert_close(CompactBilinearPooling(C, 5, 40).h1, cbp.h1)


def test_cbp_bad_input_names_layer_and_shape():
    cbp = CompactBilinearPooling(C, 5, 40)
    with pytest.raises(ValueError, match=r"CompactBilinearPooling.*\(B, 8\)"):
        cbp(torch.randn(2, 7), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"CompactBilinearPooling.*\(2, 5\)"):
        cbp(torch.randn(2, C), torch.randn(3, 5))
    with pytest.raises(TypeError, match="CompactBilinearPooling"):
        cbp(torch.ones(2, C, dtype=torch.long), torch.randn(2, 5))


# --------------------------------------------------------------------------
# VQA accuracy (official vqaEval.py)


def humans(n_match, answer="2", other="3", total=10):
    return [answer] * n_match + [other] * (total - n_match)


@pytest.mark.parametrize(
    "n_match, expected",
    [
        # Leave each of the 10 humans out in turn and score min(matches among
        # the other 9 / 3, 1); average the 10 scores.
        (0, 0.0),
        # 1 match: leaving the matching human out leaves 0 -> 0; the other 9
        # subsets keep 1 match -> 1/3.  (0 + 9 * 1/3) / 10 = 0.3
        (1, 0.3),
        # 2 matches: 2 subsets keep 1 -> 1/3, 8 keep 2 -> 2/3.
        # (2/3 + 16/3) / 10 = 18/30 = 0.6
        (2, 0.6),
        # 3 matches: 3 subsets keep 2 -> 2/3, 7 keep 3 -> 1.
        # (3 * 2/3 + 7) / 10 = 9/10 = 0.9  (the 0.9 agrees)
        (3, 0.9),
        # 4 matches: every subset keeps at least 3 -> 1.
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(n_match, expected):
    assert vqa_accuracy("2", humans(n_match)) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_numbers_articles_punctuation_case():
    assert vqa_accuracy("two", humans(3)) == pytest.approx(0.9)
    assert vqa_accuracy("Two", humans(1)) == pytest.approx(0.3)
    # The prediction is always normalised, also when all humans agree.
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("  the Dog.", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("a red car", ["red car"] * 2 + ["blue car"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("dont know", ["don't know"] * 4 + ["yes"] * 6) == 1.0
    # Human answers only get the punctuation step (official behaviour): an
    # unnormalised human "Two" does not match; strict=False normalises them.
    assert vqa_accuracy("2", ["Two"] * 3 + ["3"] * 7) == 0.0
    assert vqa_accuracy("2", ["Two"] * 3 + ["3"] * 7, strict=False) == pytest.approx(0.9)
    # Annotation dicts work as well.
    assert vqa_accuracy("yes", [{"answer": "yes", "answer_id": i} for i in range(10)]) == 1.0
    assert vqa_accuracy("yes", ["no"] * 10) == 0.0


def test_answer_normalisation_details():
    assert normalize_answer("Two dogs!") == "2 dogs"
    assert normalize_answer("the cat's toy.") == "cat's toy"
    assert normalize_answer("None") == "0"
    assert normalize_answer("an apple") == "apple"
    # A digit-comma-digit anywhere: punctuation is dropped, not spaced.
    assert process_punctuation("1,000") == "1000"
    assert process_punctuation("black/white") == "black white"
    assert process_punctuation("3.5") == "3.5"  # decimal point kept
    with pytest.raises(ValueError, match="vqa_accuracy"):
        vqa_accuracy("yes", [])


# --------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("kind", ["mcb", "mcb_att", "mcb_arnn"])
def test_forward_backward_each_kind(kind):
    torch.manual_seed(0)
    model = small_model(kind)
    x, tokens = batch()
    logits, att = model(x, tokens, return_attention=True)
    assert logits.shape == (4, N_ANS) and torch.isfinite(logits).all()
    if kind == "mcb":
        assert att is None and model.attention is None
    else:
        assert att.shape == (4, 2, H, W)
        assert (att >= 0).all()
        torch.testing.assert_close(att.sum((2, 3)), torch.ones(4, 2))
    F.cross_entropy(logits, torch.arange(4) % N_ANS).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    grads = {n: p.grad.abs().sum() for n, p in model.named_parameters()}
    assert grads["classifier.weight"] > 0
    assert grads["question_encoder.embed.weight"] > 0
    if kind == "mcb_arnn":
        assert "attention.conv1.weight" not in grads  # plain replacement
        assert grads["attention.arnn.0.input_proj.weight"] > 0
        assert grads["attention.arnn.1.context.weight"] > 0
    if kind == "mcb_att":
        assert type(model.attention) is MCBGlimpseAttention
        assert grads["attention.conv1.weight"] > 0
    assert isinstance(model, MCBVQA)


def test_structure_local_attention_is_permutation_invariant_arnn_is_not():
    # MCB and MCB+ATT (delta = 1) treat locations as a set: shuffling the
    # locations leaves the answer unchanged. ARNN's attention depends on the
    # spatial arrangement.
    torch.manual_seed(0)
    x, tokens = batch()
    perm = torch.randperm(H * W)
    xp = x.flatten(2)[:, :, perm].reshape(x.shape)
    x, xp = x.double(), xp.double()  # float64: the signed sqrt magnifies rounding noise
    for kind, invariant in (("mcb", True), ("mcb_att", True), ("mcb_arnn", False)):
        model = small_model(kind).double().eval()
        diff = (model(x, tokens) - model(xp, tokens)).abs().max()
        assert (diff < 1e-6) if invariant else (diff > 1e-4), (kind, diff)


def test_arnn_attention_is_conditioned_on_the_question():
    torch.manual_seed(0)
    model = small_model("mcb_arnn").eval()
    x, tokens = batch()
    _, a1 = model(x, tokens, return_attention=True)
    _, a2 = model(x, tokens.flip(0), return_attention=True)
    # Same images, other questions: other maps.
    assert (a1 - a2).abs().max() > 1e-4
    # Attention of sample 0 does not depend on sample 1's question.
    t2 = tokens.clone()
    t2[1] = torch.randint(2, Q_VOCAB, (5,))
    _, a3 = model(x, t2, return_attention=True)
    torch.testing.assert_close(a3[0], a1[0])


def test_swap_residual_keeps_function_and_checkpoints():
    torch.manual_seed(0)
    model = small_model("mcb_att").eval()
    x, tokens = batch()
    before = model(x, tokens)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = ap.swap_attention(model)
    assert names == ["attention"]
    assert type(model.attention).__name__ == "ARNNGlimpseAttention" and model.attention.residual
    assert len(model.attention.arnn) == 2
    assert model.attention.arnn[0].context_kernel == 1  # delta = 1, as in the paper
    torch.testing.assert_close(model(x, tokens), before, atol=1e-6, rtol=1e-6)
    # The MCB+ATT checkpoint loads: only ARNN keys are new.
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".arnn." in k for k in result.missing_keys)
    # A swapped model is not matched again.
    with pytest.raises(ValueError, match="found no attention module"):
        ap.swap_attention(model)
    # The ARNN correction is trainable and, once trained, changes the maps.
    model.train()
    loss = F.cross_entropy(model(x, tokens), torch.arange(4) % N_ANS)
    loss.backward()
    combiner = model.attention.arnn[0].combiner[-1]
    assert combiner.weight.grad.abs().sum() > 0


def test_swap_replace_and_arnn_options():
    torch.manual_seed(0)
    model = small_model("mcb_att").eval()
    x, tokens = batch()
    before = model(x, tokens)
    names = ap.swap_attention(model, mode="replace", hidden_channels=4, context_kernel=3)
    assert names == ["attention"]
    att = model.attention
    assert not att.residual and not hasattr(att, "conv1")
    assert att.arnn[0].hidden_channels == 4 and att.arnn[0].context_kernel == 3
    assert att.arnn[0].query_channels == model.query_channels
    assert not torch.allclose(model(x, tokens), before, atol=1e-4)


def test_training_lowers_the_loss():
    # MCB+ATT and MCB+ARNN fit a tiny batch.
    for kind in ("mcb_att", "mcb_arnn"):
        torch.manual_seed(0)
        model = small_model(kind, dropout=0.0)
        x, tokens = batch(b=8, seed=3)
        y = torch.arange(8) % N_ANS
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(25):
            loss = F.cross_entropy(model(x, tokens), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], (kind, losses)


def test_transformers_question_encoder():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=Q_VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    enc = TransformersQuestionEncoder(transformers.BertModel(cfg))
    assert enc.out_dim == 16
    # A bare transformers model is wrapped.
    bare = small_model("mcb", question_encoder=transformers.BertModel(cfg), vocab_size=None)
    assert isinstance(bare.question_encoder, TransformersQuestionEncoder) and bare.query_channels == 16
    model = small_model("mcb_arnn", question_encoder=enc, vocab_size=None).eval()
    assert model.attention.arnn[0].query_channels == 16
    x, tokens = batch()
    logits = model(x, tokens)
    assert logits.shape == (4, N_ANS)
    logits.sum().backward()
    assert enc.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    # The padding mask reaches the text model: padded positions do not matter.
    t2 = tokens.clone()
    t2[0, 3:] = 0
    m2 = tokens.clone()
    m2[0, 3:] = 7
    mask = tokens != 0
    q1 = model.encode_question(t2, mask)
    q2 = model.encode_question(m2, mask)
    torch.testing.assert_close(q1[0], q2[0], atol=1e-5, rtol=1e-5)


def test_model_bad_input_messages():
    model = small_model("mcb_att")
    x, tokens = batch()
    with pytest.raises(ValueError, match=r"MCBVQA.*\(B, 8, H, W\)"):
        model(x[:, :5], tokens)
    with pytest.raises(ValueError, match=r"MCBVQA.*\(4, L\)"):
        model(x, tokens[:2])
    with pytest.raises(TypeError, match="MCBVQA"):
        model(x.long(), tokens)
    with pytest.raises(ValueError, match=r"MCBGlimpseAttention.*\(4, 16\)"):
        model.attention(x, torch.randn(4, 3))
    with pytest.raises(ValueError, match="build_mcb_vqa"):
        build_mcb_vqa("mcb_san", num_answers=3, vocab_size=5)


# --------------------------------------------------------------------------
# VQA v2 loader


def write_vqa_fixture(tmp_path, layout="dir"):
    questions = {"questions": [
        {"image_id": 11, "question": "How many dogs are there?", "question_id": 110},
        {"image_id": 11, "question": "What color is the dog?", "question_id": 111},
        {"image_id": 12, "question": "Is it raining?", "question_id": 120},
        {"image_id": 13, "question": "How many cats?", "question_id": 130},
    ]}

    def ans(lst, mc):
        return {"answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(lst)],
                "multiple_choice_answer": mc}

    annotations = {"annotations": [
        dict(question_id=110, image_id=11, **ans(["2"] * 3 + ["two"] * 2 + ["3"] * 5, "3")),
        dict(question_id=111, image_id=11, **ans(["brown"] * 9 + ["white"], "brown")),
        dict(question_id=120, image_id=12, **ans(["no"] * 10, "no")),
        dict(question_id=130, image_id=13, **ans(["2"] * 6 + ["1"] * 4, "2")),
    ]}
    qpath, apath = tmp_path / "questions.json", tmp_path / "annotations.json"
    qpath.write_text(json.dumps(questions))
    apath.write_text(json.dumps(annotations))
    feats = {i: np.random.RandomState(i).randn(C, H, W).astype(np.float32) for i in (11, 12, 13)}
    if layout == "dir":
        fdir = tmp_path / "features"
        fdir.mkdir()
        np.save(fdir / "COCO_val2014_000000000011.npy", feats[11])
        np.save(fdir / "12.npy", feats[12])
        torch.save(torch.from_numpy(feats[13]), fdir / "13.pt")
        fpath = fdir
    elif layout == "pt":
        fpath = tmp_path / "features.pt"
        torch.save({k: torch.from_numpy(v) for k, v in feats.items()}, fpath)
    else:
        fpath = tmp_path / "features.npz"
        np.savez(fpath, **{str(k): v for k, v in feats.items()})
    return qpath, apath, fpath, feats


@pytest.mark.parametrize("layout", ["dir", "pt", "npz"])
def test_vqa_loader_official_format(tmp_path, layout):
    qpath, apath, fpath, feats = write_vqa_fixture(tmp_path, layout)
    ds = VQADataset(qpath, fpath, apath, top_k=3, max_question_len=6)
    assert len(ds) == 4
    # Top-3 multiple-choice answers by frequency (ties alphabetical): each of
    # "2", "3", "brown", "no" occurs once -> "2", "3", "brown".
    assert ds.answer_vocab == ["2", "3", "brown"]
    item = ds[0]
    assert item["question_id"] == 110
    torch.testing.assert_close(item["image"], torch.from_numpy(feats[11]))
    assert item["question"].shape == (6,) and item["question"].dtype == torch.long
    # "how many dogs are there" -> 5 known words, then padding.
    assert (item["question"][:5] > 1).all() and item["question"][5] == 0
    assert item["answer"] == 1  # multiple_choice_answer "3"
    # Soft targets are the official accuracies: "2" and "two" both count as
    # "2" (5 humans -> 1.0), "3" has 5 humans -> 1.0, "brown" none.
    torch.testing.assert_close(item["answer_scores"], torch.tensor([1.0, 1.0, 0.0]))
    item = ds[1]
    assert item["answer"] == 2
    # 9 humans say brown -> 1.0; "white" is outside the vocabulary.
    torch.testing.assert_close(item["answer_scores"], torch.tensor([0.0, 0.0, 1.0]))
    assert ds[2]["answer"] == -1  # "no" not in the top 3
    assert ds.human_answers(110)[:4] == ["2", "2", "2", "two"]
    # The same vocabularies serve another split; batches feed the model.
    val = VQADataset(qpath, fpath, apath, answer_vocab=ds.answer_vocab, tokenizer=ds.tokenizer, max_question_len=6)
    assert val.answer_vocab == ds.answer_vocab
    loader = torch.utils.data.DataLoader(val, batch_size=4)
    b = next(iter(loader))
    assert b["image"].shape == (4, C, H, W) and b["question"].shape == (4, 6)
    model = small_model("mcb_att", num_answers=len(ds.answer_vocab), vocab_size=len(ds.tokenizer)).eval()
    assert model(b["image"], b["question"]).shape == (4, 3)


def test_vqa_loader_without_annotations_and_errors(tmp_path):
    qpath, apath, fpath, _ = write_vqa_fixture(tmp_path)
    ds = VQADataset(qpath, fpath)
    assert "answer" not in ds[0] and len(ds.answer_vocab) == 0
    tok = ds.tokenizer
    assert tok.encode("How many zebras?")[2] == 1  # unknown word
    assert QuestionTokenizer.split("What's the dog's name?") == ["what's", "the", "dog's", "name"]
    (fpath / "12.npy").unlink()
    with pytest.raises(ValueError, match="no features for 1 images"):
        VQADataset(qpath, fpath)
    with pytest.raises(ValueError, match="'annotations'"):
        VQADataset(qpath, fpath, {"questions": []})
