"""Write the verifiable arithmetic task used by recipes/arithmetic.yaml (seeded: reruns give the same files).

Two-operand problems (a + b, a - b with a >= b, a x b with one factor below 10), phrased a few ways,
each with its exact integer answer. Train and eval problems never share an (a, op, b) triple.

    python3 data/arithmetic/generate.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHRASINGS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.",
             "{a} {op} {b} = ?")
SUFFIX = " Reply with the number only."


def problem(rng: random.Random) -> tuple[int, str, int, int]:
    op = rng.choice("+-x")
    if op == "x":
        a, b = rng.randint(2, 9), rng.randint(11, 49)
        return (a, op, b, a * b) if rng.random() < 0.5 else (b, op, a, a * b)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return a, op, b, a - b
    return a, op, b, a + b


def rows(rng: random.Random, n: int, seen: set) -> list[dict]:
    out = []
    while len(out) < n:
        a, op, b, answer = problem(rng)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        text = rng.choice(PHRASINGS).format(a=a, op="×" if op == "x" else op, b=b) + SUFFIX
        out.append({"id": f"arith-{len(seen):04d}", "instruction": text, "output": str(answer)})
    return out


def main() -> None:
    rng, seen = random.Random(20261123), set()
    evals = rows(rng, 100, seen)
    train = rows(rng, 400, seen)
    for name, data in (("train.jsonl", train), ("eval.jsonl", evals)):
        (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
        print(f"wrote {HERE / name} ({len(data)} rows)")


if __name__ == "__main__":
    main()
