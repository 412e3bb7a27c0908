"""The named matchers: each sibling pair on a case where the two disagree, and the callers'
matcher names (PromptProfile's on the text as written, the gold matchers forgiving)
bound to the right ones."""

from __future__ import annotations

import re

import pytest

from tailor.api.promptprofile import Expectation
from tailor.workloads.evaluation.matchers import (
    Matcher,
    contains_exact,
    contains_normalised,
    equals_normalised,
    equals_stripped,
    json_schema_failure,
    normalise,
    regex_case_sensitive,
    regex_ignore_case,
)
from tailor.workloads.evaluation.prompt_tests import check
from tailor.workloads.evaluation.scoring import GOLD_MATCHERS, gold_matches


def test_normalise_lowers_case_and_drops_punctuation_and_articles() -> None:
    assert normalise("  The  Eiffel-Tower, a landmark! ") == "eiffeltower landmark"


@pytest.mark.parametrize(
    ("as_written", "forgiving", "answer", "expected", "matches_as_written", "matches_forgiving"),
    [
        # outer whitespace: both ignore it
        (equals_stripped, equals_normalised, "  Paris\n", "Paris", True, True),
        # case, article, punctuation
        (equals_stripped, equals_normalised, "The Eiffel Tower.", "eiffel tower", False, True),
        (equals_stripped, equals_normalised, "Paris", "Paris, France", False, False),
        (contains_exact, contains_normalised, "It is the Eiffel Tower.", "Eiffel Tower", True, True),
        (contains_exact, contains_normalised, "It is the Eiffel Tower.", "eiffel tower", False, True),
        # "eiffeltower" once normalised
        (contains_exact, contains_normalised, "It is the Eiffel-Tower.", "Eiffel Tower", False, False),
        (contains_exact, contains_normalised, "A value: 42.", "42!", False, True),
        # normalises to nothing: matches nothing
        (contains_exact, contains_normalised, "bathe", "the", True, False),
        (regex_case_sensitive, regex_ignore_case, "42 items", r"\b4[0-9]\b", True, True),
        (regex_case_sensitive, regex_ignore_case, "Status: OK", r"status: ok", False, True),
        # . matches a newline (DOTALL)
        (regex_case_sensitive, regex_ignore_case, "first\nsecond", r"first.second", False, True),
        (regex_case_sensitive, regex_ignore_case, "24 items", r"\b4[0-9]\b", False, False),
    ],
)  # fmt: skip
def test_each_matcher_beside_its_sibling(
    as_written: Matcher,
    forgiving: Matcher,
    answer: str,
    expected: str,
    matches_as_written: bool,
    matches_forgiving: bool,
) -> None:
    assert as_written(answer, expected) is matches_as_written
    assert forgiving(answer, expected) is matches_forgiving


def test_a_regex_that_does_not_compile_raises_for_the_caller_to_name() -> None:
    for matcher in (regex_case_sensitive, regex_ignore_case):
        with pytest.raises(re.error):
            matcher("answer", "(unclosed")


def test_json_schema_failure_says_why() -> None:
    schema = {"type": "object", "required": ["api_call"]}
    assert json_schema_failure('{"api_call": "x"}', schema) == ""
    assert json_schema_failure("api_call: x", schema).startswith("not JSON: ")
    assert (
        json_schema_failure("{}", schema) == "does not validate: 'api_call' is a required property"
    )


@pytest.mark.parametrize(
    ("expect", "answer", "failure"),
    [
        ({"equals": "Paris"}, " Paris\n", ""),
        ({"equals": "paris"}, "Paris", "not equal to 'paris'"),
        ({"contains": "Tower"}, "the Eiffel Tower", ""),
        ({"contains": "tower"}, "the Eiffel Tower", "does not contain 'tower'"),
        ({"regex": "^ok$"}, "ok", ""),
        ({"regex": "^ok$"}, "OK", "does not match '^ok$'"),
        ({"regex": "(ok"}, "ok", "regex '(ok' does not compile: "),
        ({"jsonSchema": {"type": "array"}}, "[1]", ""),
        ({"jsonSchema": {"type": "array"}}, "{}", "does not validate: {} is not of type 'array'"),
    ],
)  # fmt: skip
def test_prompt_profile_matchers_compare_the_text_as_written(
    expect: dict[str, object], answer: str, failure: str
) -> None:
    message = check(Expectation.model_validate(expect), answer)
    assert message.startswith(failure) and bool(message) is bool(failure)


def test_the_gold_matchers_are_the_forgiving_ones() -> None:
    """The Evaluation's and the RAFT evaluation's exact, contains and regex."""
    assert {
        "exact": equals_normalised,
        "contains": contains_normalised,
        "regex": regex_ignore_case,
    } == GOLD_MATCHERS
    # on the final answer (after ##Answer:), where the PromptProfile matchers would fail
    assert gold_matches("exact", "##Reason: ...\n##Answer: The Eiffel Tower.", "eiffel tower")
    assert gold_matches("contains", "##Answer: It is the Eiffel Tower", "the eiffel tower")
    assert gold_matches("regex", "##Answer: STATUS OK", r"status ok")
    assert not gold_matches("contains", "##Reason: Eiffel Tower\n##Answer: Louvre", "Eiffel Tower")
