"""Cluster-centre replacement touches exactly the noun / pronoun token rows, nothing else."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoTokenizer  # noqa: E402

from toist_core.distill.ccr import replace_token_rows  # noqa: E402
from toist_core.distill.cluster import ClusterModule, pronoun_token_indices  # noqa: E402
from toist_core.distill.config import DistillConfig  # noqa: E402

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "toist_core" / "assets" / "tiny_tokenizer"
NUM_IMAGE_TOKENS, DIM = 4, 8


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _memory(tokenizer, captions, seed=0):
    tokenized = tokenizer(captions, padding="longest", return_tensors="pt")
    text_len = tokenized["input_ids"].shape[1]
    g = torch.Generator().manual_seed(seed)
    img_memory = torch.randn(NUM_IMAGE_TOKENS + text_len, len(captions), DIM, generator=g)
    return {"img_memory": img_memory, "text_memory": img_memory[-text_len:], "tokenized": tokenized}


def _span(caption, word):
    begin = caption.find(word)
    return [(begin, begin + len(word))]


def _changed_rows(before, after):
    """(row, sample) pairs where the two [S, B, D] tensors differ."""
    return sorted(map(tuple, (before != after).any(-1).nonzero().tolist()))


def test_replace_token_rows_exact_rows_copy_and_gradient():
    memory = torch.randn(6, 2, 3, requires_grad=True)
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = replace_token_rows(memory, 3, [[0, 2], []], values)
    assert _changed_rows(memory.detach(), out.detach()) == [(3, 0), (5, 0)]
    assert torch.equal(out[3, 0], values[0]) and torch.equal(out[5, 0], values[0])
    out.sum().backward()
    expected = torch.ones(6, 2, 3)
    expected[3, 0] = expected[5, 0] = 0
    assert torch.equal(memory.grad, expected)  # replaced rows get no gradient, the rest do
    with pytest.raises(ValueError, match="outside 0..2"):
        replace_token_rows(memory, 3, [[3], []], values)
    with pytest.raises(ValueError, match="values must be"):
        replace_token_rows(memory, 3, [[0], []], values[:1])


def test_teacher_step_feature_bank_and_noun_rows(tokenizer):
    captions = ["sit comfortably on chair sit comfortably on couch", ""]
    memory = _memory(tokenizer, captions)
    targets = [{"boxes": torch.rand(2, 4), "task_id": 2, "caption": captions[0],
                "noun_tokens_positive": [_span(captions[0], "chair"), _span(captions[0], "couch")]},
               {"boxes": torch.zeros(0, 4), "task_id": 2, "caption": "", "noun_tokens_positive": []}]
    module = ClusterModule(DistillConfig(bank_size=8, feature_dim=DIM, num_clusters=2))
    other_tasks = module.bank.feature_bank[[0, 2]].clone()
    out = module.teacher_step(memory, targets)

    text = memory["text_memory"]
    chair, couch = 4, 9  # token positions (<s> sit comfortably on chair s it comfortably on couch </s>)
    feature = (text[chair, 0] + text[couch, 0]) / 2
    bank = module.bank
    assert torch.allclose(bank.feature_bank[1, -1], feature)
    assert bank.update_count.tolist()[:3] == [0.0, 1.0, 0.0]  # the empty image adds nothing
    assert torch.equal(bank.feature_bank[[0, 2]], other_tasks)

    centre = bank.nearest_centre(1, feature)
    first_text_row = NUM_IMAGE_TOKENS
    mod = out["img_memory_mod"]
    assert _changed_rows(memory["img_memory"], mod) == [(first_text_row + chair, 0), (first_text_row + couch, 0)]
    assert torch.equal(mod[first_text_row + chair, 0], centre) and torch.equal(mod[first_text_row + couch, 0], centre)
    assert "img_memory_mod" not in memory  # the caller's dict is not modified


def test_student_step_pronoun_rows_and_cluster_loss(tokenizer):
    captions = ["sit comfortably on something", "dig hole with something"]
    memory = _memory(tokenizer, captions, seed=1)
    targets = [{"boxes": torch.rand(1, 4), "task_id": 2, "caption": captions[0]},
               {"boxes": torch.zeros(0, 4), "task_id": 7, "caption": captions[1]}]
    module = ClusterModule(DistillConfig(bank_size=8, feature_dim=DIM, num_clusters=3))
    out, losses = module.student_step(memory, targets)

    indices = pronoun_token_indices(memory["tokenized"], captions, "something")
    text = memory["text_memory"]
    pronoun = torch.stack([text[indices[b], b].mean(0) for b in range(2)])
    centres = torch.stack([module.bank.nearest_centre(t, pronoun[b]) for b, t in enumerate([1, 6])])
    expected_rows = sorted((NUM_IMAGE_TOKENS + t, b) for b in range(2) for t in indices[b])
    assert _changed_rows(memory["img_memory"], out["img_memory_mod"]) == expected_rows
    for row, b in expected_rows:
        assert torch.equal(out["img_memory_mod"][row, b], centres[b])
    expected_loss = sum(((pronoun[b] - centres[b]) ** 2).mean() for b in range(2)) / 2
    assert losses["loss_cluster_feature"].item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert losses["loss_cluster_choice"].item() == 0


def test_bank_features_and_cluster_loss_are_fp32_under_autocast(tokenizer):
    """runtime.amp=bf16 on CPU: the encoder's rows come out bf16; the bank stored bf16-rounded
    means and the cluster loss (weight 1e4) and its gradient were computed in bf16."""
    def bf16(memory):
        text_len = memory["text_memory"].shape[0]
        img_memory = memory["img_memory"].bfloat16().requires_grad_()
        return {**memory, "img_memory": img_memory, "text_memory": img_memory[-text_len:]}

    noun_caption, pronoun_caption = "sit comfortably on chair or couch", "sit comfortably on something"
    teacher = bf16(_memory(tokenizer, [noun_caption], seed=2))
    student = bf16(_memory(tokenizer, [pronoun_caption] * 2, seed=3))
    module = ClusterModule(DistillConfig(bank_size=8, feature_dim=DIM, num_clusters=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module.teacher_step(teacher, [{"boxes": torch.rand(1, 4), "task_id": 2, "caption": noun_caption,
                                       "noun_tokens_positive": [_span(noun_caption, "chair"),
                                                                _span(noun_caption, "couch")]}])
        _, losses = module.student_step(student, [{"boxes": torch.rand(1, 4), "task_id": 2,
                                                   "caption": pronoun_caption}] * 2)
    nouns = [pronoun_token_indices(teacher["tokenized"], [noun_caption], noun)[0] for noun in ("chair", "couch")]
    noun_rows = teacher["text_memory"].detach().double()[:, 0]
    assert module.bank.feature_bank.dtype == torch.float32
    assert torch.allclose(module.bank.feature_bank[1, -1].double(),
                          torch.stack([noun_rows[rows].mean(0) for rows in nouns]).mean(0), atol=1e-6, rtol=0)
    loss = losses["loss_cluster_feature"]
    assert loss.dtype == torch.float32
    text = student["text_memory"].detach().double()
    indices = pronoun_token_indices(student["tokenized"], [pronoun_caption] * 2, "something")
    rows = torch.stack([text[indices[b], b].mean(0) for b in range(2)])
    centres = torch.stack([module.bank.nearest_centre(1, rows[b].float()) for b in range(2)]).double()
    assert loss.item() == pytest.approx(((rows - centres) ** 2).mean(1).mean().item(), rel=1e-5)


def test_each_sample_keeps_the_centre_chosen_for_it_when_kmeans_reruns_every_use(tokenizer):
    """kmeans_rerun every_use: the second sample of a task re-ran k-means in place, and the first
    sample's centre, a view of the stored centres, became the second run's (its CCR row and
    cluster loss used a centre nobody chose for it)."""
    captions = ["sit comfortably on something", "sit comfortably on something"]
    memory = _memory(tokenizer, captions, seed=3)
    targets = [{"boxes": torch.rand(1, 4), "task_id": 2, "caption": caption} for caption in captions]
    module = ClusterModule(DistillConfig(bank_size=16, feature_dim=DIM, num_clusters=3, kmeans_rerun="every_use",
                                         kmeans_max_iter=1))
    torch.manual_seed(0)
    module.bank.feature_bank.copy_(torch.randn_like(module.bank.feature_bank))
    module.bank.full_label.fill_(1)   # full: k-means warm-starts from the stored centres, one step per use
    chosen, centre_of = [], module._centre

    def recorded(task, query):
        centre = centre_of(task, query)
        chosen.append(centre.clone())   # as chosen, before the next sample's k-means
        return centre

    module._centre = recorded
    out, losses = module.student_step(memory, targets)
    assert len(chosen) == 2 and not torch.equal(chosen[0], chosen[1])   # k-means moved in between
    indices = pronoun_token_indices(memory["tokenized"], captions, "something")
    for b in range(2):
        for t in indices[b]:
            assert torch.equal(out["img_memory_mod"][NUM_IMAGE_TOKENS + t, b], chosen[b])
    text = memory["text_memory"]
    pronoun = torch.stack([text[indices[b], b].mean(0) for b in range(2)])
    expected = sum(((pronoun[b] - chosen[b]) ** 2).mean() for b in range(2)) / 2
    assert losses["loss_cluster_feature"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_ccr_switch_off_keeps_memory_but_cluster_loss_stays(tokenizer):
    captions = ["step on something"]
    memory = _memory(tokenizer, captions)
    targets = [{"boxes": torch.rand(1, 4), "task_id": 1, "caption": captions[0],
                "noun_tokens_positive": [_span(captions[0], "something")]}]
    module = ClusterModule(DistillConfig(ccr=False, bank_size=4, feature_dim=DIM, num_clusters=2))
    assert "img_memory_mod" not in module.teacher_step(memory, targets)
    student_memory = _memory(tokenizer, captions, seed=5)
    out, losses = module.student_step(student_memory, targets)
    assert "img_memory_mod" not in out and losses["loss_cluster_feature"].item() > 0
    assert "img_memory_mod" not in module.inference_step(memory, [1], [[3]])


def test_inference_step_skips_free_text(tokenizer):
    captions = ["water plant with something", "water plant with something"]
    memory = _memory(tokenizer, captions, seed=2)
    module = ClusterModule(DistillConfig(bank_size=4, feature_dim=DIM, num_clusters=2))
    indices = pronoun_token_indices(memory["tokenized"], captions, "something")
    out = module.inference_step(memory, [5, None], indices)
    pronoun = memory["text_memory"][indices[0], 0].mean(0)
    centre = module.bank.nearest_centre(4, pronoun)
    assert _changed_rows(memory["img_memory"], out["img_memory_mod"]) == [(NUM_IMAGE_TOKENS + t, 0) for t in indices[0]]
    assert torch.equal(out["img_memory_mod"][NUM_IMAGE_TOKENS + indices[0][0], 0], centre)
    with pytest.raises(ValueError, match="task id 15"):
        module.inference_step(memory, [15, None], indices)


def test_pronoun_is_found_at_its_last_occurrence(tokenizer):
    captions = ["sit comfortably on it", "dig hole with it"]
    tokenized = tokenizer(captions, padding="longest", return_tensors="pt")
    # "it" also occurs inside "sit" / "with": the pronoun is the final word.
    assert pronoun_token_indices(tokenized, captions, "it") == [[4], [4]]
    with pytest.raises(ValueError, match="does not contain the pronoun"):
        pronoun_token_indices(tokenized, captions, "something")
    # Whole words only: "it" of "sit" is no pronoun; each caption may have its own.
    mixed = ["sit comfortably on something", "dig hole with it"]
    tokenized = tokenizer(mixed, padding="longest", return_tensors="pt")
    with pytest.raises(ValueError, match="'sit comfortably on something' does not contain the pronoun 'it'"):
        pronoun_token_indices(tokenized, mixed, "it")
    assert pronoun_token_indices(tokenized, mixed, ["something", "it"]) == [[4], [4]]
    with pytest.raises(ValueError, match="1 pronouns for 2 captions"):
        pronoun_token_indices(tokenized, mixed, ["it"])
