"""PromptProfile: a versioned prompt (system text, few-shot turns, a template with variables
and generation parameters), the first rung of the customization ladder.

The operator publishes every revision as an immutable ConfigMap; a ModelDeployment that
references the profile serves the newest one.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from tailor.api.base import Rule, TailorModel, cel_exactly_one, exactly_one
from tailor.api.common import ConfigMapKey, FreeForm, LocalObjectRef, Name, StatusBase


class FewShotExample(TailorModel):
    """One demonstration turn: what the user says and what the assistant answers."""

    user: str = Field(min_length=1, max_length=16384, description="The user's message.")
    assistant: str = Field(min_length=1, max_length=16384, description="The ideal answer.")


POOL_MAX = 500
"""Most examples in a few-shot pool."""


class FewShotSelection(TailorModel):
    """Few-shot turns chosen per question from a pool, after the static ``fewShot`` ones."""

    select: Literal["static", "similar"] = Field(
        default="similar",
        description="similar: the k pool examples whose user turn is nearest to the question "
        "(cosine of the embedding model's vectors: the knowledge base's when the deployment "
        "has one, else the builtin MiniLM), nearest last; static: the first k of the pool.",
    )
    k: int = Field(default=3, ge=1, le=10, description="Examples per question.")
    pool: list[FewShotExample] | None = Field(
        default=None,
        min_length=1,
        max_length=POOL_MAX,
        description="The examples to choose from, inline (or poolFrom).",
    )
    pool_from: ConfigMapKey | None = Field(
        default=None,
        description="The examples from a ConfigMap key in the profile's namespace: JSON "
        "lines (or one JSON list) of {user, assistant}, {prompt, completion} or chat "
        "records {messages: [...]} (their last user and assistant turns). The operator "
        "reads it when it syncs the profile (on every change of the profile and every "
        "resync) and publishes its examples inside the revision, so a changed ConfigMap "
        "is a new revision and a rollback restores the old pool.",
    )

    rules = (
        Rule(
            cel="has(self.pool) != has(self.poolFrom)",
            message="set exactly one of pool or poolFrom",
            check=lambda m: (m.pool is None) != (m.pool_from is None),
        ),
        Rule(
            cel="!has(self.pool) || self.k <= size(self.pool)",
            message="k is larger than the pool; lower k or add examples",
            field="k",
            check=lambda m: m.pool is None or m.k <= len(m.pool),
        ),
        Rule(
            cel="!has(self.poolFrom) || has(self.poolFrom.key)",
            message="poolFrom needs the key holding the examples",
            field="poolFrom.key",
            check=lambda m: m.pool_from is None or bool(m.pool_from.key),
        ),
    )


class GenerationParameters(TailorModel):
    """Default generation parameters; a request may override them (OpenAI names)."""

    temperature: float = Field(default=0.2, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(default=0.95, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=256, ge=1, le=32768, description="Most tokens to generate.")
    stop: list[str] = Field(
        default_factory=list, max_length=4, description="Up to 4 stop sequences."
    )
    seed: int | None = Field(default=None, ge=0, description="Seed for reproducible sampling.")


class ResponseFormat(TailorModel):
    """The shape answers must take, enforced by constrained decoding in the serving engine
    (a request's own OpenAI ``response_format`` replaces it)."""

    type: Literal["text", "json_object", "json_schema"] = Field(
        default="text",
        description="text (free), json_object (any JSON object) or json_schema (answers "
        "that validate against schema).",
    )
    schema_: FreeForm | None = Field(
        default=None,
        alias="schema",
        description="The JSON Schema answers must satisfy (type json_schema only); checked "
        "against its metaschema when the profile is applied.",
    )

    rules = (
        Rule(
            cel="(self.type == 'json_schema') == has(self.schema)",
            message="schema is required when type is json_schema, and only then",
            field="schema",
            check=lambda m: (m.type == "json_schema") == (m.schema_ is not None),
        ),
    )

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_json_schema(value)
        return value


def check_json_schema(schema: dict[str, Any]) -> None:
    """ValueError naming where ``schema`` breaks its JSON Schema metaschema, if it does."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise ValueError(
            f"not a valid JSON Schema at {where}: {exc.message}; fix the schema"
        ) from exc


API_CALL = r"^\s*[A-Za-z_][\w.]*\s*\([\s\S]*\)\s*$"
"""One function call (RE2 and Python alike)."""


class APIBenchExpectation(TailorModel):
    """An answer that must be one API call, scored as the RAFT paper scores APIBench
    (Gorilla's AST matcher) against a corpus shipped with Tailor."""

    corpus: Literal["torchhub", "huggingface"] = Field(
        default="torchhub",
        description="The API corpus: APIBench's Torch Hub (94 cards) or HuggingFace (936).",
    )
    api_call: str = Field(
        min_length=3,
        max_length=4096,
        description="The gold call as the corpus writes it, e.g. torch.hub.load("
        "repo_or_dir='pytorch/vision', model='resnet50', pretrained=True).",
    )
    require: Literal["correct", "exact"] = Field(
        default="correct",
        description="correct: the paper's accuracy (the answer calls an API of the corpus, "
        "in the gold API's domain); exact: the answer calls the gold API itself (function "
        "and identifying arguments).",
    )

    # Not ast: some corpus calls are not valid Python (a positional after a keyword), and
    # Gorilla's matcher reads them anyway.
    rules = (
        Rule(
            cel="self.apiCall.matches('{}')".format(API_CALL.replace("\\", "\\\\")),
            message="apiCall is not a function call; write one call, e.g. f(a, b=1)",
            field="apiCall",
            check=lambda m: re.match(API_CALL, m.api_call) is not None,
        ),
    )


class Expectation(TailorModel):
    """What a test case's answer must satisfy: exactly one matcher."""

    contains: str | None = Field(default=None, max_length=4096, description="A substring.")
    regex: str | None = Field(
        default=None,
        max_length=4096,
        description="A regular expression (Python re) searched for in the answer.",
    )
    equals: str | None = Field(
        default=None,
        max_length=16384,
        description="The whole answer (whitespace at the ends ignored).",
    )
    json_schema: FreeForm | None = Field(
        default=None, description="A JSON schema the answer (parsed as JSON) must satisfy."
    )
    apibench: APIBenchExpectation | None = Field(
        default=None,
        description="An API call scored by APIBench's AST matcher (the RAFT paper's metric).",
    )

    rules = (
        Rule(
            cel=cel_exactly_one("contains", "regex", "equals", "jsonSchema", "apibench"),
            message="set exactly one of contains, regex, equals, jsonSchema or apibench",
            check=lambda m: exactly_one(
                m, "contains", "regex", "equals", "json_schema", "apibench"
            ),
        ),
    )


class PromptTestCase(TailorModel):
    """One systematic prompt test: template variables in, expectation out."""

    name: str = Field(min_length=1, max_length=63, description="Name shown in results.")
    input: dict[str, str] = Field(description="Template variables, e.g. {question: ...}.")
    expect: Expectation = Field(description="What the answer must satisfy.")


class PromptTests(TailorModel):
    """Test cases run, as a Job, against a ModelDeployment for every new revision (and
    again when the cases change): each case's input goes through the revision itself (its
    system text, few-shot turns, template, parameters and response format) on that
    deployment, and its answer is checked by the case's matcher."""

    deployment_ref: LocalObjectRef = Field(description="The ModelDeployment to test against.")
    adapter: str | None = Field(
        default=None,
        max_length=63,
        description="One of that deployment's adapters to answer with; unset: its base model.",
    )
    gate: bool = Field(
        default=False,
        description="Serve only revisions whose cases all pass: a revision that fails keeps "
        "ModelDeployments on the newest one that passed, and the TestsPassed condition names "
        "its failing cases.",
    )
    cases: list[PromptTestCase] = Field(min_length=1, max_length=100, description="The test cases.")


class ProfileRevisionRef(TailorModel):
    """A PromptProfile of this namespace and one of its revisions."""

    name: Name = Field(description="The PromptProfile.")
    revision: int | None = Field(
        default=None,
        ge=1,
        description="A revision in its status.history (unset: the one it serves).",
    )


class PromptProfileSpec(TailorModel):
    """A versioned prompt: system text, few-shot examples, template and parameters."""

    system: str = Field(default="", max_length=32768, description="The system message.")
    template: str = Field(
        default="{{ question }}",
        min_length=1,
        max_length=65536,
        description=(
            "Sandboxed Jinja2 template of the user turn. Variables: question, context "
            "(retrieved documents, when RAG is on) and anything in variables."
        ),
    )
    few_shot: list[FewShotExample] = Field(
        default_factory=list, max_length=10, description="0-10 demonstration turns."
    )
    few_shot_selection: FewShotSelection | None = Field(
        default=None,
        description="More demonstration turns, chosen per question from a pool (similar) "
        "or its first k (static), sent after fewShot.",
    )
    variables: dict[str, str] = Field(
        default_factory=dict, description="Default template variables, overridable per request."
    )
    parameters: GenerationParameters = Field(
        default_factory=GenerationParameters, description="Default generation parameters."
    )
    response_format: ResponseFormat | None = Field(
        default=None, description="Constrain answers to text, any JSON object or a JSON schema."
    )
    tests: PromptTests | None = Field(
        default=None, description="Test cases for every revision (not part of the revision)."
    )
    revision_pin: int | None = Field(
        default=None,
        ge=1,
        description="Serve this revision from status.history instead of the newest: a "
        "rollback without editing the text back (not part of the revision). Remove it to "
        "serve the newest again.",
    )


REVISION_EXCLUDES = {"tests", "revision_pin"}
"""Fields of the spec that are not part of a revision's content (changing them publishes
no new revision)."""


class Revision(TailorModel):
    """One published revision of a profile."""

    revision: int = Field(description="Revision number, counting from 1.")
    hash: str = Field(description="sha256 of the rendered profile.")
    config_map: str = Field(description="The immutable ConfigMap holding it.")
    time: str = Field(description="When it was published.")


class PromptCaseResult(TailorModel):
    """One test case's outcome."""

    name: str = Field(description="The case.")
    passed: bool = Field(description="Whether the answer satisfied the matcher.")
    answer: str = Field(default="", description="The answer (first 500 characters).")
    message: str = Field(default="", description="Why it failed (or an error).")


class PromptTestResults(TailorModel):
    """Outcome of the test run of one revision."""

    revision: int | None = Field(default=None, description="The revision tested.")
    cases_hash: str | None = Field(default=None, description="Hash of the cases run.")
    passed: int = Field(default=0, description="Cases that passed.")
    failed: int = Field(default=0, description="Cases that failed.")
    summary: str | None = Field(default=None, description="PASS/TOTAL, e.g. 3/4.")
    last_run: str | None = Field(default=None, description="When the tests last ran.")
    cases: list[PromptCaseResult] = Field(default_factory=list, description="Per case.")


class ServedRevision(TailorModel):
    """The revision ModelDeployments serve."""

    revision: int = Field(description="Revision number.")
    config_map: str = Field(description="Its ConfigMap.")
    reason: Literal["Newest", "Pinned", "LastPassed"] = Field(
        description="Newest; Pinned (spec.revisionPin); LastPassed (tests.gate: the newest "
        "revision that passed)."
    )


class PromptProfileStatus(StatusBase):
    """Observed state of a PromptProfile."""

    phase: Literal["Valid", "Invalid"] | None = Field(default=None, description="Valid or Invalid.")
    revision: int | None = Field(default=None, description="The current revision.")
    hash: str | None = Field(default=None, description="sha256 of the current revision.")
    config_map: str | None = Field(default=None, description="ConfigMap of the current revision.")
    history: list[Revision] = Field(default_factory=list, description="The last 10 revisions.")
    tests: PromptTestResults | None = Field(default=None, description="Last test results.")
    served: ServedRevision | None = Field(
        default=None, description="What ModelDeployments that use the profile serve."
    )
    last_passed: int | None = Field(
        default=None, description="The newest revision whose tests all passed."
    )
    last_handled_reconcile_at: str | None = Field(
        default=None,
        description="The last tailor.dev/reconcile-requested-at annotation handled (set by "
        "tailor prompt refresh: read fewShotSelection.poolFrom again now).",
    )


def render_profile_data(spec: PromptProfileSpec) -> dict[str, Any]:
    """The profile as a serving workload reads it (the published ConfigMap's content): the
    revision's content, without its tests and pin."""
    data: dict[str, Any] = spec.model_dump(
        mode="json", by_alias=True, exclude_none=True, exclude=REVISION_EXCLUDES
    )
    return data
