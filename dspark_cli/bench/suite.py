"""The built-in benchmark prompts, written for dspark: two or three per category, short enough that a 2-core CPU
runs the whole suite in minutes. Categories follow Spec-Bench's so figures can be read side by side; the ones with
a passage (summarization, qa) and the edits (editing) are where prompt lookup shines, the open-ended ones (chat)
where it cannot; the short ones (answers of 16-32 tokens) are where a run that must first learn its costs loses
most, and the ones the cost model got wrong most often before (code-3, chat-3) watch its steadiness."""

from __future__ import annotations

_PASSAGE_LIGHTHOUSE = (
    "The Bell Rock Lighthouse, off the coast of Angus, Scotland, is the world's oldest surviving sea-washed "
    "lighthouse. It was built between 1807 and 1810 by Robert Stevenson on the Bell Rock, a reef that is "
    "covered by the sea at high tide. Work could only be done for a few hours at low water in summer, so the "
    "stones were cut and fitted together on shore first, then shipped out and set in place with dovetail "
    "joints. The light was first lit on 1 February 1811 and has warned ships off the reef ever since; it was "
    "automated in 1988."
)

_PASSAGE_BEES = (
    "Honey bees communicate the location of food with the waggle dance. A forager returning to the hive runs "
    "a short straight line while shaking her abdomen, then loops back and repeats. The angle of the straight "
    "run relative to vertical tells the other bees the direction of the food relative to the sun, and the "
    "length of the waggle run tells them the distance: the longer the run, the farther the flowers. Bees "
    "that follow the dance then fly out and search the indicated area."
)

_TYPOS = (
    "The quick development of small language models has changed how people think about running AI on their own "
    "computers. A few years ago, a model that could write a reasonable paragraph needed a data center; today a "
    "laptop can do it in seconds. Developers can build tools that work offline, protect user privacy, and cost "
    "nothing to run once the model is downloded. But for many everyday tasks, like summarizing a document, "
    "fixing grammer, or writing a short email, they are more then good enough."
)

_CODE = (
    "def mean(values):\n"
    "    total = 0\n"
    "    for v in values:\n"
    "        total = total + v\n"
    "    return total / len(values)\n"
)

# (id, category, prompt)
SUITE: tuple[tuple[str, str, str], ...] = (
    ("chat-1", "chat", "What are three simple ways to sleep better at night?"),
    ("chat-2", "chat", "Write a short, friendly message inviting a neighbour to a weekend barbecue."),
    ("chat-3", "chat", "Explain why the sky is blue in a short paragraph for a ten-year-old."),
    ("code-1", "code", "Write a Python function that returns True if a string is a palindrome, ignoring case and spaces."),
    ("code-2", "code", "Write a Python function `fizzbuzz(n)` that returns a list of strings for the numbers 1 to n."),
    ("code-3", "code", "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring."),
    ("summarization-1", "summarization", f"Summarize the following text in two sentences.\n\n{_PASSAGE_LIGHTHOUSE}"),
    ("summarization-2", "summarization", f"Summarize the following text in two sentences.\n\n{_PASSAGE_BEES}"),
    ("translation-1", "translation", "Translate into French: 'The train leaves at eight o'clock, so we should be at the station by half past seven.'"),
    ("translation-2", "translation", "Translate into Spanish: 'My sister lives in a small house near the river and grows tomatoes in her garden.'"),
    ("math-1", "math", "A shop sells pencils at 3 for $1. How much do 12 pencils cost? Explain step by step."),
    ("math-2", "math", "Tom has 15 apples. He gives 4 to Anna and then buys twice as many as he has left. How many apples does he have now? Think step by step."),
    ("qa-1", "qa", f"{_PASSAGE_LIGHTHOUSE}\n\nQuestion: Who built the Bell Rock Lighthouse, and when was it first lit?"),
    ("qa-2", "qa", f"{_PASSAGE_BEES}\n\nQuestion: How does the waggle dance tell other bees how far away the food is?"),
    # Short answers (16-32 tokens on a small instruct model).
    ("short-1", "short", "Name the largest planet in the solar system and say in one sentence why it is so big."),
    ("short-2", "short", "Write a one-sentence description of what a hash table is."),
    ("short-3", "short", "What does HTTP status code 404 mean? Answer in one sentence."),
    # Input-heavy: the answer mostly copies the input, where prompt lookup drafts for free.
    ("editing-1", "editing", f"Fix the typos in the following text. Reply with the corrected text only.\n\n{_TYPOS}"),
    ("editing-2", "editing", f"Add type hints and a docstring to this Python function. Reply with the code only.\n\n{_CODE}"),
)

CATEGORIES = tuple(dict.fromkeys(cat for _, cat, _ in SUITE))

# A repetitive workload (`bench --suite repetitive`): ten requests for a record of the same schema, each from a
# different short text, as a tool or an agent sends them one after another. Run in order: from the second on, the
# answers before are the best draft for the answer's shape (the drafting memory, engine/memory.py).
_RECORD = ('Extract a JSON record with the keys "name", "age", "city", "job" and "hobbies" (a list of strings) from '
           "this text. Reply with the JSON only.\n\nText: ")
_PEOPLE = (
    "Maria Lopez is 34 and works as a nurse in Madrid. She loves hiking and painting.",
    "Tom Becker, 52, teaches history in Hamburg; on weekends he sails and plays chess.",
    "Aiko Tanaka is a 27-year-old software engineer from Osaka who enjoys climbing and baking.",
    "Lucas Martin lives in Lyon. He is 41, runs a bakery, and spends his free time cycling and fishing.",
    "Priya Sharma (age 30) is an architect in Mumbai. Her hobbies are photography, yoga and travel.",
    "Olav Hansen, a 63-year-old retired pilot in Bergen, likes woodworking and bird watching.",
    "Chen Wei is 22, studies medicine in Shanghai and plays the violin and basketball.",
    "Sofia Rossi works as a lawyer in Milan. She is 45 and enjoys opera, tennis and cooking.",
    "Kwame Mensah, 38, is a farmer near Kumasi who enjoys football and storytelling.",
    "Emma Wilson is a 29-year-old journalist in Toronto; she runs marathons and knits.",
)
REPETITIVE: tuple[tuple[str, str, str], ...] = tuple(
    (f"record-{i}", "repetitive", _RECORD + text) for i, text in enumerate(_PEOPLE, 1))
