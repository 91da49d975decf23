"""Regenerate toist_core/assets/tiny_tokenizer: a small RoBERTa-style byte-level BPE.

The tiny model preset needs a tokenizer that works offline and behaves like roberta-base
(byte-level BPE, <s> ... </s>, character offsets for spans) without shipping its 50k
vocabulary. This trains one deterministically on the task phrases, the COCO class names and
a handful of common words. Token ids differ from roberta-base: fine for random/tiny weights.

    python tools/make_tiny_tokenizer.py
"""

import json
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "toist_core" / "assets" / "tiny_tokenizer"
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # roberta-base ids 0..3, then <mask>
VOCAB_SIZE = 1024


def corpus() -> list[str]:
    import sys
    sys.path.insert(0, str(ROOT))
    from toist_core.tasks import TASK_PHRASES

    names = json.loads((ROOT / "toist_core" / "data" / "coco_id2name.json").read_text()).values()
    pronouns = ["something", "it", "them", "abcd", "anything", "object", "thing"]
    extra = ("a an the and or of to with in on for from by is are this that what which where "
             "find show me use can could pick grasp open close put take give hold cut pour serve "
             "left right top bottom red green blue yellow black white small large big round").split()
    lines = []
    for phrase in TASK_PHRASES.values():
        lines += [phrase + p for p in pronouns] + [phrase + n for n in names]
    lines += list(names) + extra
    return lines * 4


def main() -> None:
    tokenizer = ByteLevelBPETokenizer(add_prefix_space=False)
    tokenizer.train_from_iterator(corpus(), vocab_size=VOCAB_SIZE, min_frequency=1,
                                  special_tokens=SPECIALS, show_progress=False)
    from transformers import RobertaTokenizerFast

    vocab = tokenizer.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tokenizer._tokenizer.to_str())["model"]["merges"]]
    # Saved through transformers so that AutoTokenizer.from_pretrained(OUT) loads it exactly as
    # it loads a local copy of roberta-base.
    wrapped = RobertaTokenizerFast(vocab=vocab, merges=merges)
    OUT.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(OUT))
    print(f"wrote {OUT} ({len(wrapped)} tokens)")


if __name__ == "__main__":
    main()
