"""Where the distillation gradients go: teacher probabilities and the bank get none, the
student's features do; every loss is finite for images without targets."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoTokenizer  # noqa: E402

from toist_core.distill.cluster import ClusterModule  # noqa: E402
from toist_core.distill.config import DistillConfig  # noqa: E402
from toist_core.distill.step import distillation_losses  # noqa: E402
from toist_core.losses.config import LossConfig  # noqa: E402
from toist_core.losses.criterion import DistillationCriterion, build_weight_dict, weighted_total  # noqa: E402
from toist_core.tokens import positive_map  # noqa: E402

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "toist_core" / "assets" / "tiny_tokenizer"
DIM, QUERIES, LAYERS = 8, 5, 6


class TinyTwoPhaseModel(nn.Module):
    """Stand-in for TOIST with the same encode/decode contract, small enough to test with."""

    def __init__(self, tokenizer, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.tokenizer = tokenizer
        self.token_embed = nn.Embedding(len(tokenizer), DIM)
        self.image_proj = nn.Linear(3, DIM)
        self.encoder = nn.Linear(DIM, DIM)
        self.queries = nn.Parameter(torch.randn(QUERIES, DIM))
        self.class_embed = nn.Linear(DIM, 256)
        self.bbox_embed = nn.Linear(DIM, 4)
        self.proj_image = nn.Linear(DIM, 64)
        self.proj_text = nn.Linear(DIM, 64)

    def encode(self, images, captions):
        tokenized = self.tokenizer(captions, padding="longest", return_tensors="pt")
        text = self.token_embed(tokenized["input_ids"]).transpose(0, 1)  # [L, B, d]
        pixels = self.image_proj(images.flatten(2).transpose(1, 2)).transpose(0, 1)  # [HW, B, d]
        img_memory = torch.tanh(self.encoder(torch.cat([pixels, text])))
        return {"img_memory": img_memory, "text_memory": img_memory[-text.shape[0]:], "tokenized": tokenized}

    def decode(self, memory):
        mem = memory.get("img_memory_mod", memory["img_memory"])
        attn = torch.einsum("qd,sbd->bqs", self.queries, mem).softmax(-1)
        context = torch.einsum("bqs,sbd->bqd", attn, mem)
        proj_tokens = F.normalize(self.proj_text(memory["text_memory"]), dim=-1).transpose(0, 1)
        layers = []
        for layer in range(LAYERS):
            hs = self.queries + context * (layer + 1) / LAYERS
            layers.append({"pred_logits": self.class_embed(hs), "pred_boxes": self.bbox_embed(hs).sigmoid(),
                           "proj_queries": F.normalize(self.proj_image(hs), dim=-1), "proj_tokens": proj_tokens})
        out = dict(layers[-1])
        out["aux_outputs"] = layers[:-1]
        return out


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _targets(tokenizer, with_boxes):
    """Teacher / student targets of two images of task 2 (image 1 never has boxes)."""
    g = torch.Generator().manual_seed(0)
    nouns = ["sit comfortably on chair", ""]
    pronouns = ["sit comfortably on something"] * 2
    teacher, student = [], []
    for b in range(2):
        n = 1 if (with_boxes and b == 0) else 0
        boxes = torch.rand(n, 4, generator=g) * 0.3 + 0.2
        for caption, word, out in ((nouns[b], "chair", teacher), (pronouns[b], "something", student)):
            begin = caption.find(word)
            spans = [[(0, len(caption))]] * n  # the whole caption, as the reference's tokens_positive
            noun_spans = [[(begin, begin + len(word))]] * n
            encoding = tokenizer([caption], return_tensors="pt")
            out.append({"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64), "caption": caption,
                        "task_id": 2, "tokens_positive": spans, "noun_tokens_positive": noun_spans,
                        "positive_map": positive_map(encoding, 0, spans)})
    return teacher, student


def _setup(tokenizer):
    teacher, student = TinyTwoPhaseModel(tokenizer, 1), TinyTwoPhaseModel(tokenizer, 2)
    cluster = ClusterModule(DistillConfig(bank_size=6, feature_dim=DIM, num_clusters=2))
    criterion = DistillationCriterion(LossConfig(), cluster.config)
    images = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    return teacher, student, cluster, criterion, images


def _grads(loss, module):
    params = [p for p in module.parameters()]
    return [g for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) if g is not None
            and g.abs().sum() > 0]


def test_gradient_routes(tokenizer):
    teacher, student, cluster, criterion, images = _setup(tokenizer)
    targets_noun, targets_sth = _targets(tokenizer, with_boxes=True)
    bank_before = cluster.bank.feature_bank.clone()
    losses = distillation_losses(teacher, student, images, targets_noun, targets_sth, criterion, cluster)

    # SBTL: teacher probabilities are targets only.
    assert _grads(losses["loss_softkd"], teacher) == []
    assert _grads(losses["loss_softkd_2"], teacher) == []
    assert _grads(losses["loss_softkd"], student) != []
    # Cluster loss: reaches the student's text features (encoder, embeddings), not its
    # decoder heads, and nothing of the teacher.
    assert _grads(losses["loss_cluster_feature"], teacher) == []
    cl = dict(zip([n for n, _ in student.named_parameters()],
                  torch.autograd.grad(losses["loss_cluster_feature"], list(student.parameters()),
                                      retain_graph=True, allow_unused=True)))
    assert cl["encoder.weight"] is not None and cl["encoder.weight"].abs().sum() > 0
    assert cl["token_embed.weight"].abs().sum() > 0
    assert cl["class_embed.weight"] is None
    # Teacher losses still train the teacher's encoder through the untouched memory rows.
    noun = dict(zip([n for n, _ in teacher.named_parameters()],
                    torch.autograd.grad(losses["noun_loss_ce"], list(teacher.parameters()),
                                        retain_graph=True, allow_unused=True)))
    assert noun["encoder.weight"] is not None and noun["encoder.weight"].abs().sum() > 0
    assert _grads(losses["noun_loss_ce"], student) == []

    total = weighted_total(losses, build_weight_dict(LossConfig(), cluster.config))
    total.backward()
    # The bank is a buffer: it changed (the teacher's noun feature went in) but has no graph.
    assert not torch.equal(cluster.bank.feature_bank, bank_before)
    assert not cluster.bank.feature_bank.requires_grad and cluster.bank.feature_bank.grad is None
    assert not cluster.bank.cluster_centers.requires_grad


def test_stored_feature_is_the_teacher_noun_feature(tokenizer):
    teacher, _, cluster, _, images = _setup(tokenizer)
    targets_noun, _ = _targets(tokenizer, with_boxes=True)
    memory = teacher.encode(images, [t["caption"] for t in targets_noun])
    cluster.teacher_step(memory, targets_noun)
    chair = 4  # <s> sit comfortably on chair </s>
    assert torch.allclose(cluster.bank.feature_bank[1, -1], memory["text_memory"][chair, 0].detach())


def test_all_losses_finite_without_targets(tokenizer):
    teacher, student, cluster, criterion, images = _setup(tokenizer)
    targets_noun, targets_sth = _targets(tokenizer, with_boxes=False)
    losses = distillation_losses(teacher, student, images, targets_noun, targets_sth, criterion, cluster)
    weights = build_weight_dict(LossConfig(), cluster.config)
    assert set(weights) - set(losses) == {f"loss_cluster_{k}_{i}" for k in ("feature", "choice") for i in range(5)}
    for key, value in losses.items():
        assert torch.isfinite(value).all(), key
    assert cluster.bank.update_count.sum() == 0  # empty teacher images add nothing
    total = weighted_total(losses, weights)
    total.backward()
    for name, p in list(teacher.named_parameters()) + list(student.named_parameters()):
        assert p.grad is None or torch.isfinite(p.grad).all(), name
