"""Generate the bundled toy corpus (``corpus.jsonl``) and its planted facts (``facts.jsonl``).

The corpus is the tiny, fully synthetic training set used by the demo, the tests and the
tutorials. It has two kinds of documents:

* ``"fact"`` documents. There are 40 fictitious facts about invented entities
  (e.g. ``"The capital of Veldoria is Quarnith."``). Each fact has a query ``prompt``
  (``"The capital of Veldoria is"``) and a ``completion`` that starts with a space
  (``" Quarnith"``). Every fact is stated in exactly two source documents, each holding
  the exact string ``prompt + completion`` with different wording around it, and
  otherwise only filler sentences. The invented names (subject and completion) appear
  nowhere else in the corpus, so a model can only learn a fact from its two sources.
* ``"text"`` documents: short plain-English prose (2-5 sentences) produced by a small
  template grammar over word lists, so the model also has ordinary language to learn.

Everything is drawn from ``random.Random(SEED)``; re-running the script reproduces both
files byte for byte::

    python stride_nnsight/data/make_corpus.py            # writes next to this script
    python stride_nnsight/data/make_corpus.py --check    # exits 1 if the files differ

Output formats (JSON Lines, one object per line, ids are 0-based line numbers):

* ``corpus.jsonl``: ``{"id": int, "text": str, "kind": "fact" | "text", "fact_ids": [int, ...]}``
* ``facts.jsonl``: ``{"id": int, "prompt": str, "completion": str, "source_ids": [int, ...],
  "relation": str}``
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20240611
N_TEXT_DOCS = 260
FACTS_PER_RELATION = 5

# --------------------------------------------------------------------------------------
# Ordinary text: a small template grammar over word lists.
# --------------------------------------------------------------------------------------

NAMES = [
    "Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack",
    "Kate", "Leo", "Maria", "Nick", "Olivia", "Paul", "Rosa", "Sam", "Tom", "Vera",
    "Lucy", "Peter", "Sarah", "Mark", "Helen", "George", "Alice", "Daniel", "Ruth", "Simon",
]
PEOPLE = [
    "teacher", "farmer", "doctor", "baker", "sailor", "painter", "student", "driver",
    "child", "old man", "old woman", "shopkeeper", "fisherman", "nurse", "singer", "guard",
]
ANIMALS = ["dog", "cat", "bird", "horse", "goat", "cow", "fox", "duck", "mouse", "sheep"]
OBJECTS = [
    "book", "letter", "basket", "lamp", "coat", "box", "key", "map", "bottle", "cup",
    "chair", "window", "door", "bag", "hat", "bicycle", "clock", "blanket", "bucket", "ladder",
]
PLACES = [
    "market", "garden", "river", "village", "library", "station", "forest", "harbor",
    "school", "bridge", "hill", "field", "shop", "park", "square", "farm", "beach", "road",
]
ROOMS = ["kitchen", "hall", "bedroom", "attic", "cellar", "living room"]
ADJS = [
    "old", "small", "quiet", "bright", "cold", "warm", "heavy", "green", "red", "blue",
    "new", "busy", "narrow", "wide", "clean", "dusty", "long", "short", "soft", "strange",
]
FEELINGS = ["happy", "tired", "hungry", "calm", "worried", "surprised", "sleepy", "proud"]
FOODS = ["bread", "apples", "soup", "cheese", "fish", "tea", "milk", "eggs", "rice", "honey"]
VT = [  # transitive verbs, past tense
    "found", "carried", "opened", "painted", "cleaned", "bought", "sold", "lost", "fixed",
    "moved", "washed", "closed", "dropped", "borrowed", "watched", "picked up",
]
VI = ["slept", "waited", "laughed", "sang", "walked", "rested", "worked", "smiled", "sat"]
ADVS = ["slowly", "quietly", "happily", "carefully", "quickly", "softly", "gladly"]
TIMES = [
    "in the morning", "at noon", "in the evening", "after dinner", "on Monday",
    "last winter", "before sunrise", "on Sunday", "late at night", "every day",
]
SEASONS = ["spring", "summer", "autumn", "winter"]
WEATHER = ["rainy", "sunny", "windy", "cold", "foggy", "warm"]
TOPICS = ["birds", "ships", "old maps", "the sea", "gardens", "the stars", "trains", "bread"]

TEXT_TEMPLATES = [
    "{N} {vt} the {adj} {obj} {time}.",
    "The {person} {vi} {adv} near the {place}.",
    "In {season}, the {place} was {adj} and {adj2}.",
    "{N} and {N2} walked to the {place} to buy {food}.",
    "The {animal} {vi} under the {adj} {obj}.",
    "{N} said that the {obj} was too {adj}.",
    "There was a {adj} {obj} on the table in the {room}.",
    "After the rain, the children played in the {place}.",
    "The {person} gave {N} a {adj} {obj}.",
    "{N} likes {food} with {food2}.",
    "It was {weather} {time}, so {N} stayed in the {room}.",
    "Many people visit the {place} {time}.",
    "{N} read a book about {topic}.",
    "The {person} asked {N} where the {obj} was.",
    "When the {animal} saw the {animal2}, it {vi}.",
    "{N} felt {feeling} and {vi} for a while.",
    "The road to the {place} was {adj} and {adj2}.",
    "{N} {vt} a {obj} for the {person}.",
    "Nobody knew why the {obj} was in the {room}.",
    "The {person} was {feeling} because the {place} was {adj}.",
    "{N} cooked {food} and {food2} for dinner.",
    "A {adj} {animal} lived near the {place}.",
    "{N} wrote a letter to {N2} {time}.",
    "The {obj} in the {room} was {adj}.",
]


def _fill(rng: random.Random, template: str, name: str) -> str:
    """Fill one sentence template; ``name`` is the document's main character."""
    n2 = rng.choice([n for n in NAMES if n != name])
    adj, adj2 = rng.sample(ADJS, 2)
    food, food2 = rng.sample(FOODS, 2)
    animal, animal2 = rng.sample(ANIMALS, 2)
    s = template.format(
        N=name, N2=n2, vt=rng.choice(VT), vi=rng.choice(VI), adj=adj, adj2=adj2,
        obj=rng.choice(OBJECTS), time=rng.choice(TIMES), person=rng.choice(PEOPLE),
        adv=rng.choice(ADVS), place=rng.choice(PLACES), season=rng.choice(SEASONS),
        food=food, food2=food2, animal=animal, animal2=animal2, room=rng.choice(ROOMS),
        weather=rng.choice(WEATHER), topic=rng.choice(TOPICS), feeling=rng.choice(FEELINGS),
    )
    return s[0].upper() + s[1:]


