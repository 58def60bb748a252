"""Generate sample_data/articles.{csv,parquet}: 300 short, fictional news articles; and
sample_data/products.csv with a picture of each product in sample_data/products/.

The articles are composed from templates and word pools with a seeded RNG, so the files are
identical on every run, yet varied and realistic enough (3-6 sentences, 60-140 words, seven
topics) to exercise prompts, token counts and costs. The pictures are flat drawings (a few
shapes on a plain background) of several sizes, rasterized and written as PNG by the standard
library alone, a few KB each. Run: ``python sample_data/make_sample_data.py``.
"""

from __future__ import annotations

import math
import random
import re
import struct
import zlib
from pathlib import Path

import polars as pl

SEED = 20240611
N_ARTICLES = 300
MIN_WORDS, MAX_WORDS = 60, 140
OUT_DIR = Path(__file__).resolve().parent

FIRST_NAMES = [
    "Maria", "Tomasz", "Aisha", "Daniel", "Ingrid", "Kenji", "Lucia", "Samuel", "Priya", "Oliver",
    "Fatima", "Henrik", "Chloe", "Mateo", "Grace", "Rafael", "Yara", "Nikolai", "Elena", "Kwame",
    "Sofia", "Arjun", "Hannah", "Luca", "Amara", "Jonas", "Mei", "Victor", "Leila", "Patrick",
]  # fmt: skip
LAST_NAMES = [
    "Okafor", "Lindqvist", "Moreau", "Castellanos", "Whitfield", "Nakamura", "Brandt", "Osei",
    "Varga", "Delgado", "Kowalski", "Haddad", "Fairbairn", "Mendes", "Ivanova", "Achebe", "Holm",
    "Sato", "Romero", "Baptiste", "Quinn", "Farrow", "Adeyemi", "Rossi", "Thorne", "Kaur",
]  # fmt: skip
CITIES = [
    "Lisbon", "Rotterdam", "Nairobi", "Osaka", "Valparaiso", "Leeds", "Gdansk", "Porto Alegre",
    "Tampere", "Adelaide", "Winnipeg", "Marseille", "Pune", "Bergen", "Cork", "Da Nang",
    "Graz", "Halifax", "Kraków", "Accra", "Brno", "Malmö", "Tucson", "Hobart",
]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# Per topic: pools for {org}, {thing} and {move} (fixed within an article), then title and
# sentence templates by slot. Quotes start with '"' and always name a new speaker.
TOPICS: dict[str, dict[str, list[str]]] = {
    "business": {
        "org": ["Halvorsen Freight", "Brightwater Foods", "Corvid Logistics", "Meridian Textiles",
                "Tallis & Crane", "Northgate Retail", "Ambergate Brewing", "Solace Insurance"],
        "thing": ["quarterly profit", "annual revenue", "online sales", "export orders",
                  "operating profit", "wholesale revenue"],
        "move": ["cut 400 jobs", "open a second factory", "sell its shipping arm", "buy a regional rival",
                 "raise prices for the first time in three years", "move its headquarters"],
        "title": ["{org} to {move}", "{org} shares jump as {thing} figures beat forecasts",
                  "{org} warns of weaker {thing}", "Investors cool on {org} after weak {thing} figures",
                  "{org} plans to {move} after a tough year"],
        "lead": ["{org} said on {day} that it would {move}, as {thing} fell {pct} in the latest quarter.",
                 "Shares in {org} rose {pct} on {day} after the company reported {thing} well ahead of "
                 "analyst expectations.",
                 "{org}, the {city}-based group, plans to {move} after a difficult year.",
                 "The board of {org} has agreed to {move}, chief executive {person} told staff on {day}."],
        "detail": ["The company reported {thing} of {money}, compared with {money2} a year earlier.",
                   "Costs for energy and raw materials rose by {pct} over the same period.",
                   "About {n} staff in {city} are expected to be affected by the change.",
                   "Its order book stood at {money} at the end of the quarter, the highest level since "
                   "the company listed on the stock market.",
                   "The group also cut its dividend and said it would pay down part of its debt."],
        "quote": ["\"We are making hard choices now so that we can grow again,\" said chief executive "
                  "{person}.",
                  "\"Demand has held up better than we feared,\" finance director {person} told reporters.",
                  "\"The strategy looks sensible, but the execution has been patchy,\" said {person}, an "
                  "analyst who has followed the company for a decade."],
        "background": ["The firm has struggled since a failed expansion into overseas markets.",
                       "Rivals have faced similar pressure from higher borrowing costs.",
                       "Unions said they had not been consulted before the announcement.",
                       "The company was founded in {city} in the 1950s and still makes most of its "
                       "products there."],
        "outlook": ["Analysts expect a clearer picture when full-year results are published.",
                    "The board will present a detailed plan to shareholders next month.",
                    "Management said it expected trading to improve in the second half of the year."],
    },
    "science": {
        "org": ["the University of Eastmoor", "the Kestrel Institute", "the Hallam Marine Lab",
                "the Corrigan Observatory", "the Vantor Centre for Genomics", "Lowell Polytechnic"],
        "thing": ["a previously unknown species of deep-sea worm", "unusual radio bursts",
                  "a protein that slows cell ageing", "microplastics in glacier ice",
                  "a faint ring around a distant planet", "bacteria that digest nylon"],
        "move": ["mapped the ocean floor", "sequenced ancient seeds", "tracked migrating bats",
                 "simulated early galaxy formation", "measured soil carbon"],
        "title": ["Researchers report {thing}", "Scientists at {org} find {thing}",
                  "New method sheds light on {thing_bare}", "Study of {thing_bare} surprises experts",
                  "How a small team in {city} found {thing}"],
        "lead": ["Researchers at {org} say they have identified {thing}, a result that could change how "
                 "the field is studied.",
                 "A team led by {person} of {org} has {move} and, along the way, found {thing}.",
                 "Scientists have found {thing} during a survey near {city}.",
                 "A study from {org}, published on {day}, describes {thing} in unprecedented detail."],
        "detail": ["The study analysed {n} samples collected over six years.",
                   "Measurements were repeated at three sites to rule out contamination.",
                   "The effect was roughly {pct} stronger than earlier models had predicted.",
                   "The instruments used cost less than {money_small} each, a fraction of the price of "
                   "commercial equipment, which allowed the team to deploy dozens of them."],
        "quote": ["\"We honestly did not expect to see this at all,\" said {person}, the lead author.",
                  "\"It is a small step, but it opens a lot of doors,\" said {person}.",
                  "\"The data are striking, though I would like to see them replicated,\" said {person}, "
                  "who was not involved in the research."],
        "background": ["Similar claims in the past have proved hard to reproduce.",
                       "Funding for the project came from a public research council.",
                       "Independent experts called the work careful but preliminary.",
                       "The field has grown quickly over the past decade as sensors and computing power "
                       "have become cheaper."],
        "outlook": ["The group now hopes to repeat the experiment with a larger sample.",
                    "Further results are expected before the end of next year.",
                    "The raw data will be made freely available to other researchers."],
    },
    "sport": {
        "org": ["Riverton Rovers", "the Halden Hawks", "Eastport United", "the Cobalt Giants",
                "Marlow Athletic", "the Kingsbay Sharks", "Ardley City", "the Northfield Bears"],
        "thing": ["the cup final", "the league title", "a play-off place", "promotion",
                  "the regional championship"],
        "move": ["came from behind", "held on with ten players", "won on penalties",
                 "scored twice in the final minutes", "kept a clean sheet for the fifth time"],
        "title": ["{org} edge closer to {thing}", "Late drama in {city} as {org} chase {thing}",
                  "{person} inspires {org}", "{org} stunned in {city}", "Five things we learned as {org} "
                  "push for {thing}"],
        "lead": ["{org} {move} on {day} to keep their hopes of {thing} alive.",
                 "{person} was the hero as {org} {move} in front of a crowd of {n} in {city}.",
                 "{org} suffered a surprise defeat in {city}, leaving their push for {thing} in doubt.",
                 "In a match few will forget, {org} {move} against their oldest rivals on {day}."],
        "detail": ["The visitors had most of the possession but created few clear chances.",
                   "The decisive goal came eleven minutes from time after a quick counter-attack.",
                   "Two players were booked in a tense second half.",
                   "The goalkeeper made three fine saves before half-time, including one from close "
                   "range that drew applause even from the away fans."],
        "quote": ["\"The lads showed real character tonight,\" said head coach {person}.",
                  "\"We have to be honest, that was not good enough,\" captain {person} admitted.",
                  "\"I have waited my whole career for a night like this,\" said {person}."],
        "background": ["The side finished in mid-table last season after a string of injuries.",
                       "It was their first win at the ground in almost a decade.",
                       "Ticket prices have been a point of friction with supporters this year.",
                       "The club changed owners in the summer and has spent heavily on young players."],
        "outlook": ["They travel to {city2} next weekend for another crucial match.",
                    "The club will assess two injured players before the next fixture.",
                    "Three games remain, and every point now matters."],
    },
    "politics": {
        "org": ["the city council", "the regional assembly", "the transport committee",
                "the Green Alliance", "the Civic Party", "the finance ministry", "the Labour Forum"],
        "thing": ["a plan to expand cycle lanes", "a tax on empty homes", "changes to school funding",
                  "a ban on short-term rentals", "new rules for political donations",
                  "a cut in public transport fares"],
        "move": ["approved", "rejected", "delayed a vote on", "proposed", "narrowly passed"],
        "title": ["Vote on {thing_bare} delayed again", "{org} backs {thing}", "Row erupts over {thing}",
                  "{person} defends {thing}", "What {thing} would mean for {city}"],
        "lead": ["Members of {org} {move} {thing} on {day} after a heated debate.",
                 "{person}, a senior figure in {org}, has {move} {thing} for {city}.",
                 "Lawmakers in {city} have {move} {thing}, a measure that divided residents.",
                 "After months of wrangling, {org} has {move} {thing}."],
        "detail": ["The measure passed by {n} votes to {n2}, with several abstentions.",
                   "Officials estimate the policy will cost about {money} over four years.",
                   "A public consultation drew more than {n} written responses.",
                   "Under the plan, the first changes would take effect in January, with a review after "
                   "two years and a commitment to publish the results."],
        "quote": ["\"This is about fairness for ordinary families,\" said {person}.",
                  "\"The numbers simply do not add up,\" opposition spokesperson {person} said.",
                  "\"People are tired of promises; they want to see results,\" said {person}, who runs a "
                  "residents' association in the city."],
        "background": ["The proposal was first floated during last year's election campaign.",
                       "Business groups have lobbied hard against the change.",
                       "Polls suggest the public is split roughly down the middle.",
                       "The governing coalition holds a majority of just two seats."],
        "outlook": ["A final decision is expected before the summer recess.",
                    "Critics have promised to challenge the decision in court.",
                    "The issue is likely to feature prominently in next year's election."],
    },
    "tech": {
        "org": ["Corvid Systems", "Lumen Labs", "Parallax Devices", "Quillstack", "Orbitly", "Nimbus Forge",
                "Tessellate AI", "Brightpath Software"],
        "thing": ["a foldable tablet", "an open-source database", "a low-power AI chip",
                  "a password-free login system", "a home battery", "a translation earbud"],
        "move": ["delayed the launch of", "unveiled", "recalled", "open-sourced", "cut the price of"],
        "title": ["{org} bets on {thing}", "First look at the {thing_bare} from {org}",
                  "{org} faces questions over {thing_bare}", "Why the {thing_bare} matters for {org}",
                  "Inside {org}'s race to build {thing}"],
        "lead": ["{org} has {move} {thing}, the company announced on {day}.",
                 "Start-up {org} {move} {thing} at an event in {city} attended by {n} developers.",
                 "{org} says its new {thing_bare} uses {pct} less energy than the previous model.",
                 "Two years after promising it, {org} has {move} {thing}."],
        "detail": ["Pricing starts at {money_small} a year for business customers, the company said.",
                   "Early testers reported problems with battery life and software updates.",
                   "The company has raised {money} from investors since it was founded.",
                   "Engineers spent most of the past year rewriting the software from scratch after "
                   "early versions proved too slow on older hardware."],
        "quote": ["\"We built this for people who are tired of complicated gadgets,\" said founder "
                  "{person}.",
                  "\"The hardware is impressive, but the software still feels unfinished,\" said analyst "
                  "{person}.",
                  "\"Nobody needs another gadget; they need one that actually works,\" said {person}."],
        "background": ["Regulators have recently stepped up scrutiny of data collection by device makers.",
                       "Competition in the sector has intensified as prices have fallen.",
                       "The firm employs about {n} people, most of them engineers.",
                       "Larger rivals have tried and failed to launch similar products."],
        "outlook": ["A wider release is planned for later in the year.",
                    "The company said more features would arrive in a free update.",
                    "Investors will be watching sales figures closely over the holiday season."],
    },
    "health": {
        "org": ["St Brigid's Hospital", "the National Health Agency", "Harbourside Clinic",
                "the Westmere Medical Trust", "the Institute for Child Health"],
        "thing": ["a new screening programme for diabetes", "a nasal flu vaccine",
                  "longer waiting times for hip surgery", "a rise in measles cases",
                  "a trial of walking groups for heart patients", "a shortage of nurses"],
        "move": ["launched", "expanded", "paused", "reported", "warned about"],
        "title": ["Spotlight on {thing} in {city}", "Doctors divided over {thing}",
                  "{org} under pressure over {thing}", "What {thing} means for patients",
                  "Explained: {thing}"],
        "lead": ["{org} has {move} {thing}, officials said on {day}.",
                 "Doctors in {city} have {move} {thing}, prompting calls for more funding.",
                 "Health officials say {thing} could affect {n} patients each year.",
                 "Amid growing concern in {city}, {org} has {move} {thing}."],
        "detail": ["Figures show an increase of {pct} compared with the same period last year.",
                   "The programme will initially run in {n} clinics across the region.",
                   "Around {money} has been set aside to cover the first two years.",
                   "Patients will be contacted by letter and offered an appointment at a clinic near "
                   "their home, with evening slots for those who work."],
        "quote": ["\"Early diagnosis saves lives, it is that simple,\" said Dr {person}.",
                  "\"Staff are doing their best under enormous pressure,\" said {person}, a senior nurse.",
                  "\"I waited eight months and nobody could tell me why,\" said {person}, a patient."],
        "background": ["The service has faced rising demand from an ageing population.",
                       "Similar schemes abroad have reported encouraging results.",
                       "Patient groups have campaigned on the issue for several years.",
                       "Recruitment has been difficult since training places were cut a decade ago."],
        "outlook": ["An independent review of the results is planned for next spring.",
                    "Officials urged anyone with symptoms to contact their doctor.",
                    "Ministers are expected to respond to the figures within weeks."],
    },
    "culture": {
        "org": ["the Galloway Museum", "the Lanternlight Festival", "the Royal Theatre",
                "the Ashcombe Gallery", "the City Philharmonic", "the Harbour Film Festival"],
        "thing": ["a retrospective of forgotten women painters", "a new opera about migration",
                  "an exhibition of Viking jewellery", "a documentary about night-shift workers",
                  "a restored silent film", "a season of plays by young writers"],
        "move": ["opened", "premiered", "announced", "extended the run of"],
        "title": ["Review: {thing_bare}", "Crowds flock to {thing} at {org}", "{person} on {thing}",
                  "{org} unveils {thing}", "Behind the scenes of {thing}"],
        "lead": ["{org} {move} {thing} on {day}, drawing praise from critics.",
                 "Curator {person} has {move} {thing} at {org} in {city}.",
                 "Visitors queued for hours as {org} {move} {thing}.",
                 "It has been a long time coming, but {org} has finally {move} {thing}."],
        "detail": ["More than {n} tickets were sold in the first week.",
                   "The project took almost five years and cost {money_small} per seat to stage.",
                   "Several works have never been shown in public before.",
                   "Admission is free for under-18s, and there are guided tours every afternoon, some of "
                   "them in sign language."],
        "quote": ["\"I wanted to tell a story that people would recognise,\" said {person}.",
                  "\"It is bold, moving and occasionally baffling,\" wrote critic {person}.",
                  "\"My grandmother would have loved this,\" said {person}, a visitor from {city2}."],
        "background": ["Arts funding in the region has been cut twice in three years.",
                       "The venue reopened last year after a long renovation.",
                       "Organisers hope the event will attract younger audiences.",
                       "Attendance at galleries and theatres has only recently returned to earlier levels."],
        "outlook": ["The show moves to {city2} in the autumn.",
                    "A second run is already being discussed.",
                    "It runs until the end of the month."],
    },
}  # fmt: skip
SLOTS = ["lead", "detail", "quote", "background", "detail", "outlook"]
# Optional clauses and openers, so sentence lengths and rhythms vary between articles.
ASIDES = [
    ", according to people familiar with the matter", ", although details are still to be confirmed",
    ", a spokesperson confirmed on {day}", ", in a move that surprised many observers",
    ", local media reported", ", according to figures released on {day}",
    ", the latest sign of a difficult period in {city2}", " despite months of uncertainty",
]  # fmt: skip
OPENERS = ["However, ", "Meanwhile, ", "At the same time, ", "Separately, ", "Even so, "]
PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _fill(template: str, pools: dict[str, list[str]], facts: dict[str, str], rng: random.Random) -> str:
    """Replace placeholders; the article's own facts (org, thing, person, ...) stay fixed in it."""

    def value(match: re.Match[str]) -> str:
        key = match[1]
        if key in facts:
            return facts[key]
        if key in pools:
            return rng.choice(pools[key])
        if key == "person":
            return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if key in ("city", "city2"):
            return rng.choice(CITIES)
        if key == "day":
            return rng.choice(DAYS)
        if key in ("n", "n2"):
            return f"{rng.randrange(12, 4800):,}"
        if key == "pct":
            return f"{rng.randrange(3, 41)} percent"
        if key in ("money", "money2"):
            return f"${rng.randrange(12, 950)} million"
        if key == "money_small":
            return f"${rng.randrange(49, 1400):,}"
        raise KeyError(key)

    text = PLACEHOLDER.sub(value, template)
    return text[0].upper() + text[1:]


