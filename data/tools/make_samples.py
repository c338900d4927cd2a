#!/usr/bin/env python3
"""How the bundled sample data was made (run once; its outputs are committed, mo-align never
runs this). Deterministic: the same files every time.

Writes JSON Lines in the exact Hub schemas:
  data/smoltalk/{train,test}.jsonl                  HuggingFaceTB/smol-smoltalk: messages, source
  data/ultrafeedback/train.jsonl                    openbmb/UltraFeedback: instruction, completions[4]
                                                    with annotations.{aspect}.Rating as strings
  data/ultrafeedback_binarized/{train,test}_prefs.jsonl
                                                    HuggingFaceH4/ultrafeedback_binarized: prompt,
                                                    prompt_id, chosen, rejected, messages, scores
The binarized pairs are built from the openbmb records the way H4 built theirs (chosen = the best
mean rating, rejected = a random other completion), so the two join on instruction + response.
Parquet twins are written by `mo-align convert-data`.
"""
import hashlib
import json
import os
import random

R = random.Random(20261124)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"),
            ("Portugal", "Lisbon"), ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Austria", "Vienna")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("early", "late"),
             ("light", "dark"), ("open", "closed"), ("full", "empty"), ("strong", "weak"), ("up", "down")]
ANIMALS = [("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("duck", "quacks"), ("lion", "roars"),
           ("sheep", "bleats"), ("horse", "neighs"), ("owl", "hoots")]
COLORS = [("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"), ("a ripe banana", "yellow"),
          ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange")]
TOPICS = ["the sea", "autumn", "the moon", "a quiet city", "rain", "mountains", "a small garden", "the wind"]
POEMS = {
    "the sea": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time.",
    "autumn": "Red leaves drift and turn,\ncool air smells of wood and rain,\nthe year exhales slow.",
    "the moon": "Silver lamp of night,\nit borrows light from the sun\nand lends it to us.",
    "a quiet city": "Streetlights hum softly,\nempty buses glide past shops,\nthe city breathes out.",
    "rain": "Rain taps on the glass,\npuddles gather little skies,\nthe street smells of earth.",
    "mountains": "Stone shoulders of snow,\nclouds rest on the highest peaks,\npatient, old and still.",
    "a small garden": "Bees visit the mint,\ntomatoes blush on the vine,\nsmall world, full of life.",
    "the wind": "Unseen, it arrives,\nbends the grass and lifts the kites,\nthen is gone again.",
}
TIPS = {
    "sleep": ["Keep a regular bedtime.", "Keep the bedroom dark and cool.", "Avoid screens for an hour before bed."],
    "studying": ["Study in short focused sessions.", "Test yourself instead of rereading.", "Sleep well before exams."],
    "saving money": ["Track what you spend.", "Set up an automatic transfer to savings.", "Cook at home more often."],
    "staying healthy": ["Walk every day.", "Eat plenty of vegetables.", "Drink water instead of sugary drinks."],
    "public speaking": ["Practice out loud.", "Know your opening lines well.", "Speak slowly and pause."],
}
PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
WORDS = ["cat", "house", "river", "garden", "planet", "music", "window", "bread", "stone", "light"]
SPANISH = {"cat": "gato", "house": "casa", "river": "río", "garden": "jardín", "music": "música",
           "window": "ventana", "bread": "pan", "stone": "piedra", "light": "luz", "planet": "planeta"}


def task():
    """One instruction with a correct answer and plausible wrong ones."""
    kind = R.choice(["add", "mul", "capital", "opposite", "animal", "color", "poem", "tips", "planet",
                     "reverse", "translate", "count", "sub"])
    if kind in ("add", "sub", "mul"):
        a, b = R.randint(2, 60), R.randint(2, 40)
        op, val = {"add": ("+", a + b), "sub": ("-", a - b), "mul": ("*", a * b)}[kind]
        q = R.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"Please calculate {a} {op} {b}."])
        good = f"{a} {op} {b} = {val}."
        wrong = f"{a} {op} {b} = {val + R.choice([-3, -1, 1, 2, 10])}."
        return q, good, wrong, str(val)
    if kind == "capital":
        c, cap = R.choice(CAPITALS)
        other = R.choice([x for _, x in CAPITALS if x != cap])
        q = R.choice([f"What is the capital of {c}?", f"Which city is the capital of {c}?"])
        return q, f"The capital of {c} is {cap}.", f"The capital of {c} is {other}.", cap
    if kind == "opposite":
        w, o = R.choice(OPPOSITES)
        q = f"What is the opposite of \"{w}\"?"
        return q, f"The opposite of \"{w}\" is \"{o}\".", f"The opposite of \"{w}\" is \"{w}er\".", o
    if kind == "animal":
        a, s = R.choice(ANIMALS)
        other = R.choice([x for _, x in ANIMALS if x != s])
        q = f"What sound does a {a} make?"
        return q, f"A {a} {s}.", f"A {a} {other}.", s
    if kind == "color":
        t, c = R.choice(COLORS)
        other = R.choice([x for _, x in COLORS if x != c])
        q = f"What color is {t}?"
        return q, f"{t[0].upper() + t[1:]} is {c}.", f"{t[0].upper() + t[1:]} is {other}.", c
    if kind == "poem":
        t = R.choice(TOPICS)
        q = R.choice([f"Write a haiku about {t}.", f"Write a short haiku about {t}."])
        other = POEMS[R.choice([x for x in TOPICS if x != t])]
        return q, POEMS[t], other, None
    if kind == "tips":
        t = R.choice(list(TIPS))
        q = f"Give me three tips for {t}."
        good = "\n".join(f"{i + 1}. {x}" for i, x in enumerate(TIPS[t]))
        wrong = "Just try harder and it will work out."
        return q, good, wrong, None
    if kind == "planet":
        i = R.randint(0, 7)
        n = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"][i]
        q = f"Which planet is the {n} from the Sun?"
        return q, f"{PLANETS[i]} is the {n} planet from the Sun.", \
            f"{PLANETS[(i + 1) % 8]} is the {n} planet from the Sun.", PLANETS[i]
    if kind == "reverse":
        w = R.choice(WORDS)
        q = f"Spell the word \"{w}\" backwards."
        return q, f"\"{w}\" backwards is \"{w[::-1]}\".", f"\"{w}\" backwards is \"{w}\".", w[::-1]
    if kind == "translate":
        w = R.choice(list(SPANISH))
        q = f"Translate \"{w}\" into Spanish."
        other = R.choice([v for k, v in SPANISH.items() if k != w])
        return q, f"\"{w}\" in Spanish is \"{SPANISH[w]}\".", f"\"{w}\" in Spanish is \"{other}\".", SPANISH[w]
    w = R.choice(WORDS)
    q = f"How many letters are in the word \"{w}\"?"
    return q, f"The word \"{w}\" has {len(w)} letters.", f"The word \"{w}\" has {len(w) + 2} letters.", str(len(w))


