"""User-only chat prompts for training a SmolLM2 draft, built offline from templates and Python's standard library.

    python benchmarks/smollm2/chat_prompts.py OUT.jsonl [--n 3000] [--seed 0]

No dataset is downloaded. Three kinds of prompt, shuffled together:
- everyday questions: 26 question templates ("Explain {topic} in simple terms.", "Give me three tips for {activity}.",
  ...) filled with hand-written topics and activities (science, health, cooking, travel, work, history, ...);
- Python questions: a module or function of the running Python's standard library with the first line of its
  docstring ("How do I use `shutil.copytree` in Python? Its docs say: ..."), from `pydoc`-visible public names;
- rewriting tasks: a paragraph of a stdlib module's docstring to summarise, simplify or turn into a list.
The 40 hand-written prompts of benchmarks/walkthrough_prompts.jsonl are held out: any prompt equal to one of them is
dropped, and the benchmark measures on those 40 (written before, and independently of, these templates).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import sys
import warnings
from pathlib import Path

TOPICS = """photosynthesis; black holes; the water cycle; plate tectonics; vaccines; the immune system; climate change;
renewable energy; solar panels; electric cars; nuclear fission; the theory of evolution; DNA; the human heart;
sleep; dreams; meditation; inflation; compound interest; supply and demand; the stock market; cryptocurrency;
the Roman Empire; the French Revolution; the printing press; the Industrial Revolution; the Renaissance;
ancient Egypt; the Silk Road; the Cold War; the moon landing; the internet; machine learning; neural networks;
recursion; binary search; hash tables; databases; encryption; passwords; cloud computing; open source software;
version control; unit testing; the Python programming language; JavaScript; operating systems; computer memory;
black tea; coffee; sourdough bread; fermentation; composting; beekeeping; houseplants; vegetable gardening;
the Mediterranean diet; vitamin D; hydration; running; yoga; strength training; stretching; public speaking;
time management; remote work; job interviews; negotiation; leadership; writing a resume; learning a language;
reading habits; chess; the piano; jazz; photography; watercolor painting; poetry; short stories; mythology;
volcanoes; earthquakes; hurricanes; rainbows; the northern lights; the solar system; Mars; comets; gravity;
magnets; electricity; batteries; the speed of light; sound waves; the periodic table; acids and bases; rust;
bees; octopuses; dolphins; migratory birds; coral reefs; rainforests; deserts; glaciers; rivers; the ocean;
recycling; plastic pollution; urban planning; public transport; bicycles; trains; airplanes; submarines;
budgeting; saving money; renting an apartment; moving to a new city; friendship; kindness; gratitude; habits;
procrastination; stress; motivation; creativity; curiosity; critical thinking; logical fallacies; statistics;
probability; prime numbers; fractions; geometry; the Pythagorean theorem; calculus; maps; time zones; calendars""".split(";")

ACTIVITIES = """studying for exams; cooking rice; making friends; saving energy at home; writing clean code; learning
to swim; staying focused; packing for a trip; keeping a journal; taking better photos; sleeping well; eating healthy;
running a meeting; giving feedback; starting a small business; learning to draw; reading more books; staying safe
online; caring for a dog; growing tomatoes; reducing waste; writing an email; learning Python; debugging a program;
preparing for a marathon; speaking in public; managing a team; decorating a small room; baking cookies; hiking""".split(";")

TOPIC_TEMPLATES = [
    "What is {x}?",
    "Explain {x} in simple terms.",
    "Explain {x} to a ten-year-old.",
    "Give me three interesting facts about {x}.",
    "Write a short poem about {x}.",
    "What are the pros and cons of {x}?",
    "How does {x} work?",
    "Summarize the history of {x} in a few sentences.",
    "Why is {x} important?",
    "What are common misconceptions about {x}?",
    "Write a haiku about {x}.",
    "Describe {x} in one paragraph.",
    "What should a beginner know about {x}?",
    "Can you compare {x} and {y}?",
    "Write a short story that involves {x}.",
    "List five questions a student might ask about {x}.",
    "What is the connection between {x} and {y}?",
    "Give me a quiz question about {x} and its answer.",
]
ACTIVITY_TEMPLATES = [
    "Give me three tips for {x}.",
    "How do I get better at {x}?",
    "What mistakes do people make when {x}?",
    "Make a one-week plan for {x}.",
    "What do I need to get started with {x}?",
    "Write a checklist for {x}.",
    "Why do people find {x} hard?",
    "Give me a step-by-step guide to {x}.",
]
PYTHON_TEMPLATES = [
    "How do I use `{name}` in Python? Its documentation says: {doc}",
    "Show me a short example of `{name}` in Python.",
    "What does `{name}` do in Python, and when would I use it?",
    "Explain this Python function to a beginner: `{name}` ({doc})",
]
REWRITE_TEMPLATES = [
    "Summarize this in one sentence:\n\n{text}",
    "Rewrite this in simpler words:\n\n{text}",
    "Turn this into a bullet list:\n\n{text}",
    "What is the main point of this text?\n\n{text}",
]
MODULES = """string re difflib textwrap datetime calendar collections heapq bisect array copy pprint enum math cmath
decimal fractions random statistics itertools functools operator pathlib os.path fileinput stat filecmp tempfile glob
fnmatch shutil pickle copyreg shelve sqlite3 zlib gzip bz2 lzma zipfile tarfile csv configparser hashlib hmac secrets
os io time argparse logging getpass platform errno threading queue subprocess sched contextvars json base64 binascii
html urllib.parse http.client uuid socket ssl email mimetypes unittest doctest timeit trace tracemalloc dataclasses
contextlib abc atexit traceback warnings inspect typing ast dis tokenize keyword gettext locale""".split()


def clean(text: str) -> str:
    return " ".join(text.split())


def stdlib_names() -> tuple[list[tuple[str, str]], list[str]]:
    """(name, first docstring line) of public stdlib functions and classes, and docstring paragraphs to rewrite."""
    names: list[tuple[str, str]] = []
    paragraphs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for paragraph in (inspect.getdoc(module) or "").split("\n\n"):
                if 200 <= len(paragraph) <= 700 and not paragraph.lstrip().startswith(">>>"):
                    paragraphs.append(paragraph.strip())
            for attribute, value in sorted(vars(module).items()):
                if attribute.startswith("_") or not (inspect.isfunction(value) or inspect.isclass(value)):
                    continue
                if getattr(value, "__module__", "").split(".")[0] != module_name.split(".")[0]:
                    continue
                doc = (inspect.getdoc(value) or "").split("\n")[0].strip()
                if 20 <= len(doc) <= 160:
                    names.append((f"{module_name}.{attribute}", doc))
    return names, paragraphs


def build(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    topics = [clean(t) for t in TOPICS if t.strip()]
    activities = [clean(a) for a in ACTIVITIES if a.strip()]
    names, paragraphs = stdlib_names()
    held_out = {
        json.loads(line)["messages"][0]["content"]
        for line in (Path(__file__).resolve().parents[1] / "walkthrough_prompts.jsonl").read_text().splitlines()
        if line.strip()
    }
    makers = [  # (weight, maker)
        (0.55, lambda: rng.choice(TOPIC_TEMPLATES).format(x=rng.choice(topics), y=rng.choice(topics))),
        (0.15, lambda: rng.choice(ACTIVITY_TEMPLATES).format(x=rng.choice(activities))),
        (0.2, lambda: rng.choice(PYTHON_TEMPLATES).format(name=(pair := rng.choice(names))[0], doc=pair[1])),
        (0.1, lambda: rng.choice(REWRITE_TEMPLATES).format(text=rng.choice(paragraphs))),
    ]
    weights = [w for w, _ in makers]
    seen: set[str] = set()
    records = []
    while len(records) < n:
        prompt = rng.choices(makers, weights)[0][1]()
        if prompt in seen or prompt in held_out:
            continue
        seen.add(prompt)
        records.append({"messages": [{"role": "user", "content": prompt}]})
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = build(args.n, args.seed)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {args.out}", file=sys.stderr)
