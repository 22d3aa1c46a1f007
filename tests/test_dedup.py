"""Exact and near-duplicate removal: planted duplicates go, distinct rows stay, the first of a group is kept."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tunegraph.data.dedup import (NearDedupSettings, exact_duplicate_removals, jaccard, near_duplicate_removals,
                                  shingle_sets)

# Distinct instruction/answer pairs on different topics (40-70 words each).
PAIRS = [
    ("Explain why the sky looks blue during the day but red and orange at sunset.",
     "Sunlight is scattered by air molecules, and short blue wavelengths scatter far more than long red ones, so "
     "blue light reaches our eyes from every direction. At sunset the light crosses much more atmosphere, most of "
     "the blue is scattered away before it arrives, and the remaining reds and oranges dominate the sky."),
    ("How do vaccines train the immune system to fight a virus it has never met?",
     "A vaccine shows the immune system a harmless piece or weakened form of the virus. B cells learn to make "
     "antibodies that fit its surface proteins and T cells learn to recognise infected cells. Memory cells remain "
     "afterwards, so a real infection is met by a fast and strong response before the disease takes hold."),
    ("Write a short guide to repotting a houseplant that has outgrown its container.",
     "Water the plant a day before so the roots hold together. Choose a pot one size larger with a drainage hole, "
     "add fresh potting mix, then ease the plant out and loosen circling roots with your fingers. Set it at the "
     "same depth as before, fill around it, press gently and water until it drains."),
    ("What were the main causes of the fall of the Western Roman Empire?",
     "Historians point to several pressures acting together: decades of civil war and short reigns, a shrinking "
     "tax base and debased coinage, reliance on barbarian federates for defence, the split of the empire into two "
     "administrations, and sustained migration and invasion along the Rhine and Danube frontiers during the fifth "
     "century."),
    ("Describe how a bill becomes a law in a parliamentary system.",
     "A minister or member introduces the bill, which is read and debated in principle, examined clause by clause "
     "in committee, amended at report stage and passed at third reading. The other chamber repeats the process, "
     "disagreements go back and forth until both agree, and the head of state then gives formal assent."),
    ("Give practical advice for a beginner who wants to start running regularly.",
     "Start with run walk intervals three times a week rather than long continuous runs. Keep the pace easy enough "
     "to talk, increase total time by about ten percent a week, buy comfortable shoes fitted at a running store, "
     "and take rest days seriously, because most early injuries come from doing too much too soon."),
    ("Summarize how photosynthesis turns light into chemical energy in plants.",
     "Chlorophyll in the thylakoid membranes absorbs light, which splits water, releases oxygen and drives the "
     "production of ATP and NADPH. In the Calvin cycle inside the stroma, those carriers power the fixation of "
     "carbon dioxide into three carbon sugars that the plant builds into glucose, starch and cellulose."),
    ("Compare the advantages of trains and airplanes for trips of about five hundred kilometres.",
     "Over that distance a fast train often wins on door to door time because stations sit in city centres and "
     "boarding takes minutes, while flights add airport transfers and security queues. Trains also emit far less "
     "carbon per passenger and let you work comfortably, although planes remain cheaper on some routes."),
]


def row(row_id: str, prompt: str, answer: str, **extra) -> dict:
    return {"id": row_id, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            **extra}


def clean_rows() -> list[dict]:
    return [row(f"clean-{i}", prompt, answer) for i, (prompt, answer) in enumerate(PAIRS)]


def change_words(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text
        text = text.replace(old, new, 1)
    return text


# --------------------------------------------------------------------------- exact


def test_exact_dedup_ignores_case_spacing_and_punctuation_and_keeps_the_first():
    rows = clean_rows()
    prompt, answer = PAIRS[2]
    rows.insert(3, row("copy-upper", prompt.upper(), answer.replace(",", "").replace(".", " .  ")))
    rows.append(row("copy-exact", prompt, answer))
    removed = exact_duplicate_removals(rows)
    assert [(r.id, r.reason) for r in removed] == [("copy-upper", "exact_duplicate"), ("copy-exact", "exact_duplicate")]
    assert all("clean-2" in r.detail for r in removed)


def test_exact_dedup_keeps_rows_that_differ_in_a_word_or_in_the_rejected_reply():
    prompt, answer = PAIRS[0]
    rows = [row("a", prompt, answer), row("b", prompt, answer.replace("blue", "violet", 1)),
            row("p1", prompt, answer, rejected="No idea."), row("p2", prompt, answer, rejected="Because of magic.")]
    assert [r.id for r in exact_duplicate_removals(rows)] == []


# --------------------------------------------------------------------------- near


def test_planted_paraphrases_are_removed_and_distinct_rows_kept():
    rows = clean_rows()
    prompt, answer = PAIRS[1]
    rows.append(row("para-1", prompt.replace("How do", "How can"),
                    change_words(answer, {"harmless": "safe"})))
    prompt, answer = PAIRS[4]
    rows.insert(6, row("para-4", prompt, change_words(answer, {"debated": "discussed", "clause": "line"})))
    removed = near_duplicate_removals(rows)
    assert {r.id: r.reason for r in removed} == {"para-1": "near_duplicate", "para-4": "near_duplicate"}
    details = {r.id: r.detail for r in removed}
    assert "near-duplicate of clean-1" in details["para-1"] and "near-duplicate of clean-4" in details["para-4"]


def test_rows_sharing_a_prompt_template_but_not_the_content_are_kept():
    template = "Translate the sentence below into French, keeping the tone and the punctuation of the original.\n\n"
    sentences = ["The cat sleeps on the warm windowsill.", "We missed the last bus home.",
                 "Please close the door quietly.", "The market opens at seven."]
    answers = ["Le chat dort sur le rebord chaud.", "Nous avons raté le dernier bus.",
               "Fermez la porte doucement, s'il vous plaît.", "Le marché ouvre à sept heures."]
    rows = [row(f"t{i}", template + s, a) for i, (s, a) in enumerate(zip(sentences, answers))]
    assert near_duplicate_removals(rows) == []


def test_a_stricter_threshold_keeps_a_looser_paraphrase():
    prompt, answer = PAIRS[5]
    loose = row("loose", prompt, change_words(answer, {"three times": "four times", "easy enough": "slow enough",
                                                      "comfortable shoes": "good shoes", "rest days": "recovery days"}))
    rows = clean_rows() + [loose]
    similarity = jaccard(*shingle_sets([rows[5], loose], 3))
    assert 0.6 < similarity < 0.8
    assert [r.id for r in near_duplicate_removals(rows, NearDedupSettings(threshold=0.6))] == ["loose"]
    assert near_duplicate_removals(rows, NearDedupSettings(threshold=0.8)) == []


def test_keep_first_means_the_earliest_row_in_dataset_order():
    prompt, answer = PAIRS[6]
    variant = row("variant", prompt, answer.replace("glucose", "sugar", 1))
    rows = [variant] + clean_rows()
    assert [r.id for r in near_duplicate_removals(rows)] == ["clean-6"]


def test_short_rows_are_compared_whole():
    rows = [row("a", "Capital of Peru?", "Lima"), row("b", "capital of peru", "Lima!"),
            row("c", "Capital of Chile?", "Santiago")]
    assert [r.id for r in near_duplicate_removals(rows)] == ["b"]


def _random_text(rng: random.Random, vocabulary: list[str], count: int) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(count))


def test_lsh_finds_the_same_duplicates_as_comparing_every_pair():
    """LSH only proposes candidates: on planted copies (Jaccard well above the threshold) its result must
    equal the brute-force keep-first result over all pairs."""
    rng = random.Random(3)
    vocabulary = [f"w{i}" for i in range(3000)]
    rows = []
    for i in range(240):
        if i > 5 and rng.random() < 0.15:
            source = rows[rng.randrange(len(rows))]["messages"]
            words = source[1]["content"].split()
            words[rng.randrange(len(words))] = "changed"
            rows.append(row(f"r{i}", source[0]["content"], " ".join(words)))
        else:
            rows.append(row(f"r{i}", _random_text(rng, vocabulary, 20), _random_text(rng, vocabulary, 80)))
    settings = NearDedupSettings(threshold=0.8, seed=9)
    sets = shingle_sets(rows, settings.shingle_words)
    kept, expected = [], []
    for index, shingles in enumerate(sets):
        if any(jaccard(shingles, sets[k]) >= settings.threshold for k in kept):
            expected.append(rows[index]["id"])
        else:
            kept.append(index)
    assert len(expected) >= 20
    assert [r.id for r in near_duplicate_removals(rows, settings)] == expected


def test_shingles_are_stable_sorted_and_distinct():
    first = shingle_sets(clean_rows()[:2], 3)
    again = shingle_sets(clean_rows()[:2], 3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(np.all(np.diff(s.astype(np.int64)) > 0) for s in first)
    assert jaccard(first[0], first[0]) == 1.0 and jaccard(first[0], first[1]) < 0.1


@pytest.mark.parametrize("seed", [1, 2])
def test_near_dedup_is_deterministic_for_a_seed(seed):
    prompt, answer = PAIRS[3]
    rows = clean_rows() + [row("v", prompt, answer.replace("civil war", "internal war"))]
    settings = NearDedupSettings(seed=seed)
    assert near_duplicate_removals(rows, settings) == near_duplicate_removals(rows, settings)
