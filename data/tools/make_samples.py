#!/usr/bin/env python3
"""How the bundled sample data was made (run once; its outputs are committed, mo-align never
runs this). Deterministic: the same files every time.

The demo task has a known ground truth. Every instruction has one right answer, and every
response is one of six styles whose ratings follow from rules (`configs/demo/rules.toml` states
the same rules, and `rate` below applies them, so the ratings in the data are exactly what the
rule judge gives):

  style      example                                           help hon instr truth  mean
  concise    The capital of Poland is Warsaw.                     4   4    5     5   4.50
  detailed   ... plus one more sentence                           5   4    3     5   4.25
  hedged     I am not sure, but the capital of Poland is Warsaw.  3   5    4     5   4.25
  filler     ... Let me know if you have any other questions!     4   4    3     5   4.00
  wrong      The capital of Poland is Lima.                       2   2    5     1   2.50
  refusal    I can't help with that.                              1   3    1     3   2.00

So the objectives conflict: helpfulness prefers detail, honesty prefers hedging, instruction
following prefers the concise answer. Overall (the mean) the concise answer is best.

An answer that stops early is rated as a user would rate it: one that ends mid-sentence (no
final punctuation, or a last word no sentence ends on: "... from the."), is well short of the
shortest complete answer (under three quarters of the concise answer's words: "The capital
of.") or has fewer lines than the poem or list asked for ("Unseen, it arrives,\nbends.") loses
helpfulness and instruction following, whatever else it gets right (the styles above are all
complete; a policy's answers may not be).

Half of the UltraFeedback records' wrong answers are hedged ("I am not sure, but the capital of
Poland is Lima.": 1 3 4 1). Were every hedge on a right answer, a reward model would learn the
hedge as a sign of truth, and judge a policy that stops hedging as less truthful than it is.

Writes JSON Lines in the exact Hub schemas (plus the fields the rules read):
  data/base_corpus/train.jsonl      chat records (`messages`) answered in all six styles alike:
                                    the demo base learns the task's language, not the preferences
  data/smoltalk/{train,test}.jsonl  HuggingFaceTB/smol-smoltalk: messages, source. Correct answers,
                                    a quarter each concise, detailed, hedged, padded: good SFT data with habits
  data/ultrafeedback/train.jsonl    openbmb/UltraFeedback: instruction, completions[4] with
                                    annotations.{aspect}.Rating as strings, correct_answers,
                                    incorrect_answers (+ max_words, min_words, min_lines)
  data/ultrafeedback_binarized/{train,test}_prefs.jsonl
                                    HuggingFaceH4/ultrafeedback_binarized: prompt, prompt_id,
                                    chosen, rejected, messages, scores (+ correct_answers,
                                    incorrect_answers, max_words, min_words, min_lines for the rules)
The binarized pairs are built from the openbmb records the way H4 built theirs (chosen = the best
mean rating, rejected = a random other completion), so the two join on instruction + response.
Parquet twins are written by `mo-align convert-data`.
"""
import hashlib
import json
import math
import os
import random
import re

R = random.Random(20261124)
# Which wrong answers of the UltraFeedback records are hedged is drawn from a stream of its own,
# so the tasks, styles and pairs drawn from R are the ones drawn before hedged wrong answers
# existed.
HEDGED_WRONG = random.Random(20261206)
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
          ("coal", "black"), ("a ripe tomato", "red")]
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
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
WORDS = ["cat", "house", "river", "garden", "planet", "music", "window", "bread", "stone", "light"]
SPANISH = {"cat": "gato", "house": "casa", "river": "río", "garden": "jardín", "music": "música",
           "window": "ventana", "bread": "pan", "stone": "piedra", "light": "luz", "planet": "planeta"}

HEDGE = "I am not sure, but "
HEDGE_PHRASES = ["I am not sure", "I think", "maybe"]
REFUSAL = "I can't help with that."
REFUSAL_PHRASES = ["I can't help", "I cannot help"]
# A sentence cut before its end, even when closed with a full stop ("... from the."), ends on
# one of these.
DANGLING = r"(?i)\b(a|an|the|any|some|of|to|from|in|on|at|by|for|with|into|and|or|but|if|is|are|was|has|have|its|my|your|their)\W*$"
FILLER = " Let me know if you have any other questions!"
STYLES = ["concise", "detailed", "hedged", "filler", "wrong", "refusal"]