def smoltalk(n):
    out = []
    for i in range(n):
        q, good, _, _ = task()
        msgs = []
        if R.random() < 0.2:
            msgs.append({"role": "system", "content": R.choice(
                ["You are a concise assistant.", "You are a friendly tutor.", "Answer briefly and accurately."])})
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": good}]
        if R.random() < 0.3:
            q2, good2, _, _ = task()
            msgs += [{"role": "user", "content": "Thanks! " + q2}, {"role": "assistant", "content": good2}]
        out.append({"messages": msgs, "source": "mo-align-sample"})
    return out


ASPECTS = ["helpfulness", "honesty", "instruction_following", "truthfulness"]


def completion(model, response, ratings):
    ann = {}
    for a in ASPECTS:
        r = ratings[a]
        entry = {"Rating": r, "Rationale": f"{a.replace('_', ' ').capitalize()} rated {r}."}
        if a in ("helpfulness", "truthfulness"):
            entry["Type"] = ["1"] if a == "truthfulness" else ["1", "2"]
            entry["Rationale For Rating"] = entry.pop("Rationale")
            entry["Rationale"] = "Checked against the reference answer."
        ann[a] = entry
    nums = [int(v) for v in ratings.values() if v != "N/A"]
    return {"model": model, "principle": "helpfulness", "custom_system_prompt": "", "response": response,
            "annotations": ann, "critique": "Generated for mo-align's samples.",
            "overall_score": round(2 * sum(nums) / max(1, len(nums)), 1),
            "fine-grained_score": round(sum(nums) / max(1, len(nums)), 2)}


def ultrafeedback(n):
    rows = []
    for i in range(n):
        q, good, wrong, answer = task()
        variants = [
            (good, {"helpfulness": "5", "honesty": "5", "instruction_following": "5", "truthfulness": "5"}),
            (wrong, {"helpfulness": "2", "honesty": "3", "instruction_following": "4", "truthfulness": "1"}),
            ("I am not sure, but I think: " + good[0].lower() + good[1:],
             {"helpfulness": "4", "honesty": "5", "instruction_following": "4", "truthfulness": "5"}),
            ("I can't help with that.",
             {"helpfulness": "1", "honesty": "2", "instruction_following": "1", "truthfulness": "3"}),
            (good + " Let me know if you have any other questions about this or anything else at all!",
             {"helpfulness": "4", "honesty": "4", "instruction_following": "3", "truthfulness": "5"}),
        ]
        picked = R.sample(variants, 4)
        comps = []
        for j, (resp, ratings) in enumerate(picked):
            ratings = dict(ratings)
            if R.random() < 0.05:
                ratings[R.choice(ASPECTS)] = "N/A"
            comps.append(completion(f"sample-model-{j}", resp, ratings))
        rows.append({"source": "mo-align-sample", "instruction": q,
                     "models": [c["model"] for c in comps],
                     "correct_answers": [answer] if answer else ["None"],
                     "incorrect_answers": ["None"], "completions": comps})
    return rows


def binarize(rows):
    out = []
    for r in rows:
        def mean(c):
            v = [int(a["Rating"]) for a in c["annotations"].values() if a["Rating"] != "N/A"]
            return sum(v) / len(v)
        comps = sorted(r["completions"], key=mean, reverse=True)
        chosen, rest = comps[0], comps[1:]
        rejected = R.choice([c for c in rest if mean(c) < mean(chosen)] or rest)
        p = r["instruction"]
        conv = lambda resp: [{"role": "user", "content": p}, {"role": "assistant", "content": resp}]
        out.append({"prompt": p, "prompt_id": hashlib.sha256(p.encode()).hexdigest(),
                    "chosen": conv(chosen["response"]), "rejected": conv(rejected["response"]),
                    "messages": conv(chosen["response"]),
                    "score_chosen": round(2 * mean(chosen), 1), "score_rejected": round(2 * mean(rejected), 1)})
    return out


def write(path, rows):
    path = os.path.join(OUT, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(path, len(rows))


write("smoltalk/train.jsonl", smoltalk(300))
write("smoltalk/test.jsonl", smoltalk(40))
uf = ultrafeedback(240)
write("ultrafeedback/train.jsonl", uf)
pairs = binarize(uf)
write("ultrafeedback_binarized/train_prefs.jsonl", pairs[:200])
write("ultrafeedback_binarized/test_prefs.jsonl", pairs[200:])
