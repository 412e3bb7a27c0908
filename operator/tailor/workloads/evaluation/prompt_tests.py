"""A PromptProfile revision's test cases, run against a ModelDeployment (a Job per revision).

Each case's input goes through the revision itself: the request carries the revision as
``tailor.promptProfile`` and the case's variables, so the deployment answers exactly as it
would serve that revision (system text, few-shot turns, template, retrieval, parameters,
response format) before any ModelDeployment is switched to it. The answer is checked by
the case's matcher: ``equals`` (the whole answer, spaces at the ends ignored), ``contains``
(a substring), ``regex`` (Python ``re.search``), ``jsonSchema`` (the answer parses as JSON
and validates), ``apibench`` (the answer's API call, scored by APIBench's AST matcher against
the packaged corpus as the RAFT paper scores it: ``correct`` when it calls a corpus API of
the gold API's domain, ``exact`` when it calls the gold API). Results go to
``status.tests`` (per case, with the answer's first 500 characters) and, last, to the
termination message the operator reads.
"""

from __future__ import annotations

import functools
import json
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
from tailor.api.workloads import PromptTestRun
from tailor.data import apibench_dir
from tailor.workloads.evaluation.apibench import Corpus, find_calls
from tailor.workloads.io.sources import read_secret
from tailor.workloads.program import run_main, write_termination_message
from tailor.workloads.progress import make_reporter

log = logging.getLogger("tailor.workloads.evaluation.prompt_tests")

ANSWER_CHARS = 500


def check(expect: Expectation, answer: str) -> str:
    """Why ``answer`` fails ``expect``; empty when it passes."""
    if expect.equals is not None:
        return "" if answer.strip() == expect.equals.strip() else f"not equal to {expect.equals!r}"
    if expect.contains is not None:
        return "" if expect.contains in answer else f"does not contain {expect.contains!r}"
    if expect.regex is not None:
        try:
            found = re.search(expect.regex, answer) is not None
        except re.error as exc:
            return f"regex {expect.regex!r} does not compile: {exc}"
        return "" if found else f"does not match {expect.regex!r}"
    if expect.apibench is not None:
        return apibench_failure(expect.apibench, answer)
    assert expect.json_schema is not None
    import jsonschema

    try:
        jsonschema.validate(json.loads(answer), expect.json_schema)
    except ValueError as exc:
        return f"not JSON: {exc}"
    except jsonschema.ValidationError as exc:
        return f"does not validate: {exc.message}"
    return ""


@functools.cache
def corpus(name: str) -> Corpus:
    """A packaged APIBench corpus, loaded once."""
    return Corpus.load(apibench_dir() / f"{name}_api.jsonl")


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


def ask(run: PromptTestRun, case: PromptTestCase, http: Any, headers: dict[str, str]) -> str:
    """The deployment's answer to one case under the revision (retried on 429 and 5xx)."""
    variables = dict(case.input)
    question = variables.pop("question", "")
    body = {
        "model": run.target.model,
        "messages": [{"role": "user", "content": question}],
        "tailor": {"promptProfile": render_profile_data(run.spec), "variables": variables},
    }
    error = ""
    for attempt in range(4):
        response = http.post("/chat/completions", json=body, headers=headers)
        if response.status_code < 400:
            return str(response.json()["choices"][0]["message"]["content"] or "")
        error = f"HTTP {response.status_code}: {response.text[:300]}"
        if response.status_code not in (408, 429) and response.status_code < 500:
            break
        time.sleep(2**attempt)
    raise RuntimeError(error)


def run_cases(run: PromptTestRun) -> dict[str, Any]:
    """Every case, in order; the ``status.tests`` patch."""
    import httpx

    assert run.spec.tests is not None
    headers = {}
    if run.api_key_secret_ref is not None:
        headers["Authorization"] = f"Bearer {read_secret(run.api_key_secret_ref, run.paths)}"
    results: list[dict[str, Any]] = []
    base_url = run.target.base_url.rstrip("/")  # an in-cluster ModelDeployment: no proxy
    with httpx.Client(base_url=base_url, timeout=300, trust_env=False) as http:
        for case in run.spec.tests.cases:
            try:
                answer = ask(run, case, http, headers)
                message = check(case.expect, answer)
            except (RuntimeError, httpx.HTTPError) as exc:
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