def q(s):
    return f"\"{s}\""


def task():
    """One instruction: its concise right answer, a more detailed one, a wrong one, the strings
    that mark a right answer and every wrong answer the task admits."""
    kind = R.choice(["capital", "opposite", "animal", "color", "poem", "tips", "planet", "reverse",
                     "translate", "count"])
    if kind == "capital":
        c, cap = R.choice(CAPITALS)
        others = [x for _, x in CAPITALS if x != cap]
        ask = R.choice([f"What is the capital of {c}?", f"Which city is the capital of {c}?"])
        good = f"The capital of {c} is {cap}."
        return (ask, good, good + f" {cap} is where the government of {c} meets.",
                f"The capital of {c} is {R.choice(others)}.", [cap], others)
    if kind == "opposite":
        w, o = R.choice(OPPOSITES)
        others = [q(x) for p in OPPOSITES for x in p if x not in (w, o)] + [q(w + "er")]
        good = f"The opposite of {q(w)} is {q(o)}."
        return (f"What is the opposite of {q(w)}?", good, good + " The two words mean contrary things.",
                f"The opposite of {q(w)} is {R.choice(others)}.", [q(o)], others)
    if kind == "animal":
        a, s = R.choice(ANIMALS)
        others = [x for _, x in ANIMALS if x != s]
        good = f"A {a} {s}."
        return (f"What sound does a {a} make?", good, good + f" That is how a {a} calls to others.",
                f"A {a} {R.choice(others)}.", [s], others)
    if kind == "color":
        t, c = R.choice(COLORS)
        others = [x for _, x in COLORS if x != c]
        subject = t[0].upper() + t[1:]
        good = f"{subject} is {c}."
        return (f"What color is {t}?", good, good + " Most people would describe it that way.",
                f"{subject} is {R.choice(others)}.", [c], others)
    if kind == "poem":
        t = R.choice(TOPICS)
        others = [POEMS[x].split("\n")[0] for x in TOPICS if x != t]
        ask = R.choice([f"Write a haiku about {t}.", f"Write a short haiku about {t}."])
        wrong = POEMS[R.choice([x for x in TOPICS if x != t])]
        return (ask, POEMS[t], POEMS[t] + "\nThe lines follow the five, seven, five pattern.",
                wrong, [POEMS[t].split("\n")[0]], others)
    if kind == "tips":
        t = R.choice(list(TIPS))
        good = "\n".join(f"{i + 1}. {x}" for i, x in enumerate(TIPS[t]))
        others = ["Just try harder"] + [v[0] for k, v in TIPS.items() if k != t]
        return (f"Give me three tips for {t}.", good, good + "\nSmall steps every day add up over time.",
                "Just try harder and it will work out.", [TIPS[t][0]], others)
    if kind == "planet":
        i = R.randint(0, 7)
        n = ORDINALS[i]
        others = [p for p in PLANETS if p != PLANETS[i]]
        good = f"{PLANETS[i]} is the {n} planet from the Sun."
        return (f"Which planet is the {n} from the Sun?", good,
                good + f" {PLANETS[i]} is one of the eight planets of the Solar System.",
                f"{R.choice(others)} is the {n} planet from the Sun.", [PLANETS[i]], others)
    if kind == "reverse":
        w = R.choice(WORDS)
        others = [f"backwards is {q(w)}"] + [q(x[::-1]) for x in WORDS if x != w]
        good = f"{q(w)} backwards is {q(w[::-1])}."
        return (f"Spell the word {q(w)} backwards.", good, good + " The letters are read from last to first.",
                f"{q(w)} backwards is {q(w)}.", [q(w[::-1])], others)
    if kind == "translate":
        w = R.choice(list(SPANISH))
        others = [q(v) for k, v in SPANISH.items() if k != w]
        good = f"{q(w)} in Spanish is {q(SPANISH[w])}."
        return (f"Translate {q(w)} into Spanish.", good, good + " It is a common word in Spanish.",
                f"{q(w)} in Spanish is {R.choice(others)}.", [q(SPANISH[w])], others)
    w = R.choice(WORDS)
    n = len(w)
    others = [f"{k} letters" for k in range(2, 9) if k != n]
    good = f"The word {q(w)} has {n} letters."
    return (f"How many letters are in the word {q(w)}?", good,
            good + f" Counted one by one: {'-'.join(w)}.", f"The word {q(w)} has {n + 2} letters.",
            [f"{n} letters"], others)


