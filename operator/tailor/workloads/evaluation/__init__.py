"""Scoring: APIBench's AST metric, the prompt-test program
(``python -m tailor.workloads.evaluation.prompt_tests``), matchers and the chat client."""
