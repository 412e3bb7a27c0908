"""PromptProfile rendering as the server applies it (tailor.workloads.serving.prompting): pure
functions, no model. The serving tests check the same profile through HTTP."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tailor.api.promptprofile import PromptProfileSpec, render_profile_data
from tailor.workloads.serving.prompting import (
    DEFAULT_CONTEXT_INTRO,
    Message,
    ProfileFile,
    PromptError,
    build_messages,
    merge_parameters,
    parse_profile,
    render_template,
    render_user_turn,
    template_variables,
)


@dataclass(frozen=True)
class Doc:
    text: str
    title: str | None = None
    source: str | None = None
    score: float = 0.5


def profile(**fields: object) -> PromptProfileSpec:
    return PromptProfileSpec.model_validate(fields)


def test_messages_have_system_few_shot_history_and_rendered_last_turn() -> None:
    spec = profile(
        system="You are {{ company }}'s agent.",
        template="[{{ company }}] {{ question }}",
        fewShot=[{"user": "hi", "assistant": "Hello!"}],
        variables={"company": "ACME"},
    )
    conversation = [
        Message("system", "Be brief."),
        Message("user", "first question"),
        Message("assistant", "first answer"),
        Message("user", "second question"),
    ]
    out = build_messages(spec, conversation, variables={"company": "Initech"})
    assert [m.role for m in out] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert out[0].content == "You are Initech's agent.\n\nBe brief."
    assert (out[1].content, out[2].content) == ("hi", "Hello!")
    assert out[3].content == "first question"  # earlier turns are not templated
    assert out[5].content == "[Initech] second question"


def test_without_profile_the_conversation_is_unchanged() -> None:
    conversation = [Message("user", "hello")]
    assert build_messages(None, conversation) == conversation


def test_template_reads_context_and_documents() -> None:
    spec = profile(template="Docs:\n{{ context }}\nQ: {{ question }}")
    docs = [Doc("alpha text", "Alpha", "a.md"), Doc("beta text")]
    turn = render_user_turn(spec, "what?", docs)
    assert turn == "Docs:\n[1] Alpha - a.md\nalpha text\n\n[2] beta text\nQ: what?"
    spec = profile(template="{% for d in documents %}<{{ d.title }}>{% endfor %} {{ question }}")
    assert render_user_turn(spec, "q", docs) == "<Alpha><None> q"


def test_default_context_block_when_the_template_has_no_context() -> None:
    turn = render_user_turn(profile(), "What is slow_r50?", [Doc("3D ResNet video model")])
    assert turn.startswith(DEFAULT_CONTEXT_INTRO)
    assert "[1] 3D ResNet video model" in turn
    assert turn.endswith("Question: What is slow_r50?")
    assert render_user_turn(profile(), "plain", []) == "plain"


def test_undefined_variable_is_an_error_naming_it() -> None:
    with pytest.raises(PromptError, match="product"):
        render_user_turn(profile(template="{{ product }}: {{ question }}"), "q")


@pytest.mark.parametrize(
    "template",
    [
        "{{ question.__class__.__mro__ }}",
        "{{ ''.__class__.__subclasses__() }}",
        "{{ 'x' * 100000000 }}",
        "{{ 10 ** 1000 }}",
        "{% set _ = variables.update({}) %}",
    ],
)
def test_sandbox_refuses_unsafe_templates(template: str) -> None:
    with pytest.raises(PromptError):
        render_template(template, {"question": "q", "variables": {}})


def test_variables_are_data_not_templates() -> None:
    spec = profile(template="{{ name }}: {{ question }}")
    assert render_user_turn(spec, "{{ 7 * 7 }}", variables={"name": "{{ 6 * 6 }}"}) == (
        "{{ 6 * 6 }}: {{ 7 * 7 }}"
    )


def test_template_variables_and_syntax_errors() -> None:
    assert template_variables("{{ context }} {{ question }} {{ x }}") == {
        "context",
        "question",
        "x",
    }
    with pytest.raises(PromptError, match="does not parse"):
        template_variables("{{ unclosed")


def test_request_parameters_override_profile_defaults() -> None:
    spec = profile(parameters={"temperature": 0.7, "maxTokens": 33, "stop": ["###"]})
    merged = merge_parameters(spec, {"temperature": 0.0, "max_tokens": None, "seed": 5})
    assert (merged.temperature, merged.max_tokens, merged.stop, merged.seed) == (
        0.0,
        33,
        ["###"],
        5,
    )


def test_parse_profile_names_the_bad_field() -> None:
    with pytest.raises(PromptError, match=r"promptProfile\.parameters\.temperature"):
        parse_profile(json.dumps({"parameters": {"temperature": 9}}))
    with pytest.raises(PromptError, match="does not parse"):
        parse_profile(json.dumps({"template": "{% if %}"}))


def test_profile_file_reloads_on_change_and_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    reloads: list[bool] = []
    watched = ProfileFile(path, reloads.append)
    assert watched.get() is None  # not mounted yet

    def write(data: str) -> None:
        tmp = tmp_path / "new"
        tmp.write_text(data)
        os.replace(tmp, path)  # what a ConfigMap update does: a new inode

    write(json.dumps(render_profile_data(profile(system="one"))))
    first = watched.get()
    assert first is not None and first.system == "one"
    assert watched.get() is first  # unchanged file: not re-read
    write(json.dumps(render_profile_data(profile(system="two"))))
    second = watched.get()
    assert second is not None and second.system == "two"
    write("{not json")
    assert watched.get() is second and watched.error
    assert reloads == [True, True, False]


POOL = [
    {"user": "Classify this photo of a dog into an ImageNet class.", "assistant": "resnet50"},
    {"user": "Translate this English sentence into German.", "assistant": "opus-mt-en-de"},
    {"user": "Detect the pedestrians and cars in this street image.", "assistant": "yolov5s"},
    {"user": "Transcribe this recording of a meeting to text.", "assistant": "whisper-small"},
    {"user": "Summarise this long news article in three sentences.", "assistant": "bart-cnn"},
]


@pytest.mark.workloads
def test_similar_few_shot_picks_the_examples_nearest_to_the_question(tmp_path: Path) -> None:
    """With the builtin MiniLM: each question gets the pool examples about its own task,
    the nearest last (next to the question); static takes the pool's first k; and the
    chosen turns come after the static fewShot ones."""
    from tailor.api.knowledgebase import Embedding
    from tailor.api.promptprofile import FewShotSelection
    from tailor.api.workloads import Paths
    from tailor.workloads.knowledge.retriever import load_embedder
    from tailor.workloads.serving.prompting import select_examples

    embedder = load_embedder(Embedding(), Paths(artifacts=str(tmp_path)))
    similar = FewShotSelection.model_validate({"select": "similar", "k": 2, "pool": POOL})
    picks = {
        question: [e.assistant for e in select_examples(similar, question, embedder.embed_queries)]
        for question in (
            "Which model turns speech audio into a transcript?",
            "I need to find every car in a traffic camera frame.",
            "Render this French paragraph in English.",
        )
    }
    assert [p[-1] for p in picks.values()] == ["whisper-small", "yolov5s", "opus-mt-en-de"]
    assert all(len(p) == 2 and len(set(p)) == 2 for p in picks.values())
    static = similar.model_copy(update={"select": "static"})
    assert [e.assistant for e in select_examples(static, "anything", embedder.embed_queries)] == [
        "resnet50",
        "opus-mt-en-de",
    ]
    spec = profile(fewShot=[{"user": "Hello", "assistant": "Hi!"}], fewShotSelection=similar.wire())
    chosen = select_examples(similar, "Transcribe a podcast.", embedder.embed_queries)
    messages = build_messages(spec, [Message("user", "Transcribe a podcast.")], examples=chosen)
    assert [m.content for m in messages[:2]] == ["Hello", "Hi!"]
    assert (
        messages[-2].content == "whisper-small" and messages[-1].content == "Transcribe a podcast."
    )
    with pytest.raises(ValueError, match="k is larger than the pool"):
        FewShotSelection.model_validate({"k": 6, "pool": POOL})
