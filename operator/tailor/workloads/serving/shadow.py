"""Shadow traffic of a rollout (``spec.rollout.mode: shadow``): the candidate answers a copy
of a request the stable answered, in the background, never shown to the user; with
``analysis.judge`` the gateway then asks the judge, on its own engine, which answer is
better, in both orders (a judge preferring whatever comes first gives a tie, not a win),
with an enforced JSON answer. Copies are skipped, and counted, when the engine is busy or
enough shadow work is in flight already: users come first."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tailor.api.rollout import ShadowJudge
from tailor.workloads.serving.engine.base import SamplingParams, TokenEngine
from tailor.workloads.serving.rollout import Rollouts, Route

log = logging.getLogger("tailor.workloads.serving.shadow")


class ShadowTraffic:
    """Copies of requests for a rollout's candidate, at most ``most`` in flight."""

    def __init__(self, rollouts: Rollouts, most: int):
        self.rollouts, self.most = rollouts, most
        self.inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()  # referenced until done

    def copy(
        self,
        engine: TokenEngine,
        route: Route,
        prompt_ids: list[int],
        params: SamplingParams,
        question: str | None,
        stable_answer: str,
        judge: ShadowJudge | None,
    ) -> None:
        """Have the candidate answer ``prompt_ids`` in the background (then the judge)."""
        if engine.full() or self.inflight >= self.most:
            self.rollouts.skipped()
            return
        self.inflight += 1
        work = self._answer(engine, route, prompt_ids, params, question, stable_answer, judge)
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(
        self,
        engine: TokenEngine,
        route: Route,
        prompt_ids: list[int],
        params: SamplingParams,
        question: str | None,
        stable_answer: str,
        judge: ShadowJudge | None,
    ) -> None:
        started = time.perf_counter()
        try:
            text, finish, tokens = await generate(engine, prompt_ids, route.shadow_adapter, params)
            ok = finish != "error"
            seconds = time.perf_counter() - started
            self.rollouts.answered(route, "candidate", ok, seconds, len(prompt_ids) + tokens)
            if ok and judge is not None and question:
                score = await self.judge(engine, judge, question, text, stable_answer)
                if score is not None:
                    self.rollouts.judged(route, score)
        except Exception as exc:  # a shadow failure is the candidate's, never the user's
            log.warning("shadow request failed: %s", exc)
            self.rollouts.answered(route, "candidate", False, time.perf_counter() - started, 0)
        finally:
            self.inflight -= 1

    @staticmethod
    async def judge(
        engine: TokenEngine, judge: ShadowJudge, question: str, candidate: str, stable: str
    ) -> float | None:
        """The judge's score of the candidate's answer against the stable's (1 won, 0 lost,
        a half otherwise), None when a reply is not the JSON asked for."""
        from tailor.workloads.evaluation.judge import (
            COMPARE,
            compare_messages,
            parse,
            preference,
            response_format,
        )
        from tailor.workloads.evaluation.scoring import Item
        from tailor.workloads.serving.engine.grammar import format_key

        schema = response_format("compare", COMPARE)["json_schema"]["schema"]
        key = format_key("json_schema", schema)
        await asyncio.to_thread(engine.check_format, key)
        item = Item("shadow", question, None, None, None, "shadow")
        params = SamplingParams(max_tokens=16, temperature=0.0, response_format=key)
        choices = []
        for first, second in ((candidate, stable), (stable, candidate)):
            messages = compare_messages(judge.rubric, item, first, second)
            prompt = await asyncio.to_thread(engine.encode_chat, messages)
            text, finish, _ = await generate(engine, prompt, judge.adapter, params)
            choices.append(parse(text, COMPARE) if finish != "error" else None)
        return preference(choices[0], choices[1])


async def generate(
    engine: TokenEngine, prompt_ids: list[int], adapter: str | None, params: SamplingParams
) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of a generation the gateway asks for itself."""
    parts: list[Any] = []
    finish, tokens = "error", 0
    chunks = engine.stream(prompt_ids, adapter, params, incremental=False)
    try:
        async for chunk in chunks:
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                finish, tokens = chunk.finish_reason, chunk.completion_tokens
                break
    finally:
        await chunks.aclose()
    return "".join(parts), finish, tokens
