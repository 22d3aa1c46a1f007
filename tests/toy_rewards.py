"""A user-style reward function for tests (importable as ``toy_rewards:length_parity``)."""


def length_parity(completion: str, row: dict) -> float:
    """1 for an even number of characters, else 0: varies across samples of a random tiny model,
    so group advantages are non-zero and the policy moves."""
    return float(len(completion) % 2 == 0)