def _sentence(template: str, slot: str, pools: dict[str, list[str]], facts: dict[str, str],
              rng: random.Random) -> str:  # fmt: skip
    if template.startswith('"'):
        return _fill(template, pools, {k: v for k, v in facts.items() if k != "person"}, rng)
    sentence = _fill(template, pools, facts, rng)
    if rng.random() < 0.3:
        sentence = sentence[:-1] + _fill(rng.choice(ASIDES), pools, facts, rng) + "."
    if slot == "background" and rng.random() < 0.4:
        sentence = rng.choice(OPENERS) + sentence[0].lower() + sentence[1:]
    return sentence


def make_article(rng: random.Random, topic: str) -> tuple[str, str]:
    """One (title, text) pair: a lead sentence, then 2-5 more slots in a natural order."""
    pools = TOPICS[topic]
    thing = rng.choice(pools["thing"])
    facts = {
        "org": rng.choice(pools["org"]),
        "thing": thing,
        "thing_bare": re.sub(r"^(?:a|an|the) ", "", thing),
        "move": rng.choice(pools["move"]),
        "person": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "city": rng.choice(CITIES),
    }
    while True:
        slots = ["lead"] + [SLOTS[i] for i in sorted(rng.sample(range(1, len(SLOTS)), rng.randint(2, 5)))]
        templates: list[str] = []
        for slot in slots:
            fresh = [t for t in pools[slot] if t not in templates]
            templates.append(rng.choice(fresh))
        text = " ".join(_sentence(t, s, pools, facts, rng) for t, s in zip(templates, slots, strict=True))
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            break
    return _fill(rng.choice(pools["title"]), pools, facts, rng), text


