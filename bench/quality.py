"""Quality of a run against the unpruned run of the same framework, and against ground truth."""

import re

import numpy as np


def token_agreement(tokens: list[int], reference: list[int]) -> float:
    """Share of positions where both greedy outputs agree; a length mismatch counts as disagreement."""
    longest = max(len(tokens), len(reference))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(tokens, reference, strict=False)) / longest


def first_token_kl(logprobs: np.ndarray, reference: np.ndarray) -> float:
    """KL(reference || run) of the first-token distributions, in nats, over the shared vocabulary."""
    width = min(len(logprobs), len(reference))
    p_log = reference[:width].astype(np.float64)
    q_log = logprobs[:width].astype(np.float64)
    p_log, q_log = p_log - np.logaddexp.reduce(p_log), q_log - np.logaddexp.reduce(q_log)
    return float(np.sum(np.exp(p_log) * (p_log - q_log)))


def normalize_answer(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def answer_correct(text: str, answer: str) -> bool:
    """The generated text is the answer, or starts with it as a word (`"red."`, `"red shape"`)."""
    said, gold = normalize_answer(text), normalize_answer(answer)
    return said == gold or said.split(" ")[:1] == [gold]


def compare_runs(run: dict, reference: dict) -> dict:
    """Per-item quality of `run` against the unpruned `reference` run (same framework, same item)."""
    same_first = int(np.argmax(run["first_logprobs"])) == int(np.argmax(reference["first_logprobs"]))
    return {
        "exact_match": float(run["token_ids"] == reference["token_ids"]),
        "token_agreement": token_agreement(run["token_ids"], reference["token_ids"]),
        "top1_agreement": float(same_first),
        "kl_first_token": first_token_kl(run["first_logprobs"], reference["first_logprobs"]),
    }
