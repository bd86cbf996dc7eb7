"""Generate the bundled NLU intent data set (``nlu_intents_train.jsonl`` / ``nlu_intents_test.jsonl``).

English user queries to a local-life-services app (the seed report's business NLU sets cover
housing, recruitment, cars and "yellow pages" local services), 5 labels. Every query is composed
from hand-written templates x slot values; nothing is copied from an existing data set.

The split is *template-disjoint*: about a quarter of each class's templates are reserved for the
test split, so test queries are new phrasings, not re-fills of training sentences. A fixed seed
makes the output byte-for-byte reproducible::

    python -m jpeft.data.make_nlu_intents          # rewrites the two .jsonl files next to this script
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SEED = 58
LABELS = ("housing", "jobs", "cars", "local_services", "other")
N_TRAIN_PER_CLASS = 80
N_TEST_PER_CLASS = 24
TEST_TEMPLATE_FRACTION = 0.25
TYPO_RATE = 0.18

PROMPT = (
    "Classify the user query sent to a local-services app into exactly one of these labels: "
    "housing, jobs, cars, local_services, other.\n"
    "Answer with the label only.\n"
    "Query: {query}\n"
    "Label:\n"
)

SLOTS: dict[str, list[str]] = {
    "city": ["Austin", "Denver", "Chicago", "Seattle", "Boston", "Phoenix", "Atlanta", "Portland",
             "Miami", "San Diego", "Columbus", "Nashville", "Brooklyn", "Oakland", "Tampa", "Raleigh"],
    "area": ["near the university", "close to downtown", "near the subway", "in a quiet neighborhood",
             "by the lake", "near my office", "on the east side", "near a good school"],
    "beds": ["1-bedroom", "2 bedroom", "3BR", "studio", "2br/1ba", "two-bedroom", "4 bed"],
    "budget": ["$900", "$1200", "1500 dollars", "$2k", "800/month", "$1,750", "under 1000"],
    "home": ["apartment", "condo", "townhouse", "house", "room", "loft", "duplex", "flat"],
    "role": ["warehouse associate", "barista", "delivery driver", "software developer", "nurse",
             "accountant", "line cook", "security guard", "cashier", "receptionist",
             "forklift operator", "data entry clerk", "dental assistant", "truck driver"],
    "shift": ["part-time", "full-time", "night shift", "weekend", "remote", "temporary", "summer"],
    "car": ["Toyota Camry", "Honda Civic", "Ford F-150", "Tesla Model 3", "Subaru Outback",
            "Jeep Wrangler", "Hyundai Elantra", "BMW 3 series", "Nissan Leaf", "Chevy Silverado",
            "Mazda CX-5", "Kia Sorento"],
    "year": ["2012", "2015", "2017", "2019", "2020", "2021", "2016"],
    "miles": ["40k", "85,000", "120k", "60000", "150k", "30k"],
    "service": ["plumber", "electrician", "house cleaner", "locksmith", "handyman", "pest control",
                "carpet cleaning", "moving company", "appliance repair", "dog walker", "math tutor",
                "wedding photographer", "babysitter", "piano teacher", "AC repair", "gardener"],
    "problem": ["a leaky faucet", "a clogged drain", "a broken washing machine", "no hot water",
                "ants in the kitchen", "a broken door lock", "an AC that won't cool",
                "a fridge making noise", "a cracked window", "mold in the bathroom"],
    "day": ["today", "tomorrow", "this weekend", "Saturday morning", "next Tuesday", "asap",
            "tonight", "friday afternoon"],
    "a": ["17", "245", "3.5", "1200", "96", "8", "64"],
    "b": ["29", "18", "12", "7", "350", "0.25", "4"],
    "topic": ["the moon landing", "photosynthesis", "the french revolution", "black holes",
              "the olympics", "bitcoin", "volcanoes", "the roman empire"],
    "dish": ["lasagna", "pancakes", "fried rice", "banana bread", "chicken curry", "guacamole"],
    "team": ["the Lakers", "the Yankees", "Man United", "the Chiefs", "the Celtics"],
}

TEMPLATES: dict[str, list[str]] = {
    "housing": [
        "looking for a {beds} {home} in {city} {area}",
        "Any {beds} apartments for rent in {city} under {budget}?",
        "I want to buy a {home} in {city}, what's available?",
        "how much is rent for a {beds} in {city}",
        "need a room to rent {area}, budget {budget}",
        "Show me {home}s for sale {area}",
        "is it better to rent or buy a {home} in {city}?",
        "My lease ends next month and I need a new {home} in {city}",
        "roommate wanted for a {beds} {area}",
        "list my {home} for rent, asking {budget}",
        "pet friendly {home} {area}?",
        "short term rental in {city} for 3 months",
        "I'm selling my {home} in {city}, how do I post it?",
        "Can I rent a parking spot or garage {area}?",
        "office space for lease in {city}",
        "what do {beds} condos cost in {city} right now",
        "find me a furnished {home} {area} that allows dogs",
        "landlord won't return my deposit for my {home}, what can I do",
        "new listings: {beds} {home}, {city}, max {budget}",
        "sublet available {day}? need a {home} {area}",
        "how big a mortgage do I need for a {home} in {city}",
        "retail shop space for rent {area}",
        "we're moving to {city} and need a {beds} {home} with a yard",
        "cheapest studio in {city}",
    ],
    "jobs": [
        "{shift} {role} jobs in {city}",
        "Is anyone hiring a {role} {area}?",
        "how do I apply for {role} positions",
        "looking for {shift} work, I have experience as a {role}",
        "what does a {role} make in {city}",
        "help me write a resume for a {role} job",
        "We are hiring a {shift} {role}, where do I post the job ad?",
        "any {role} openings that start {day}?",
        "I got laid off, need a {role} job in {city} asap",
        "tips for a {role} interview {day}",
        "{shift} jobs for college students in {city}",
        "I want to become a real estate agent, how do I get hired",
        "car salesman positions in {city}",
        "jobs with no experience needed {area}",
        "post an opening for a {role}, pay $18/hr",
        "I'm a {role} looking for a better paying job",
        "Remote jobs that hire immediately?",
        "entry level {role} jobs that offer training",
        "can you find me a job as a plumber in {city}",
        "how to find work as a nanny in {city}",
        "does the {role} job at the warehouse {area} offer benefits",
        "need {shift} work that pays weekly",
        "hiring {role}s in {city} - how many applicants do you usually get",
        "job fair in {city} {day}?",
    ],
    "cars": [
        "used {car} for sale in {city}",
        "how much is my {year} {car} with {miles} miles worth",
        "I want to sell my {car}",
        "{year} {car} under {budget}? lol probably not",
        "rent a car in {city} for {day}",
        "compare the {car} and the Honda Accord",
        "best family SUV under 30k",
        "lease deals on a new {car}",
        "Is a {year} {car} with {miles} miles a good buy?",
        "my {car} makes a grinding noise when braking",
        "where can I get an oil change for my {car} {day}",
        "car loan rates for a used {car}",
        "trade in my {year} {car}",
        "show me pickup trucks {area}",
        "what's the gas mileage on a {year} {car}",
        "electric cars with the longest range",
        "looking for a cheap first car for my teenager",
        "buy a {car} from a private seller, what should I check",
        "does the {car} have a timing belt or chain",
        "how much to insure a {year} {car}",
        "list my {year} {car}, {miles} miles, asking {budget}",
        "certified pre-owned {car} near {city}",
        "minivans with third row seating for sale",
        "my check engine light came on in my {car}",
    ],
    "local_services": [
        "need a {service} in {city} {day}",
        "find a {service} {area}",
        "how much does a {service} charge per hour",
        "I have {problem}, who can fix it {day}?",
        "book a {service} for {day}",
        "best rated {service} in {city}",
        "moving company to help me move into my new apartment {day}",
        "deep cleaning for a {beds} before move out",
        "need a nanny for my 2 kids, what's the going rate in {city}",
        "someone to fix {problem}",
        "plumber needed {day} for {problem}",
        "get quotes from a {service} {area}",
        "is there a 24 hour {service} in {city}",
        "who repairs {problem} near me",
        "I need a {service} that speaks spanish",
        "lawn mowing service every other week {area}",
        "pet grooming open {day} in {city}",
        "find a licensed electrician to install a ceiling fan",
        "recommend a {service}, mine cancelled",
        "tailor for wedding dress alterations in {city}",
        "urgent: {problem}!! need help {day}",
        "hire a {service} for a 3 hour job",
        "cheap {service} {area} with good reviews",
        "junk removal for an old couch {day}",
    ],
    "other": [
        "what's the weather in {city} {day}",
        "what is {a} plus {b}",
        "tell me a joke",
        "how are you doing today?",
        "who won the game last night, {team}?",
        "explain {topic} simply",
        "recipe for {dish}",
        "what time is it in Tokyo",
        "how do I reset my password for this app",
        "calculate {a} times {b}",
        "thanks, that's all",
        "Will it rain {day} in {city}?",
        "translate 'good morning' into french",
        "what's {a} divided by {b}",
        "who wrote pride and prejudice",
        "hello",
        "write a short poem about {topic}",
        "how many calories in {dish}",
        "are you a robot?",
        "is {a} a prime number",
        "what's the capital of australia",
        "summarize the history of {topic} in one line",
        "sing me something",
        "when do {team} play next",
    ],
}


def _fill(template: str, rng: random.Random) -> str:
    """Replace every ``{slot}`` in ``template`` with a random value of that slot."""
    return re.sub(r"\{(\w+)\}", lambda m: rng.choice(SLOTS[m.group(1)]), template)


def _typo(query: str, rng: random.Random) -> str:
    """Apply one realistic noise operation: lowercase, drop/swap/double a letter, or strip '?'."""
    op = rng.randrange(5)
    words = query.split(" ")
    idx = [i for i, w in enumerate(words) if len(w) > 3 and w.isalpha()]
    if op == 0 or not idx:
        return query.lower().rstrip("?!.")
    i = rng.choice(idx)
    w = words[i]
    j = rng.randrange(1, len(w) - 1)
    if op == 1:
        w = w[:j] + w[j + 1:]
    elif op == 2:
        w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    elif op == 3:
        w = w[:j] + w[j] + w[j:]
    else:
        return query.rstrip("?!.") if query[-1] in "?!." else query + "??"
    words[i] = w
    return " ".join(words)


def _norm(query: str) -> str:
    """Normalisation used for duplicate detection: lowercase, letters/digits only."""
    return re.sub(r"[^a-z0-9]+", " ", query.lower()).strip()


def _sample(templates: list[str], n: int, rng: random.Random, seen: set[str]) -> list[str]:
    """Draw ``n`` distinct queries, cycling through ``templates`` round-robin."""
    out: list[str] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n:
            raise RuntimeError(f"cannot draw {n} distinct queries from {len(templates)} templates")
        query = _fill(templates[attempts % len(templates)], rng)
        query = query[0].upper() + query[1:] if rng.random() < 0.3 else query
        if rng.random() < TYPO_RATE:
            query = _typo(query, rng)
        key = _norm(query)
        if key not in seen:
            seen.add(key)
            out.append(query)
    return out


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Return ``(train, test)`` rows ``{"prompt", "completion", "label", "query"}``, shuffled."""
    rng = random.Random(seed)
    seen: set[str] = set()
    train: list[dict] = []
    test: list[dict] = []
    for label in LABELS:
        templates = list(TEMPLATES[label])
        rng.shuffle(templates)
        n_test_t = max(1, round(len(templates) * TEST_TEMPLATE_FRACTION))
        for split, temps, n in ((test, templates[:n_test_t], N_TEST_PER_CLASS),
                                (train, templates[n_test_t:], N_TRAIN_PER_CLASS)):
            for query in _sample(temps, n, rng, seen):
                split.append({"prompt": PROMPT.format(query=query), "completion": label,
                              "label": label, "query": query})
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def main() -> None:
    """Write the two JSONL files next to this script."""
    here = Path(__file__).resolve().parent
    train, test = build()
    for name, rows in (("nlu_intents_train.jsonl", train), ("nlu_intents_test.jsonl", test)):
        with open(here / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {here / name}")


if __name__ == "__main__":
    main()