def make_articles(n: int = N_ARTICLES, seed: int = SEED) -> pl.DataFrame:
    """``n`` articles cycling through the topics, shuffled, with ids 1..n."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    rows = [make_article(rng, topics[i % len(topics)]) for i in range(n)]
    rng.shuffle(rows)
    return pl.DataFrame(
        {"id": range(1, n + 1), "title": [t for t, _ in rows], "text": [x for _, x in rows]},
        schema={"id": pl.Int64, "title": pl.String, "text": pl.String},
    )


# --- product pictures ---------------------------------------------------------------------------

Color = tuple[int, int, int]
# A shape in a picture: ("rect" | "ellipse" | "triangle", x0, y0, x1, y1, color), in fractions of
# the picture's width and height; a triangle points up, its apex above the middle of its base.
Shape = tuple[str, float, float, float, float, Color]

BACKGROUND: Color = (244, 242, 238)
SHADOW: Color = (214, 211, 205)
COLORS: dict[str, Color] = {
    "red": (196, 48, 43), "blue": (43, 92, 176), "green": (58, 140, 76), "yellow": (232, 186, 46),
    "black": (40, 40, 44), "white": (252, 252, 250), "orange": (226, 120, 40), "teal": (38, 150, 150),
}  # fmt: skip
DRAWINGS: dict[str, list[tuple[str, float, float, float, float, str | None]]] = {
    # None: the product's color; a name: that color
    "mug": [("rect", 0.30, 0.25, 0.62, 0.80, None), ("ellipse", 0.55, 0.38, 0.75, 0.65, None),
            ("ellipse", 0.60, 0.44, 0.69, 0.59, "bg")],
    "bottle": [("rect", 0.44, 0.12, 0.56, 0.32, None), ("rect", 0.36, 0.30, 0.64, 0.85, None),
               ("rect", 0.36, 0.48, 0.64, 0.62, "white")],
    "lamp": [("triangle", 0.30, 0.15, 0.70, 0.45, None), ("rect", 0.485, 0.45, 0.515, 0.78, "black"),
             ("rect", 0.38, 0.78, 0.62, 0.84, "black")],
    "ball": [("ellipse", 0.28, 0.22, 0.72, 0.80, None), ("rect", 0.28, 0.49, 0.72, 0.53, "white")],
    "box": [("rect", 0.25, 0.30, 0.75, 0.82, None), ("rect", 0.25, 0.30, 0.75, 0.40, "black"),
            ("rect", 0.47, 0.40, 0.53, 0.82, "yellow")],
    "backpack": [("rect", 0.32, 0.22, 0.68, 0.84, None), ("ellipse", 0.32, 0.12, 0.68, 0.34, None),
                 ("rect", 0.38, 0.55, 0.62, 0.76, "black")],
}  # fmt: skip
PRODUCTS: list[tuple[str, str, str, tuple[int, int]]] = [
    # (name, drawing, color, size in pixels): the sizes span one to four 512 x 512 tiles
    ("Stoneware mug", "mug", "blue", (320, 240)), ("Travel mug", "mug", "black", (640, 480)),
    ("Espresso cup", "mug", "white", (256, 256)), ("Breakfast mug", "mug", "yellow", (800, 600)),
    ("Glass water bottle", "bottle", "teal", (240, 320)), ("Steel flask", "bottle", "black", (480, 640)),
    ("Olive oil bottle", "bottle", "green", (300, 400)), ("Sports bottle", "bottle", "orange", (600, 800)),
    ("Desk lamp", "lamp", "red", (400, 400)), ("Reading lamp", "lamp", "green", (640, 640)),
    ("Bedside lamp", "lamp", "white", (512, 384)), ("Floor lamp", "lamp", "black", (600, 800)),
    ("Football", "ball", "white", (320, 320)), ("Beach ball", "ball", "yellow", (500, 500)),
    ("Basketball", "ball", "orange", (640, 480)), ("Bowling ball", "ball", "blue", (800, 600)),
    ("Gift box", "box", "red", (400, 300)), ("Storage box", "box", "teal", (640, 480)),
    ("Shoe box", "box", "orange", (512, 512)), ("Moving box", "box", "yellow", (800, 600)),
    ("School backpack", "backpack", "blue", (300, 400)), ("Hiking backpack", "backpack", "green", (480, 640)),
    ("City backpack", "backpack", "black", (384, 512)), ("Kids' backpack", "backpack", "red", (600, 800)),
]  # fmt: skip


def _spans(shape: Shape, y: float, width: int, height: int) -> tuple[int, int] | None:
    """The pixels [start, end) of row `y` (a fraction) that `shape` covers, if any."""
    kind, x0, y0, x1, y1, _ = shape
    if not y0 <= y < y1:
        return None
    if kind == "rect":
        left, right = x0, x1
    elif kind == "ellipse":
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        half = rx * math.sqrt(max(0.0, 1 - ((y - cy) / ry) ** 2))
        left, right = cx - half, cx + half
    else:  # triangle, apex up
        half = (x1 - x0) / 2 * (y - y0) / (y1 - y0)
        left, right = (x0 + x1) / 2 - half, (x0 + x1) / 2 + half
    start, end = round(left * width), round(right * width)
    return (start, end) if end > start else None


def draw(shapes: list[Shape], width: int, height: int) -> bytes:
    """The picture as PNG scanlines (filter byte 0, then RGB): the background, a shadow under
    the product, then each shape over the ones before it."""
    shadow: Shape = ("ellipse", 0.22, 0.83, 0.78, 0.93, SHADOW)
    lines = []
    for row in range(height):
        y = (row + 0.5) / height
        line = bytearray(bytes(BACKGROUND) * width)
        for shape in (shadow, *shapes):
            span = _spans(shape, y, width, height)
            if span is not None:
                start, end = span
                line[start * 3 : end * 3] = bytes(shape[5]) * (end - start)
        lines.append(b"\0" + bytes(line))
    return b"".join(lines)


def png(width: int, height: int, scanlines: bytes, level: int = 9) -> bytes:
    """A PNG file of 8-bit RGB scanlines (each led by its filter byte), zlib at `level`."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines, level))
        + chunk(b"IEND", b"")
    )


