"""Worker of tests/test_distill_ddp.py, started by torchrun (gloo, 2 processes).

Every rank pushes its own, different teacher batches through ``ClusterModule.teacher_step``
(different batch sizes, some images without boxes) and saves its final bank state and what it
contributed, so the test can check that both ranks applied the same (gathered) updates.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toist_core import dist  # noqa: E402
from toist_core.distill.cluster import ClusterModule, noun_features  # noqa: E402
from toist_core.distill.config import DistillConfig  # noqa: E402

CONFIG = dict(bank_size=6, feature_dim=4, num_clusters=2, num_tasks=3)
STEPS = 12
WORDS = ["step", "on", "chair", "couch", "bed"]


class WordEncoding:
    """Minimal stand-in for a tokenizer's BatchEncoding: token 0 is <s>, then one token per word."""

    def __init__(self, captions):
        self.maps = []
        for caption in captions:
            char_to_token, position, token = {}, 0, 1
            for word in caption.split(" "):
                for c in range(position, position + len(word)):
                    char_to_token[c] = token
                position += len(word) + 1
                token += 1
            self.maps.append(char_to_token)

    def char_to_token(self, batch_index, char):
        return self.maps[batch_index].get(char)


def _batch(generator, batch_size):
    caption = " ".join(WORDS)
    text_len = len(WORDS) + 2
    text = torch.randn(text_len, batch_size, CONFIG["feature_dim"], generator=generator)
    image = torch.randn(3, batch_size, CONFIG["feature_dim"], generator=generator)
    img_memory = torch.cat([image, text])
    memory = {"img_memory": img_memory, "text_memory": img_memory[-text_len:],
              "tokenized": WordEncoding([caption] * batch_size)}
    targets = []
    for _ in range(batch_size):
        n = int(torch.randint(0, 3, (1,), generator=generator))
        word = WORDS[int(torch.randint(2, 5, (1,), generator=generator))]
        begin = caption.find(word)
        targets.append({"boxes": torch.rand(n, 4, generator=generator), "caption": caption,
                        "task_id": int(torch.randint(1, 3, (1,), generator=generator)),
                        "noun_tokens_positive": [[(begin, begin + len(word))]] * n})
    return memory, targets


def main(out_dir):
    torch_dist.init_process_group("gloo")
    rank = dist.rank()
    module = ClusterModule(DistillConfig(**CONFIG))
    generator = torch.Generator().manual_seed(1000 + rank)
    contributed = []
    for _ in range(STEPS):
        memory, targets = _batch(generator, batch_size=2 + rank)
        features, _, valid = noun_features(memory, targets)
        tasks = torch.tensor([t["task_id"] - 1 for t in targets])
        contributed.append((features[valid], tasks[valid]))
        module.teacher_step(memory, targets)

    gathered = dist.all_gather_variable(torch.arange(2 * rank, dtype=torch.float32).reshape(rank, 2))
    num_boxes = dist.average_num_boxes(3 if rank == 0 else 1)
    torch.save({"bank": module.bank.state_dict(), "contributed": contributed, "gathered": gathered,
                "num_boxes": num_boxes, "world_size": dist.world_size()},
               Path(out_dir) / f"rank{rank}.pt")
    torch_dist.barrier()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
