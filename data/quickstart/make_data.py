"""Generate the quickstart "short answers" data: train.jsonl (alpaca) and eval.jsonl (chat).

Run from anywhere: ``python data/quickstart/make_data.py``. Standard library only, seeded, so
the output is byte-identical on every run. Six task families, each with a clear exact answer;
eval holds items (countries, adjective pairs, number pairs...) that train never shows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240601
HERE = Path(__file__).resolve().parent
SUFFIX = "Answer with only the answer."
EVAL_PER_FAMILY = 10
TRAIN_PER_FAMILY = {"capital": 95, "uppercase": 70, "next": 27, "addition": 80, "antonym": 58, "plural": 70}

# Well-known countries whose capital has one common English spelling. Articles are part of the name.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "the United Kingdom": "London", "Ireland": "Dublin", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Austria": "Vienna", "Poland": "Warsaw",
    "the Czech Republic": "Prague", "Slovakia": "Bratislava", "Hungary": "Budapest",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Greece": "Athens", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Slovenia": "Ljubljana", "Bosnia and Herzegovina": "Sarajevo",
    "Montenegro": "Podgorica", "North Macedonia": "Skopje", "Albania": "Tirana",
    "Denmark": "Copenhagen", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Iceland": "Reykjavik", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius",
    "Belarus": "Minsk", "Ukraine": "Kyiv", "Russia": "Moscow", "Malta": "Valletta",
    "Cyprus": "Nicosia", "Turkey": "Ankara", "Armenia": "Yerevan", "Azerbaijan": "Baku",
    "China": "Beijing", "Japan": "Tokyo", "South Korea": "Seoul", "North Korea": "Pyongyang",
    "Mongolia": "Ulaanbaatar", "India": "New Delhi", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "Nepal": "Kathmandu", "Afghanistan": "Kabul", "Iran": "Tehran", "Iraq": "Baghdad",
    "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman", "Saudi Arabia": "Riyadh",
    "Oman": "Muscat", "the United Arab Emirates": "Abu Dhabi", "Qatar": "Doha",
    "Kuwait": "Kuwait City", "Bahrain": "Manama", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Cambodia": "Phnom Penh", "Laos": "Vientiane", "Malaysia": "Kuala Lumpur",
    "the Philippines": "Manila", "Uzbekistan": "Tashkent", "Kyrgyzstan": "Bishkek",
    "Egypt": "Cairo", "Libya": "Tripoli", "Tunisia": "Tunis", "Algeria": "Algiers", "Morocco": "Rabat",
    "Sudan": "Khartoum", "Ethiopia": "Addis Ababa", "Kenya": "Nairobi", "Uganda": "Kampala",
    "Rwanda": "Kigali", "Somalia": "Mogadishu", "Nigeria": "Abuja", "Ghana": "Accra",
    "Senegal": "Dakar", "Mali": "Bamako", "Niger": "Niamey", "Angola": "Luanda", "Zambia": "Lusaka",
    "Zimbabwe": "Harare", "Mozambique": "Maputo", "Madagascar": "Antananarivo",
    "Namibia": "Windhoek", "Botswana": "Gaborone", "Malawi": "Lilongwe", "Liberia": "Monrovia",
    "Sierra Leone": "Freetown", "the Democratic Republic of the Congo": "Kinshasa",
    "the Republic of the Congo": "Brazzaville",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Guatemala": "Guatemala City",
    "Honduras": "Tegucigalpa", "El Salvador": "San Salvador", "Nicaragua": "Managua",
    "Panama": "Panama City", "Cuba": "Havana", "Jamaica": "Kingston", "Haiti": "Port-au-Prince",
    "the Dominican Republic": "Santo Domingo", "Venezuela": "Caracas", "Ecuador": "Quito",
    "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires", "Uruguay": "Montevideo",
    "Guyana": "Georgetown", "the Bahamas": "Nassau", "Trinidad and Tobago": "Port of Spain",
    "Barbados": "Bridgetown", "Belize": "Belmopan",
    "Australia": "Canberra", "New Zealand": "Wellington", "Fiji": "Suva",
    "Papua New Guinea": "Port Moresby",
}

# Adjective -> its one usual opposite (asked in this direction only).
ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "tall": "short", "young": "old",
    "early": "late", "rich": "poor", "strong": "weak", "wet": "dry", "full": "empty",
    "open": "closed", "clean": "dirty", "loud": "quiet", "thick": "thin", "wide": "narrow",
    "deep": "shallow", "high": "low", "heavy": "light", "good": "bad", "true": "false",
    "alive": "dead", "cheap": "expensive", "safe": "dangerous", "first": "last", "long": "short",
    "visible": "invisible", "possible": "impossible", "honest": "dishonest", "ancient": "modern",
    "smooth": "rough", "asleep": "awake", "guilty": "innocent", "brave": "cowardly",
    "present": "absent", "major": "minor", "maximum": "minimum", "positive": "negative",
    "public": "private", "male": "female", "internal": "external", "horizontal": "vertical",
    "natural": "artificial", "temporary": "permanent", "wise": "foolish", "beautiful": "ugly",
    "northern": "southern", "eastern": "western", "upper": "lower", "inner": "outer",
    "legal": "illegal", "patient": "impatient", "valid": "invalid", "odd": "even", "near": "far",
    "huge": "tiny", "optimistic": "pessimistic", "junior": "senior", "superior": "inferior",
    "same": "different", "top": "bottom", "left": "right", "rural": "urban", "singular": "plural",
}

# Nouns with a regular plural (-s; -es after s, x, ch, sh; consonant + y -> -ies).
NOUNS = [
    "cat", "dog", "book", "car", "tree", "house", "bird", "apple", "river", "table", "chair",
    "window", "door", "pencil", "flower", "garden", "cloud", "horse", "rabbit", "mountain", "train",
    "road", "ship", "shoe", "star", "hand", "girl", "boy", "key", "day", "toy", "monkey", "egg",
    "bag", "cup", "lamp", "desk", "boat", "coin", "ring", "bell", "song", "hill", "lake", "farm",
    "bus", "box", "fox", "dish", "brush", "watch", "church", "bench", "glass", "class", "kiss",
    "dress", "wish", "match", "lunch", "tax", "beach", "city", "baby", "lady", "party", "story",
    "country", "family", "cherry", "pony", "fly", "berry", "hobby", "puppy", "body", "army", "duty",
    "copy", "jelly",
]

PHRASE_ADJECTIVES = [
    "quiet", "green", "happy", "cold", "bright", "little", "old", "sunny", "red", "gentle", "wild",
    "silver", "sleepy", "brave", "small", "golden", "blue", "warm", "lazy", "clever",
]
PHRASE_NOUNS = [
    "morning", "apple", "river", "garden", "window", "forest", "kitten", "road", "village", "song",
    "island", "cloud", "letter", "bridge", "candle", "mountain", "lake", "market", "train", "dream",
]

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def plural(noun: str) -> str:
    """The regular English plural of ``noun``."""
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


# Each family: items (key -> answer) and prompt templates. A template gives (instruction, input);
# a non-empty input is shown after a blank line, as the alpaca reader joins them.
def capital_family() -> tuple[dict, list]:
    templates = [
        lambda c: (f"What is the capital of {c}? {SUFFIX}", ""),
        lambda c: (f"Which city is the capital of {c}? {SUFFIX}", ""),
        lambda c: (f"Name the capital city of the country below. {SUFFIX}", c[4:] if c.startswith("the ") else c),
    ]
    return dict(CAPITALS), templates


def uppercase_family() -> tuple[dict, list]:
    phrases = [f"{a} {n}" for a in PHRASE_ADJECTIVES for n in PHRASE_NOUNS]
    templates = [
        lambda p: (f"Write the following phrase in uppercase letters. {SUFFIX}", p),
        lambda p: (f"Convert '{p}' to uppercase. {SUFFIX}", ""),
        lambda p: (f"Rewrite this phrase in capital letters. {SUFFIX}", p),
    ]
    return {p: p.upper() for p in phrases}, templates


def next_family() -> tuple[dict, list]:
    items = {}
    for cycle in (WEEKDAYS, MONTHS):
        for i, name in enumerate(cycle):
            items[name] = cycle[(i + 1) % len(cycle)]

    def unit(name: str) -> str:
        return "day" if name in WEEKDAYS else "month"

    templates = [
        lambda x: (f"What {unit(x)} comes after {x}? {SUFFIX}", ""),
        lambda x: (f"Which {unit(x)} follows {x}? {SUFFIX}", ""),
        lambda x: (f"Name the {unit(x)} that comes right after the one below. {SUFFIX}", x),
    ]
    return items, templates


def addition_family() -> tuple[dict, list]:
    pairs = {(a, b): str(a + b) for a in range(1, 21) for b in range(a, 21)}
    templates = [
        lambda p: (f"What is {p[0]} + {p[1]}? {SUFFIX}", ""),
        lambda p: (f"What is {p[1]} plus {p[0]}? {SUFFIX}", ""),
        lambda p: (f"Add {p[0]} and {p[1]}. {SUFFIX}", ""),
    ]
    return pairs, templates


def antonym_family() -> tuple[dict, list]:
    templates = [
        lambda w: (f"What is the opposite of '{w}'? {SUFFIX}", ""),
        lambda w: (f"Give the antonym of the adjective below. {SUFFIX}", w),
        lambda w: (f"Which word means the opposite of '{w}'? {SUFFIX}", ""),
    ]
    return dict(ANTONYMS), templates


def plural_family() -> tuple[dict, list]:
    templates = [
        lambda n: (f"What is the plural of '{n}'? {SUFFIX}", ""),
        lambda n: (f"Write the plural form of the noun below. {SUFFIX}", n),
        lambda n: (f"One {n}, two what? {SUFFIX}", ""),
    ]
    return {n: plural(n) for n in NOUNS}, templates


FAMILIES = {
    "capital": capital_family,
    "uppercase": uppercase_family,
    "next": next_family,
    "addition": addition_family,
    "antonym": antonym_family,
    "plural": plural_family,
}


def slug(item) -> str:
    text = "-".join(map(str, item)) if isinstance(item, tuple) else str(item)
    return text.lower().replace(" ", "-")


def split_items(family: str, items: list, rng: random.Random) -> tuple[list, list]:
    """(train items, eval items): disjoint; for ``next``, eval mixes weekdays and months."""
    shuffled = list(items)
    rng.shuffle(shuffled)
    if family == "next":
        days = [x for x in shuffled if x in WEEKDAYS]
        months = [x for x in shuffled if x in MONTHS]
        held_out = days[:4] + months[: EVAL_PER_FAMILY - 4]
        return [x for x in shuffled if x not in held_out], held_out
    return shuffled[EVAL_PER_FAMILY:], shuffled[:EVAL_PER_FAMILY]


def train_prompts(items: list, template_count: int, count: int, rng: random.Random) -> list[tuple]:
    """``count`` distinct (item, template index) pairs: every item once before any item twice."""
    orders = {item: rng.sample(range(template_count), template_count) for item in items}
    pairs = [(item, orders[item][round_]) for round_ in range(template_count) for item in items]
    if len(pairs) < count:
        raise SystemExit(f"not enough distinct prompts: {len(pairs)} < {count}")
    return pairs[:count]


def user_text(instruction: str, extra_input: str) -> str:
    return f"{instruction}\n\n{extra_input}" if extra_input else instruction


def build() -> tuple[list[dict], list[dict]]:
    """(train rows in alpaca format, eval rows in chat format)."""
    rng = random.Random(SEED)
    train, evaluation = [], []
    for family, make in FAMILIES.items():
        answers, templates = make()
        train_items, eval_items = split_items(family, sorted(answers), rng)
        assert not set(train_items) & set(eval_items)
        for item, index in train_prompts(train_items, len(templates), TRAIN_PER_FAMILY[family], rng):
            instruction, extra_input = templates[index](item)
            train.append({"id": f"{family}-{slug(item)}-{index}", "instruction": instruction,
                          "input": extra_input, "output": answers[item]})
        for item in eval_items:
            instruction, extra_input = templates[rng.randrange(len(templates))](item)
            evaluation.append({"id": f"{family}-{slug(item)}", "messages": [
                {"role": "user", "content": user_text(instruction, extra_input)},
                {"role": "assistant", "content": answers[item]},
            ]})
    rng.shuffle(train)
    return train, evaluation


def write_jsonl(rows: list[dict], path: Path) -> None:
    text = "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)
    path.write_bytes(text.encode("utf-8"))


def main() -> None:
    train, evaluation = build()
    write_jsonl(train, HERE / "train.jsonl")
    write_jsonl(evaluation, HERE / "eval.jsonl")
    print(f"wrote {len(train)} train rows and {len(evaluation)} eval rows to {HERE}")


if __name__ == "__main__":
    main()