def make_products(folder: Path) -> pl.DataFrame:
    """Draw each product into `folder`; the table of them, its `photo` relative to OUT_DIR."""
    folder.mkdir(exist_ok=True)
    rows = []
    for i, (name, drawing, color, (width, height)) in enumerate(PRODUCTS, 1):
        shapes: list[Shape] = [
            (kind, x0, y0, x1, y1, BACKGROUND if c == "bg" else COLORS[c or color])
            for kind, x0, y0, x1, y1, c in DRAWINGS[drawing]
        ]
        file = folder / f"{i:02d}-{drawing}-{color}.png"
        file.write_bytes(png(width, height, draw(shapes, width, height)))
        rows.append((i, name, drawing, f"{folder.name}/{file.name}"))
    return pl.DataFrame(
        rows, schema={"id": pl.Int64, "name": pl.String, "kind": pl.String, "photo": pl.String}, orient="row"
    )


def main() -> None:
    articles = make_articles()
    articles.write_csv(OUT_DIR / "articles.csv")
    articles.write_parquet(OUT_DIR / "articles.parquet")
    words = articles["text"].str.split(" ").list.len()
    print(f"wrote {articles.height} articles ({words.min()}-{words.max()} words) to {OUT_DIR}")
    products = make_products(OUT_DIR / "products")
    products.write_csv(OUT_DIR / "products.csv")
    size = sum(f.stat().st_size for f in (OUT_DIR / "products").iterdir())
    print(f"wrote {products.height} products and their pictures ({size / 1000:.0f} KB) to {OUT_DIR}")


if __name__ == "__main__":
    main()
