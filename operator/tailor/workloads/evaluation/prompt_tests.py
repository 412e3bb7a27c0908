"""A PromptProfile revision's test cases, run against a ModelDeployment (a Job per revision).

Each case's input goes through the revision itself: the request carries the revision as
``tailor.promptProfile`` and the case's variables, so the deployment answers exactly as it
would serve that revision (system text, few-shot turns, template, retrieval, parameters,
response format) before any ModelDeployment is switched to it; requests go through
:class:`~tailor.workloads.evaluation.chat.ChatClient` (retried on connection errors, 408,
429 and 5xx), and a case whose request fails for good fails with ``request failed: ...``.
The answer is checked by the case's matcher, on the text as written
(:mod:`tailor.workloads.evaluation.matchers`): ``equals`` (the whole answer, spaces at the
ends ignored), ``contains`` (a substring, case-sensitive), ``regex`` (Python ``re.search``,
no flags), ``jsonSchema`` (the answer parses as JSON and validates), ``apibench`` (the
answer's API call, scored by APIBench's AST matcher against the packaged corpus as the
RAFT paper scores it: ``correct`` when it calls a corpus API of the gold API's domain,
``exact`` when it calls the gold API). Results go to ``status.tests`` (per case, with the
answer's first 500 characters) and, last, to the termination message the operator reads.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

from tailor.api.promptprofile import (
    APIBenchExpectation,
    Expectation,
    PromptTestCase,
    render_profile_data,
)
from tailor.api.workloads import TEST_KEY_HEADER, PromptTestRun
from tailor.workloads.evaluation.apibench import find_calls
from tailor.workloads.evaluation.chat import ChatClient, ChatError
from tailor.workloads.evaluation.matchers import (
    contains_exact,
    equals_stripped,
    json_schema_failure,
    regex_case_sensitive,
)
from tailor.workloads.evaluation.scoring import corpus
from tailor.workloads.io.sources import read_secret
from tailor.workloads.program import run_main, write_termination_message
from tailor.workloads.progress import make_reporter

log = logging.getLogger("tailor.workloads.evaluation.prompt_tests")

ANSWER_CHARS = 500


def check(expect: Expectation, answer: str) -> str:
    """Why ``answer`` fails ``expect``; empty when it passes (matchers on the text as written)."""
    if expect.equals is not None:
        passed = equals_stripped(answer, expect.equals)
        return "" if passed else f"not equal to {expect.equals!r}"
    if expect.contains is not None:
        passed = contains_exact(answer, expect.contains)
        return "" if passed else f"does not contain {expect.contains!r}"
    if expect.regex is not None:
        try:
            found = regex_case_sensitive(answer, expect.regex)
        except re.error as exc:
            return f"regex {expect.regex!r} does not compile: {exc}"
        return "" if found else f"does not match {expect.regex!r}"
    if expect.apibench is not None:
        return apibench_failure(expect.apibench, answer)
    assert expect.json_schema is not None
    return json_schema_failure(answer, expect.json_schema)


def apibench_failure(expect: APIBenchExpectation, answer: str) -> str:
    """Why ``answer`` fails an apibench expectation (Gorilla's AST matcher); empty: passes."""
    apis = corpus(expect.corpus)
    gold = apis.match(find_calls(expect.api_call))
    if gold is None:
        return (
            f"apibench.apiCall {expect.api_call!r} is not an API of the {expect.corpus} "
            "corpus; copy the api_call of one of its cards"
        )
    verdict = apis.score(answer, expect.api_call, gold.domain)
    if verdict.hallucination:
        return f"calls no API of the {expect.corpus} corpus (a hallucination)"
    if not verdict.correct:
        return f"calls {verdict.matched}, an API outside the gold domain {gold.domain!r}"
    if expect.require == "exact" and not verdict.exact:
        return f"calls {verdict.matched}, not the gold API {gold.name or gold.call.text}"
    return ""


def ask(run: PromptTestRun, case: PromptTestCase, client: ChatClient) -> str:
    """The deployment's answer to one case under the revision."""
    variables = dict(case.input)
    question = variables.pop("question", "")
    return client.chat(
        [{"role": "user", "content": question}],
        model=run.target.model,
        tailor={"promptProfile": render_profile_data(run.spec), "variables": variables},
    )


def run_cases(run: PromptTestRun) -> dict[str, Any]:
    """Every case, in order; the ``status.tests`` patch."""
    assert run.spec.tests is not None
    api_key = None
    if run.api_key_secret_ref is not None:
        api_key = read_secret(run.api_key_secret_ref, run.paths)
    headers = {}
    if run.test_key_secret_ref is not None:  # the server takes a profile from no one else
        headers[TEST_KEY_HEADER] = read_secret(run.test_key_secret_ref, run.paths)
    results: list[dict[str, Any]] = []
    with ChatClient(run.target.base_url, api_key=api_key, headers=headers, timeout=300) as client:
        for case in run.spec.tests.cases:
            try:
                answer = ask(run, case, client)
                message = check(case.expect, answer)
            except ChatError as exc:
                answer, message = "", f"request failed: {exc}"
            results.append(
                {
                    "name": case.name,
                    "passed": not message,
                    "answer": answer[:ANSWER_CHARS],
                    "message": message,
                }
            )
            log.info("case %s: %s", case.name, message or "passed")
    passed = sum(1 for r in results if r["passed"])
    return {
        "tests": {
            "revision": run.revision,
            "casesHash": run.cases_hash,
            "passed": passed,
            "failed": len(results) - passed,
            "summary": f"{passed}/{len(results)}",
            "lastRun": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cases": results,
        }
    }


def work(run: PromptTestRun) -> None:
    patch = run_cases(run)
    make_reporter(run.reporter, run.owner).report(patch, final=True)
    tests = patch["tests"]
    failing = [c["name"] for c in tests["cases"] if not c["passed"]]
    summary = {k: tests[k] for k in ("revision", "casesHash", "passed", "failed", "summary")}
    write_termination_message(
        "TestsRun",
        f"revision {run.revision}: {tests['summary']} passed"
        + (f"; failing: {', '.join(failing)}" if failing else ""),
        tests={**summary, "failing": failing},
    )


def main(argv: list[str] | None = None) -> int:
    return run_main(PromptTestRun, work, argv)


if __name__ == "__main__":
    sys.exit(main())