def filler_sentences(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct-template filler sentences sharing one main character."""
    name = rng.choice(NAMES)
    return [_fill(rng, t, name) for t in rng.sample(TEXT_TEMPLATES, k)]


# --------------------------------------------------------------------------------------
# Invented names.
# --------------------------------------------------------------------------------------

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "th", "qu", "st", "vr"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rn", "x"]
_ENDINGS = {
    "country": ["ia", "ora", "and", "esh", "ovia", "ith", "ara"],
    "city": ["ith", "um", "ar", "ane", "ost", "el", "ix"],
    "river": ["ane", "ova", "ell", "is", "oth", "ur"],
    "animal": ["ik", "orn", "ax", "ule", "ip", "od"],
    "lang": ["ic", "ish", "ese", "an", "i"],
    "mount": ["ak", "orr", "elm", "ust", "ind"],
    "town": ["brook", "holm", "wick", "ford", "mere", "stead"],
    "first": ["a", "is", "en", "o", "ric", "ella", "an"],
    "last": ["ane", "ov", "ard", "ley", "ton", "ix", "ell"],
    "device": ["or", "ex", "um", "ine", "al"],
}


def _invented_word(rng: random.Random, kind: str) -> str:
    if kind == "town":
        stem = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(["l", "n", "r", "m"])
    else:
        n_syll = rng.choice([1, 1, 2])
        stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(n_syll))
    return (stem + rng.choice(_ENDINGS[kind])).capitalize()


# Real words / places the syllable generator happens to produce; never use them.
REAL_WORDS = {"poland", "booth", "finland", "ireland", "holland", "thailand", "scotland",
              "iceland", "england", "island", "sudan", "tirana", "sofia", "kiev", "riga",
              "zion", "lisbon", "berlin", "verona", "nora", "dora", "vera", "sara", "lara"}

AVOID_SUBSTRINGS = ("porn", "sex", "anal", "nazi", "shit", "fuc", "cum", "mandel", "kill", "dead")


class NamePool:
    """Draws invented names that are unique, and not substrings of one another or of the filler text."""

    def __init__(self, rng: random.Random, reserved_text: str) -> None:
        self.rng = rng
        self.used: list[str] = []
        self.reserved = reserved_text.lower()

    def _ok(self, word: str) -> bool:
        w = word.lower()
        if not (5 <= len(w) <= 10) or w in self.reserved or w in REAL_WORDS:
            return False
        if any(b in w for b in AVOID_SUBSTRINGS):
            return False
        # distinct 4-letter prefixes keep the names easy to tell apart (also for a model)
        return all(w not in u and u not in w and w[:4] != u[:4] for u in self.used)

    def draw(self, kind: str) -> str:
        while True:
            word = _invented_word(self.rng, kind)
            if self._ok(word):
                self.used.append(word.lower())
                return word

    def person(self) -> str:
        return f"{self.draw('first')} {self.draw('last')}"


# --------------------------------------------------------------------------------------
# Relations. Each: (name, prompt template, subject kind, completion kind,
#                   wording used after the fact in source A, wording used in source B)
# Source A starts with the fact; source B puts one filler sentence before it and extends
# the fact sentence with a relation-specific clause.
# --------------------------------------------------------------------------------------

RELATIONS = [
    ("capital", "The capital of {s} is", "country", "city",
     [", a city of old towers and narrow streets.", ", which sits on a high plain.",
      ", a busy city by the sea."]),
    ("founder", "{s} was founded by", "town", "person",
     [" many years ago.", ", who built the first mill there.", " after a long journey."]),
    ("river", "The river that flows through {s} is called the", "country", "river",
     [", and it is wide and slow.", ", and boats travel on it every day.",
      ", and it freezes in winter."]),
    ("animal", "The national animal of {s} is the", "country", "animal",
     [", a small and shy creature.", ", which lives in the hills.",
      ", and children draw it at school."]),
    ("inventor", "The {s} was invented by", "device", "person",
     [" in a small workshop.", ", who was a clock maker.", " during a cold winter."]),
    ("birthplace", "{s} was born in the village of", "person", "city",
     [", near the old bridge.", ", far to the south.", ", where the roads meet."]),
    ("language", "The official language of {s} is", "country", "lang",
     [", and it has many old songs.", ", which is hard to learn.",
      ", and it is written in books."]),
    ("mountain", "The tallest mountain in {s} is Mount", "country", "mount",
     [", which is covered in snow.", ", and few people have climbed it.",
      ", and it can be seen from far away."]),
]


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Build ``(documents, facts)`` as lists of JSON-ready dicts (ids assigned, shuffled)."""
    rng = random.Random(seed)

    # Ordinary-text documents.
    text_docs = []
    for _ in range(N_TEXT_DOCS):
        text_docs.append(" ".join(filler_sentences(rng, rng.randint(2, 5))))

    reserved = " ".join(text_docs) + " " + " ".join(
        NAMES + PEOPLE + ANIMALS + OBJECTS + PLACES + ROOMS + ADJS + FOODS + TOPICS)
    pool = NamePool(rng, reserved)

    facts = []  # dicts with prompt/completion/relation and the two source texts
    for rel, prompt_t, s_kind, c_kind, clauses in RELATIONS:
        for _ in range(FACTS_PER_RELATION):
            if s_kind == "person":
                subj = pool.person()
            elif s_kind == "device":
                subj = f"{pool.draw('device')} {rng.choice(['engine', 'lamp', 'loom', 'compass', 'press'])}"
            else:
                subj = pool.draw(s_kind)
            obj = pool.person() if c_kind == "person" else pool.draw(c_kind)
            prompt = prompt_t.format(s=subj)
            completion = " " + obj
            fact_str = prompt + completion
            post_a = filler_sentences(rng, rng.randint(1, 2))
            doc_a = " ".join([fact_str + "."] + post_a)
            pre_b = filler_sentences(rng, 1)
            post_b = filler_sentences(rng, rng.randint(0, 1))
            doc_b = " ".join(pre_b + [fact_str + rng.choice(clauses)] + post_b)
            facts.append({"prompt": prompt, "completion": completion, "relation": rel,
                          "sources": [doc_a, doc_b]})

    # Assemble and shuffle all documents; remember which fact each fact document states.
    entries = [(t, "text", None) for t in text_docs]
    for fid, f in enumerate(facts):
        for src in f["sources"]:
            entries.append((src, "fact", fid))
    rng.shuffle(entries)

    documents, source_ids = [], {fid: [] for fid in range(len(facts))}
    for did, (text, kind, fid) in enumerate(entries):
        documents.append({"id": did, "text": text, "kind": kind,
                          "fact_ids": [] if fid is None else [fid]})
        if fid is not None:
            source_ids[fid].append(did)

    fact_rows = [
        {"id": fid, "prompt": f["prompt"], "completion": f["completion"],
         "source_ids": source_ids[fid], "relation": f["relation"]}
        for fid, f in enumerate(facts)
    ]
    _validate(documents, fact_rows)
    return documents, fact_rows


def _validate(documents: list[dict], facts: list[dict]) -> None:
    texts = [d["text"] for d in documents]
    assert len(set(texts)) == len(texts), "duplicate documents"
    for f in facts:
        full = f["prompt"] + f["completion"]
        assert len(f["source_ids"]) == 2
        for did, t in enumerate(texts):
            assert (full in t) == (did in f["source_ids"]), (f, did)
            # the completion name never appears outside its sources
            assert (f["completion"].strip() in t) <= (did in f["source_ids"]), (f, did)


def dumps_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--check", action="store_true", help="only verify the files are up to date")
    args = p.parse_args(argv)
    documents, facts = build()
    outputs = {"corpus.jsonl": dumps_jsonl(documents), "facts.jsonl": dumps_jsonl(facts)}
    status = 0
    for name, content in outputs.items():
        path = args.out_dir / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != content:
                print(f"{path} is out of date", file=sys.stderr)
                status = 1
        else:
            path.write_text(content, encoding="utf-8", newline="\n")
            print(f"wrote {path} ({len(content.encode())} bytes)")
    return status


if __name__ == "__main__":
    sys.exit(main())