def words(s):
    return len(s.split())


def hedge(answer):
    return HEDGE + answer[0].lower() + answer[1:]


def styled(style, t):
    """The response of `style` to task `t`."""
    _, good, detailed, wrong, _, _ = t
    return {"concise": good, "detailed": detailed, "hedged": hedge(good), "filler": good + FILLER,
            "wrong": wrong, "refusal": REFUSAL}[style]


def lines(s):
    return sum(1 for x in s.split("\n") if x.strip())


def rate(response, correct_answers, incorrect_answers, max_words, min_words, min_lines):
    """The ground-truth ratings: the rules of configs/demo/rules.toml, applied in Python."""
    low = response.lower()
    has = lambda xs: any(x.lower() in low for x in xs)
    right, wrong = has(correct_answers), has(incorrect_answers)
    hedged, refused, filler = has(HEDGE_PHRASES), has(REFUSAL_PHRASES), "let me know" in low
    long = words(response) > max_words
    unfinished = (re.search(r'[.!?]"?\s*$', response) is None) + (re.search(DANGLING, response) is not None) \
        + (words(response) < min_words) + (lines(response) < min_lines)
    clamp = lambda x: max(1, min(5, x))
    return {
        "helpfulness": clamp(4 + long - filler - hedged - 2 * wrong - 3 * refused - 3 * unfinished),
        "honesty": clamp(4 + hedged - 2 * wrong - refused),
        "instruction_following": clamp(5 - 2 * long - hedged - 4 * refused - 4 * unfinished),
        "truthfulness": clamp(3 + 2 * right - 2 * wrong),
    }


def fields(t):
    """What the rules read from a prompt record."""
    _, good, _, _, correct, incorrect = t
    return {"correct_answers": correct, "incorrect_answers": incorrect, "max_words": words(good) + 5,
            "min_words": math.ceil(0.75 * words(good)), "min_lines": lines(good)}


SYSTEMS = ["You are a concise assistant.", "You are a friendly tutor.", "Answer briefly and accurately."]


def chat(n, style_of):
    out = []
    for _ in range(n):
        t = task()
        msgs = []
        if R.random() < 0.2:
            msgs.append({"role": "system", "content": R.choice(SYSTEMS)})
        msgs += [{"role": "user", "content": t[0]}, {"role": "assistant", "content": styled(style_of(), t)}]
        if R.random() < 0.2:
            t2 = task()
            msgs += [{"role": "user", "content": "Thanks! " + t2[0]},
                     {"role": "assistant", "content": styled(style_of(), t2)}]
        out.append({"messages": msgs, "source": "mo-align-sample"})
    return out


def sft_style():
    return R.choices(["concise", "detailed", "hedged", "filler"], weights=[25, 25, 25, 25])[0]


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
    for _ in range(n):
        t = task()
        f = fields(t)
        styles = R.sample(STYLES, 4)
        responses = [styled(style, t) for style in styles]
        if "wrong" in styles and HEDGED_WRONG.random() < 0.5:
            j = styles.index("wrong")
            responses[j] = hedge(responses[j])
        comps = []
        for j, resp in enumerate(responses):
            ratings = {k: str(v) for k, v in rate(resp, **f).items()}
            if R.random() < 0.03:
                ratings[R.choice(ASPECTS)] = "N/A"
            comps.append(completion(f"sample-model-{j}", resp, ratings))
        rows.append({"source": "mo-align-sample", "instruction": t[0],
                     "models": [c["model"] for c in comps], "completions": comps, **f})
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
                    "score_chosen": round(2 * mean(chosen), 1), "score_rejected": round(2 * mean(rejected), 1),
                    **{k: r[k] for k in ("correct_answers", "incorrect_answers", "max_words", "min_words",
                                         "min_lines")}})
    return out


def write(path, rows):
    path = os.path.join(OUT, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(path, len(rows))


write("base_corpus/train.jsonl", chat(4000, lambda: R.choice(STYLES)))
write("smoltalk/train.jsonl", chat(800, sft_style))
write("smoltalk/test.jsonl", chat(60, sft_style))
uf = ultrafeedback(560)
write("ultrafeedback/train.jsonl", uf)
pairs = binarize(uf)
write("ultrafeedback_binarized/train_prefs.jsonl", pairs[:480])
write("ultrafeedback_binarized/test_prefs.jsonl", pairs[480:])
