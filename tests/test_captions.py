"""Pronoun / noun captions, their character spans and the positive maps built from them."""

from pathlib import Path

import pytest
import torch

from toist_core.data.captions import find_word, grounding_targets, noun_caption, noun_targets, pronoun_targets
from toist_core.data.collate import add_positive_maps
from toist_core.tasks import TASK_PHRASES

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "toist_core" / "assets" / "tiny_tokenizer"
CAR, CHAIR, COUCH, BOTTLE, BOOK = 3, 62, 63, 44, 84


@pytest.fixture(scope="module")
def tokenizer():
    from toist_core.model.text import load_tokenizer

    return load_tokenizer(str(TOKENIZER_DIR))


def test_find_word_respects_word_boundaries():
    text = "pound carpet with car"
    assert text.find("car") == 6  # what the reference's str.find returns: inside "carpet"
    assert find_word(text, "car") == 18
    assert find_word("a car.", "car") == 2
    assert find_word("scar cars", "car") == -1
    assert find_word("car car", "car", start=1) == 4
    with pytest.raises(ValueError):
        find_word("x", "")


def test_pronoun_targets_whole_caption_positive():
    targets = pronoun_targets(2, num_boxes=3)
    assert targets.caption == "sit comfortably on something"
    assert targets.tokens_positive == [[(0, len(targets.caption))]] * 3
    (begin, end), = targets.noun_tokens_positive[0]
    assert targets.caption[begin:end] == "something"
    assert len(targets.noun_tokens_positive) == 3


def test_pronoun_span_is_the_appended_word_even_inside_the_phrase():
    # "it" also occurs inside "sit": the pronoun span must be the appended word.
    targets = pronoun_targets(2, num_boxes=1, pronoun="it")
    assert targets.caption == "sit comfortably on it"
    assert targets.noun_tokens_positive == [[(19, 21)]]
    assert pronoun_targets(5, num_boxes=0).tokens_positive == []


def test_noun_caption_single_class():
    targets = noun_targets(2, [CHAIR, CHAIR])
    assert targets.caption == "sit comfortably on chair"
    assert targets.tokens_positive == [[(0, 24)], [(0, 24)]]
    (begin, end), = targets.noun_tokens_positive[1]
    assert targets.caption[begin:end] == "chair"


def test_noun_caption_multi_class_is_ordered_by_category_id():
    targets = noun_targets(2, [COUCH, CHAIR, COUCH])
    assert targets.caption == "sit comfortably on chair sit comfortably on couch"
    phrase = TASK_PHRASES[2]
    for box, name in zip(range(3), ["couch", "chair", "couch"]):
        (pb, pe), = targets.tokens_positive[box]
        (nb, ne), = targets.noun_tokens_positive[box]
        assert targets.caption[pb:pe] == phrase + name
        assert targets.caption[nb:ne] == name
        assert pb <= nb and ne == pe  # the noun lies inside the box's own part
    # Both couch boxes point at the same (second) part.
    assert targets.tokens_positive[0] == targets.tokens_positive[2] == [(25, 49)]


def test_noun_caption_empty_image():
    targets = noun_targets(7, [])
    assert targets.caption == ""
    assert targets.tokens_positive == [] and targets.noun_tokens_positive == []


def test_noun_that_is_a_substring_of_the_phrase():
    # Task 14 "pound carpet with " + "car": the reference's find("car") hits "carpet".
    targets = noun_targets(14, [CAR])
    assert targets.caption == "pound carpet with car"
    (nb, ne), = targets.noun_tokens_positive[0]
    assert (nb, ne) == (18, 21) and targets.caption[nb:ne] == "car"
    # Task 8 "open bottle of beer with " + "bottle": the noun is the last "bottle".
    targets = noun_targets(8, [BOTTLE])
    (nb, ne), = targets.noun_tokens_positive[0]
    assert targets.caption[nb:ne] == "bottle" and nb == len(TASK_PHRASES[8])
    # Several classes: each noun inside its own part.
    targets = noun_targets(14, [BOOK, CAR])
    assert targets.caption == "pound carpet with car pound carpet with book"
    assert [targets.caption[b:e] for (b, e), in targets.noun_tokens_positive] == ["book", "car"]
    assert targets.noun_tokens_positive[1] == [(18, 21)]


def test_noun_caption_spans_unique_names():
    caption, spans = noun_caption(3, ["vase", "cup", "vase"])
    assert caption == "place flowers in vase place flowers in cup"
    assert set(spans) == {"vase", "cup"}
    assert caption[slice(*spans["cup"][1])] == "cup"


def test_noun_caption_may_name_classes_without_boxes():
    targets = noun_targets(2, [COUCH], caption_category_ids=[COUCH, CHAIR])
    assert targets.caption == "sit comfortably on chair sit comfortably on couch"
    (begin, end), = targets.tokens_positive[0]
    assert targets.caption[begin:end] == "sit comfortably on couch"
    with pytest.raises(ValueError, match=r"\[63\] are not named"):
        noun_targets(2, [COUCH], caption_category_ids=[CHAIR])


def test_unknown_category_is_an_error():
    with pytest.raises(KeyError, match="12345"):
        noun_targets(1, [12345])


def test_positive_maps_from_tokenizer_offsets(tokenizer):
    noun = noun_targets(14, [CAR, BOOK])
    pronoun = pronoun_targets(14, num_boxes=2)
    targets = add_positive_maps([{"caption": noun.caption, "tokens_positive": noun.noun_tokens_positive},
                                 {"caption": pronoun.caption, "tokens_positive": pronoun.tokens_positive}],
                                tokenizer)
    encoding = tokenizer([noun.caption, pronoun.caption], padding="longest")
    noun_map = targets[0]["positive_map"]
    assert noun_map.shape == (2, 256) and set(noun_map.unique().tolist()) <= {0.0, 1.0}
    for row, word in zip(noun_map, ["car", "book"]):
        ids = [encoding["input_ids"][0][i] for i in torch.nonzero(row).flatten().tolist()]
        assert tokenizer.decode(ids).strip() == word
    # Pronoun input: every caption token (not <s>, </s>, padding) is positive for every box.
    pronoun_map = targets[1]["positive_map"]
    content = [i for i, tok in enumerate(encoding["input_ids"][1])
               if tok not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)]
    assert torch.equal(pronoun_map[0], pronoun_map[1])
    assert torch.nonzero(pronoun_map[0]).flatten().tolist() == content


def test_grounding_captions_name_each_class_once_and_point_each_box_at_it():
    """Two category ids of one name (an own COCO_categories list) gave 'cup. cup' (the noun
    caption named it once); boxes keep their own class's span."""
    targets = grounding_targets([1, 7, 3, 1], {1: "cup", 3: "knife", 7: "cup"})
    assert targets.caption == "cup. knife"
    assert targets.tokens_positive == [[(0, 3)], [(0, 3)], [(5, 10)], [(0, 3)]]
    assert grounding_targets([1, 3], {1: "cup", 3: "knife"}).caption == "cup. knife"
