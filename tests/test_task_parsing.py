"""One task-parsing rule (``toist_core.tasks.resolve_task``) for the API, the CLI, the node's
parameter, topic and service: ids, names, free text, and what is refused."""

import pytest

from toist_core.tasks import QUOTE_LIMIT, TaskEntry, TaskVocabulary, names_task, quote, resolve_task


@pytest.mark.parametrize("request_, task_id, caption", [
    (2, 2, "sit comfortably on something"),
    ("2", 2, "sit comfortably on something"),
    (" 14 ", 14, "pound carpet with something"),
    ("+3", 3, "place flowers in something"),
    ("task_5", 5, "water plant with something"),
    ("Task 5", 5, "water plant with something"),
    ("task5", 5, "water plant with something"),
    ("task-5", 5, "water plant with something"),
    ("Sit  Comfortably on", 2, "sit comfortably on something"),
    ("open bottle of beer with something", 8, "open bottle of beer with something"),
    ("something to cut bread with", None, "something to cut bread with"),
    ("2 chairs to sit on", None, "2 chairs to sit on"),
])
def test_ids_names_and_free_text(request_, task_id, caption):
    query = resolve_task(request_)
    assert (query.task_id, query.caption) == (task_id, caption)


@pytest.mark.parametrize("request_", ["-1", "0", "15", "task_99", "+0", 0, 15, -1])
def test_an_integer_looking_task_is_an_id_and_must_be_valid(request_):
    """"-1" used to become free text (a caption the model answers confidently) while "0" was refused."""
    with pytest.raises(ValueError, match=r"1\.\.14"):
        resolve_task(request_)


@pytest.mark.parametrize("request_", ["3.0", "2e0", ".5", "-1.5", "task_3.0", "1E3"])
def test_a_number_that_is_not_an_integer_is_refused_not_free_text(request_):
    """A float-typed "3.0" from a robot is neither a caption nor rounded to a task."""
    with pytest.raises(ValueError, match=r"is a number but not a task id: ids are the integers 1\.\.14"):
        resolve_task(request_)


@pytest.mark.parametrize("request_, error", [("", ValueError), ("   ", ValueError), (True, TypeError),
                                             (2.0, TypeError), (None, TypeError)])
def test_unusable_requests(request_, error):
    with pytest.raises(error):
        resolve_task(request_)


@pytest.mark.parametrize("request_", ["\u200b", "\x00", " \u200b\u2060 "])
def test_invisible_text_is_empty_not_a_caption(request_):
    """A zero-width space or a NUL was taken as a free-text caption."""
    with pytest.raises(ValueError, match=r"^task text is empty \(only invisible characters"):
        resolve_task(request_)


def test_ids_of_thousands_of_digits_get_the_task_id_message():
    """int() of 4,301+ digits raised Python's own "Exceeds the limit (4300 digits)" message, and
    a valid id written with 5,000 leading zeros was refused with it."""
    with pytest.raises(ValueError, match=r"looks like a task id but .* has ids 1\.\.14"):
        resolve_task("1" * 5000)
    assert resolve_task("task_" + "0" * 5000 + "2").task_id == 2
    assert names_task("0" * 5000 + "2", 2, "sit comfortably on something")
    assert not names_task("1" * 5000, 2, "sit comfortably on something")


@pytest.mark.parametrize("text", ["2", "02", "Task_2", "task 2", "Sit Comfortably On", "SIT  comfortably on SOMETHING",
                                  " sit comfortably on something "])
def test_a_client_knows_the_names_of_a_task_as_the_node_resolves_them(text):
    """`client publish-task "Task_2"` waited for an active_task it took for another task and said
    "refused" though the node had taken it."""
    query = resolve_task(text)
    assert (query.task_id, query.caption) == (2, "sit comfortably on something")
    assert names_task(text, 2, query.caption)
    assert not names_task(text, 3, resolve_task(3).caption)
    assert not names_task("2", 0, "2 something")      # an id never names free text


def test_the_listed_caption_names_its_task_whatever_pronoun_the_model_reads():
    """With pronoun "it", "sit comfortably on something" (the caption the task tables list) was
    free text: no task id, no cluster-centre replacement, an untrained-task warning."""
    for text in ("sit comfortably on something", "Sit comfortably on IT", "sit comfortably on"):
        query = resolve_task(text, pronoun="it")
        assert (query.task_id, query.caption) == (2, "sit comfortably on it")
        assert names_task(text, 2, query.caption)
    assert not names_task("sit comfortably on something", 0, "sit comfortably on it")   # free text stays itself
    assert resolve_task("sit comfortably on that", pronoun="it").task_id is None
    # A task with its own pronoun: the client's reading and the node's agree.
    own = TaskVocabulary([TaskEntry(1, "cut with", "it"), TaskEntry(2, "sit on")], name="own")
    for text in ("cut with something", "cut with it", "cut with"):
        query = resolve_task(text, "that", vocabulary=own)
        assert (query.task_id, query.caption) == (1, "cut with it")
        assert names_task(text, 1, query.caption)


def test_numpy_integers_are_ids():
    import numpy as np

    assert resolve_task(np.int64(3)) == resolve_task(3)
    with pytest.raises(ValueError, match="has ids 1..14"):
        resolve_task(np.int32(15))


def test_errors_quote_at_most_80_characters():
    assert quote("short") == "'short'"
    long_text = "9" * 2000
    text = quote(long_text)
    assert text.startswith("'" + "9" * QUOTE_LIMIT + "'") and text.endswith("... (2000 characters)")
    assert len(text) < QUOTE_LIMIT + 40
    with pytest.raises(ValueError) as info:
        resolve_task(long_text)  # integer-looking: an id, and out of range
    assert len(str(info.value)) < 200


def test_a_pronoun_with_spaces_around_it_is_refused_where_a_vocabulary_is_taken_up():
    """Kept in every caption of the task as tokens of their own; a model's recorded vocabulary
    is read as it is (a model trained on it still serves its ids)."""
    recorded = TaskVocabulary.from_data({"tasks": [{"id": 1, "phrase": "step on", "pronoun": "them "}]})
    assert recorded.pronoun_of(1) == "them "
    assert recorded.request_problem() == "task vocabulary: task 1: pronoun 'them ': expected a word without " \
                                         "spaces or newlines around it"
    assert TaskVocabulary.from_data({"tasks": [{"id": 1, "phrase": "step on", "pronoun": "those ones"}]}) \
        .request_problem() == ""
