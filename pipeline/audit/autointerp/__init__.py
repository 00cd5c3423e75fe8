"""Automated interpretability for the audit stage (audit/task=autointerp): explain features with an LLM
behind any OpenAI-compatible endpoint and score the explanations on held-out contexts.

    config.py   AutointerpConfig (the task's Config: AuditConfig.task, `task.*` overrides)
    client.py   Endpoint: the openai client plus an on-disk answer cache; starts the loopback server
    scorers.py  explainer and judge prompts; detection, fuzzing, simulation, surprisal, embedding
    run.py      feature sampling (stratified by density), contexts, the audit.json section
    report.py   the audit.html section

The loopback server (python -m pipeline.audit.server) lives in pipeline/audit/server.py."""

from pipeline.audit.autointerp.config import AutointerpConfig

__all__ = ["AutointerpConfig"]
