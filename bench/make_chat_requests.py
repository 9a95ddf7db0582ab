"""Generate bench/data/chat_requests.json: the fixed, seeded synthetic chat requests of the open-loop benchmark.

Run once; the output is committed, so every run of `llamaq bench` (and every system it compares) gets the very
same requests. No downloads: the text is built from the word lists below. The shape is chat-like: a third of the
chats carry a system prompt, a third have earlier turns, some paste a passage to work on; user message lengths and
the requested output lengths (max_tokens) are log-normal, so most requests are short and a few are long. The
tasks ask for long answers, so that a greedy reply tends to run until max_tokens; the benchmark reports the
output lengths each system actually produced. Prompt tokens are counted with the default model's chat template
(by llamaq's Engine) so that every prompt plus its max_tokens fits one 512-cell sequence with room to spare.

Usage: python bench/make_chat_requests.py [--count 300] [--seed 18] [--out bench/data/chat_requests.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from llamaq.protocol import ChatMessage
from llamaq.worker.engine import Engine, EngineConfig
from llamaq.worker.model_files import default_model_path

WINDOW_TOKENS = 480
"""Prompt plus max_tokens stays under this: a sequence holds 512 cells, and tokenizers of other builds may differ."""

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a patient teacher who explains things step by step to curious students.",
    "You are the support assistant of a small bicycle shop. Be friendly, precise and practical, and always "
    "suggest a next step the customer can take.",
    "You are a travel writer. Write vivid, detailed prose with concrete places, food and people.",
    "You are a senior software engineer reviewing code and answering questions about programming. Explain your "
    "reasoning, mention trade-offs, and give small examples where they help.",
]
TASKS = [
    "Write a detailed story about {topic}.",
    "Explain step by step how {topic} works, with examples.",
    "Describe {topic} in as much detail as you can.",
    "Write a long letter to a friend about {topic}.",
    "Give me a thorough guide to {topic}, section by section.",
    "List twenty interesting facts about {topic} and explain each one.",
    "Write an essay of several paragraphs on {topic}.",
    "Tell me everything a beginner should know about {topic}.",
]
TOPICS = [
    "a lighthouse keeper on a stormy night",
    "the water cycle",
    "how bread is baked",
    "the history of the bicycle",
    "learning to play the guitar",
    "a journey across the desert",
    "how a compiler turns code into a program",
    "the life of honey bees",
    "planning a vegetable garden",
    "the first trip to the moon",
    "how vaccines work",
    "a small village market in autumn",
    "sorting algorithms",
    "the rules of chess",
    "a robot who learns to paint",
    "the causes of the seasons",
    "making pottery by hand",
    "how the internet routes a message",
    "a night train",
    "caring for a new puppy",
    "volcanoes and earthquakes",
    "the invention of the printing press",
]
_WORDS = (
    "the a river stone window morning quiet market garden engine letter bridge winter summer people city road old "
    "new small bright dark slowly carefully because after before while every many little green blue warm cold "
    "machine music teacher student map light shadow rain wind north south harbour field forest kitchen table "
    "question answer reason simple careful busy long short early late open close across through under over"
)
WORDS = _WORDS.split()
FOLLOW_UPS = ["Go on, and add more detail.", "Continue, please.", "Now expand the second part.", "Tell me more."]


def make_requests(count: int, seed: int, engine: Engine) -> list[dict[str, object]]:
    """`count` chat requests drawn from one seeded generator, each fitting WINDOW_TOKENS with its max_tokens."""
    rng = random.Random(seed)
    requests: list[dict[str, object]] = []
    while len(requests) < count:
        messages = _chat(rng, len(requests))
        prompt_tokens = len(engine.chat_tokens([ChatMessage(m["role"], m["content"]) for m in messages]))
        max_tokens = _lognormal(rng, median=96, sigma=0.6, low=16, high=320)
        if prompt_tokens + 16 > WINDOW_TOKENS:
            continue  # redrawn: too long a chat for one sequence
        max_tokens = min(max_tokens, WINDOW_TOKENS - prompt_tokens)
        requests.append(
            {
                "id": f"chat-{len(requests):04d}",
                "messages": messages,
                "max_tokens": max_tokens,
                "prompt_tokens": prompt_tokens,
            }
        )
    return requests


def _chat(rng: random.Random, index: int) -> list[dict[str, str]]:
    messages = []
    if rng.random() < 1 / 3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    # The request number makes every prompt unique: only the template and system prompts are shared.
    task = f"(request {index}) " + rng.choice(TASKS).format(topic=rng.choice(TOPICS))
    if rng.random() < 0.35:
        messages.append({"role": "user", "content": task})
        messages.append({"role": "assistant", "content": _passage(rng, _lognormal(rng, 40, 0.6, 10, 120))})
        task = rng.choice(FOLLOW_UPS)
    if rng.random() < 0.4:
        task += " Use this passage as a starting point:\n" + _passage(rng, _lognormal(rng, 35, 0.9, 5, 220))
    messages.append({"role": "user", "content": task})
    return messages


def _passage(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    sentences = [" ".join(words[i : i + 9]).capitalize() + "." for i in range(0, len(words), 9)]
    return " ".join(sentences)


def _lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(median), sigma))))


def main() -> None:
    """Write the request set."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "chat_requests.json")
    args = parser.parse_args()
    engine = Engine(EngineConfig(default_model_path(), n_ctx=512, n_seq_max=1, n_threads=1))
    try:
        requests = make_requests(args.count, args.seed, engine)
    finally:
        engine.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "generator": "bench/make_chat_requests.py",
        "seed": args.seed,
        "count": len(requests),
        "model_for_token_counts": default_model_path().name,
        "requests": requests,
    }
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    prompts = sorted(int(str(r["prompt_tokens"])) for r in requests)
    outputs = sorted(int(str(r["max_tokens"])) for r in requests)
    print(f"wrote {len(requests)} requests to {args.out}")
    print(
        f"prompt tokens p50 {prompts[len(prompts) // 2]}, max {prompts[-1]}; max_tokens p50 "
        f"{outputs[len(outputs) // 2]}, max {outputs[-1]}"
    )


if __name__ == "__main__":
    main()
