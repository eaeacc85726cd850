"""Embedded demo corpus: a synthetic stand-in for a provider's private chat logs.

Why: ``dpray demo`` must run offline, with no download and no real user data, yet the
pipeline (user-level DP, PII scrubbing, topic clustering, contribution bounding) only makes
sense on data that looks like real chat logs. This module composes a few thousand varied user
instructions from hand-written templates across ~40 everyday and technical topics, with
a skewed (Zipf-like) user distribution, per-user topic preferences and writing styles, and
a controlled share (~20%) of records carrying clearly *fake* personal details (names,
``example.*`` / ``mail.test`` emails, ``555-01xx`` phone numbers, ``TEST`` IBANs, street
addresses in made-up towns, dates of birth, medications and conditions).

Everything is generated from a fixed seed with a local ``random.Random`` (never global
state), so the same ``(n, seed, num_users)`` always yields the same corpus. All template
text was written for this project; nothing is copied from any dataset.
"""

from __future__ import annotations

import json
import pathlib
import random
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "PII_SHARE",
    "TOPICS",
    "generate_demo_records",
    "generate_tagged_records",
    "write_demo_jsonl",
]

#: Exact fraction of records that carry fake personal details.
PII_SHARE = 0.2
_MAX_WORDS = 115

SlotValue = Sequence[str] | Callable[["_Filler"], str]


# ---------------------------------------------------------------------------------------------
# Fake identity material (all invented; emails use reserved example domains, phones 555-01xx).
# ---------------------------------------------------------------------------------------------

# fmt: off
_FIRST_NAMES = (
    "Alice", "Ben", "Carla", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Isabel", "Jamal",
    "Kira", "Liam", "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tara",
    "Umar", "Vera", "Wes", "Xenia", "Yusuf", "Zoe", "Aaron", "Bianca", "Chidi", "Daniela",
    "Emil", "Fatima", "Gus", "Hannah", "Ivan", "Julia", "Kofi", "Lena", "Marco", "Nadia",
    "Oscar", "Priya", "Rafael", "Sofia", "Tomas", "Ulla", "Victor", "Wen", "Yara", "Zane",
    "Amara", "Bruno", "Celine", "Diego", "Esther", "Felix", "Greta", "Hugo", "Ines", "Jonah",
)
_LAST_NAMES = (
    "Abbott", "Baptiste", "Castellano", "Dvorak", "Eriksen", "Fontaine", "Gallagher",
    "Hartley", "Ibarra", "Jovanovic", "Kowalski", "Lindqvist", "Moreau", "Nakamura",
    "Okafor", "Petrov", "Quintero", "Rasmussen", "Santoro", "Thornbury", "Underwood",
    "Valente", "Whitcombe", "Xu", "Yilmaz", "Zimmermann", "Ashby", "Brennan", "Chowdhury",
    "Delacroix", "Esposito", "Falk", "Grimaldi", "Haddad", "Iversen", "Jablonski", "Kaur",
    "Lombardi", "Mbeki", "Novak", "O'Rourke", "Pham", "Reyes", "Sandoval", "Tanaka",
    "Ulrich", "Vasquez", "Weiss", "Yamada", "Zielinski",
)
_EMAIL_DOMAINS = ("example.com", "example.org", "example.net", "mail.test")
_STREETS = (
    "Maple", "Oak", "Cedar", "Willow", "Birch", "Juniper", "Chestnut", "Harbor", "Mill",
    "Orchard", "Sycamore", "Lantern", "Bramble", "Foxglove", "Kingfisher", "Heron",
)
_STREET_KINDS = ("Street", "Avenue", "Road", "Lane", "Close", "Drive", "Court", "Way")
_TOWNS = (
    "Riverton", "Maple Falls", "Oakridge", "Fairhaven", "Lakeside", "Brookhollow",
    "Cedar Grove", "Millbrook", "Northwick", "Ashford Vale", "Elmstead", "Pinecrest",
)
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
_MEDS = (
    ("metformin", "type 2 diabetes"), ("lisinopril", "high blood pressure"),
    ("sertraline", "anxiety"), ("levothyroxine", "hypothyroidism"),
    ("atorvastatin", "high cholesterol"), ("a salbutamol inhaler", "asthma"),
    ("omeprazole", "acid reflux"), ("sumatriptan", "migraines"),
    ("escitalopram", "depression"), ("methotrexate", "rheumatoid arthritis"),
    ("adalimumab", "Crohn's disease"), ("lamotrigine", "epilepsy"),
)
_DOSES = ("5 mg", "10 mg", "20 mg", "25 mg", "50 mg", "100 mg", "500 mg", "two puffs")
# fmt: on


def _email_for(rng: random.Random, first: str, last: str) -> str:
    f = first.lower().replace("'", "")
    la = last.lower().replace("'", "")
    n = rng.randint(1, 99)
    form = rng.randrange(4)
    if form == 0:
        local = f"{f}.{la}"
    elif form == 1:
        local = f"{f[0]}{la}{n}"
    elif form == 2:
        local = f"{f}_{la}"
    else:
        local = f"{f}{n}"
    return f"{local}@{rng.choice(_EMAIL_DOMAINS)}"


def _phone(rng: random.Random) -> str:
    line = f"01{rng.randint(0, 99):02d}"
    form = rng.randrange(3)
    if form == 0:
        return f"555-{line}"
    if form == 1:
        return f"({rng.randint(201, 989)}) 555-{line}"
    return f"+1 {rng.randint(201, 989)} 555 {line}"


def _address(rng: random.Random) -> str:
    street = f"{rng.randint(2, 980)} {rng.choice(_STREETS)} {rng.choice(_STREET_KINDS)}"
    if rng.random() < 0.3:
        street += f", Apt {rng.randint(1, 40)}"
    return f"{street}, {rng.choice(_TOWNS)} {rng.randint(10000, 99999)}"


def _dob(rng: random.Random) -> str:
    y, m, d = rng.randint(1948, 2004), rng.randint(1, 12), rng.randint(1, 28)
    form = rng.randrange(3)
    if form == 0:
        return f"{m:02d}/{d:02d}/{y}"
    if form == 1:
        return f"{d} {_MONTHS[m - 1]} {y}"
    return f"{y}-{m:02d}-{d:02d}"


def _account(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "-".join(f"{rng.randint(0, 9999):04d}" for _ in range(3))
    return f"ACC-{rng.randint(0, 99_999_999):08d}"


def _iban(rng: random.Random) -> str:
    cc = rng.choice(("GB", "DE", "NL", "FR", "ES"))
    groups = " ".join(f"{rng.randint(0, 9999):04d}" for _ in range(3))
    return f"{cc}00 TEST {groups} {rng.randint(0, 99):02d}"


def _make_persona(rng: random.Random) -> dict[str, str]:
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    med, cond = rng.choice(_MEDS)
    return {
        "my_first": first,
        "my_name": f"{first} {last}",
        "my_email": _email_for(rng, first, last),
        "my_phone": _phone(rng),
        "my_address": _address(rng),
        "my_dob": _dob(rng),
        "my_account": _account(rng),
        "my_iban": _iban(rng),
        "my_med": med,
        "my_condition": cond,
        "my_dose": rng.choice(_DOSES),
    }


# Which personal-detail kind each PII slot reveals (used for the ``pii`` tag).
# fmt: off
_PII_KIND = {
    "my_first": "name", "my_name": "name", "other_name": "name",
    "my_email": "email", "other_email": "email",
    "my_phone": "phone", "other_phone": "phone",
    "my_address": "address", "other_address": "address",
    "my_dob": "dob",
    "my_account": "account", "my_iban": "account", "card_last4": "account",
    "my_med": "health", "my_condition": "health", "my_dose": "health",
    "policy_no": "id", "claim_no": "id", "tax_ref": "id", "order_no": "id",
}
# fmt: on


def _other_name(f: _Filler) -> str:
    return f"{f.rng.choice(_FIRST_NAMES)} {f.rng.choice(_LAST_NAMES)}"


def _other_email(f: _Filler) -> str:
    # Reuse the third party's name when the template mentions it, so the two agree.
    if "other_name" in f:
        first, last = f["other_name"].split(" ", 1)
    else:
        first, last = f.rng.choice(_FIRST_NAMES), f.rng.choice(_LAST_NAMES)
    return _email_for(f.rng, first, last)


_PII_GENERATORS: dict[str, Callable[[_Filler], str]] = {
    "other_name": _other_name,
    "other_email": _other_email,
    "other_phone": lambda f: _phone(f.rng),
    "other_address": lambda f: _address(f.rng),
    "card_last4": lambda f: f"{f.rng.randint(0, 9999):04d}",
    "policy_no": lambda f: f"POL-{f.rng.randint(100000, 999999)}",
    "claim_no": lambda f: f"CLM-{f.rng.randint(10000, 99999)}-{f.rng.choice('ABCDEFGH')}",
    "tax_ref": lambda f: f"TR-{f.rng.randint(1000000, 9999999)}",
    "order_no": lambda f: f"#{f.rng.choice('ABCKMQXZ')}{f.rng.randint(100000, 999999)}",
}


# ---------------------------------------------------------------------------------------------
# Shared slot vocabulary.
# ---------------------------------------------------------------------------------------------


def _int(lo: int, hi: int) -> Callable[[_Filler], str]:
    return lambda f: str(f.rng.randint(lo, hi))


def _pick(*options: str) -> Callable[[_Filler], str]:
    return lambda f: f.rng.choice(options)


# fmt: off
_COMMON: dict[str, SlotValue] = {
    "n": _int(2, 8),
    "n_people": _int(2, 14),
    "words": _pick("50", "80", "100", "150", "200", "300", "500"),
    "age": _pick("5", "8", "10", "12", "14", "16"),
    "budget": _pick("$40", "$75", "$100", "$150", "$250", "$400", "$600", "$1,000",
                    "$1,500", "$2,500", "$5,000", "£200", "€300", "€800"),
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "month": _MONTHS,
    "year": _int(2012, 2024),
    "minutes": _pick("10", "15", "20", "30", "45", "60", "90"),
    "person": (
        "my sister", "my brother", "my mom", "my dad", "my partner", "my roommate", "my boss",
        "my best friend", "my neighbour", "my teenage son", "my daughter", "my grandmother",
        "a coworker", "my husband", "my wife", "my landlord", "my manager", "my cousin",
        "my girlfriend", "my boyfriend", "a close friend", "my stepdad", "my flatmate",
    ),
    "tone": ("friendly", "formal", "firm but polite", "apologetic", "enthusiastic",
             "neutral", "warm", "professional", "casual", "confident", "diplomatic"),
    "language": ("Spanish", "French", "German", "Italian", "Portuguese", "Japanese",
                 "Korean", "Mandarin", "Dutch", "Polish", "Turkish", "Hindi", "Swahili",
                 "Arabic", "Greek", "Swedish", "Vietnamese"),
    "city": ("Lisbon", "Kyoto", "Mexico City", "Prague", "Cape Town", "Montreal", "Seoul",
             "Edinburgh", "Barcelona", "Hanoi", "Buenos Aires", "Vienna", "Istanbul",
             "Copenhagen", "Marrakech", "Chicago", "Sydney", "Budapest", "Oaxaca", "Porto",
             "Tbilisi", "Singapore", "Reykjavik", "Naples", "Vancouver"),
    "level": ("a complete beginner", "an intermediate learner", "fairly advanced",
              "a total newbie", "self-taught", "rusty after years off"),
}

_OPENERS = ("Hi!", "Hey,", "Hello.", "Hi there,", "Quick question:", "Okay so", "Hello,",
            "Good morning!", "Hey there!", "Please help:", "Hi assistant,", "So,", "Um,")
_CLOSERS = ("Thanks!", "Thank you so much.", "Thanks in advance.", "Appreciate it!",
            "Cheers.", "Thank you!", "Much appreciated.", "thx", "ty!", "Many thanks.",
            "Thanks a lot, you're a lifesaver.")
_CONSTRAINTS = (
    "Keep it under {words} words.", "Please use bullet points.", "Explain it like I'm {age}.",
    "Be concise.", "Give me {n} options.", "Can you explain your reasoning too?",
    "No jargon please.", "Format the answer as a table.", "I need this by {weekday}.",
    "Step by step, please.", "Make it sound {tone}.", "Include a short example.",
    "Please don't make it too long.", "Can you give pros and cons?",
    "Start with the most important point.", "Please be honest, even if it's bad news.",
    "Assume I have about {minutes} minutes for this.",
    "Use simple English, it's not my first language.",
)
_FOLLOW_UPS = ("Also, ", "And one more thing: ", "Separately, ", "Oh and ", "Bonus question: ",
               "While you're at it, ")
_RAMBLES = (
    "I've asked a few people already and got completely different answers, so I'd really "
    "like a clear and careful explanation that I can come back to later.",
    "Sorry if this is a basic question, I tried searching online first but most of what I "
    "found was either too technical or trying to sell me something.",
    "To give you the full picture, things have been hectic lately with work and family, so "
    "I don't have much energy to figure this out on my own.",
    "I'll probably show your answer to {person} as well, so please make it easy to follow "
    "for someone who has never dealt with this before.",
    "Last time I asked something similar the answer was way too generic, so please be as "
    "specific and practical as you can.",
)
_GENERIC_PII = (
    "My name is {my_name} and you can reach me at {my_email}.",
    "For reference, my phone number is {my_phone}.",
    "I live at {my_address}.",
    "My date of birth is {my_dob}, in case that matters.",
    "I'm {my_name} (DOB {my_dob}) and I take {my_med} {my_dose} for {my_condition}.",
    "My account number is {my_account}.",
    "Sign it as {my_name}, {my_phone}, {my_email}.",
    "Contact details: {my_name}, {my_address}, tel. {my_phone}.",
    "You can use my details: {my_name}, {my_email}.",
    "I have {my_condition} and I'm on {my_med}, if that's relevant.",
    "My bank details are {my_iban} under the name {my_name}.",
    "The other person involved is {other_name} ({other_email}, {other_phone}).",
    "I'm writing on behalf of {other_name}, who lives at {other_address}.",
)


# ---------------------------------------------------------------------------------------------
# Topics. Each topic: popularity weight, PII propensity, slots, requests (full instructions),
# short (terse queries), contexts (background sentences), optional pii (requests that embed
# personal details).
# ---------------------------------------------------------------------------------------------

_TOPIC_SPECS: dict[str, dict[str, Any]] = {
    "cooking": {
        "weight": 3.0,
        "pii_rate": 0.5,
        "slots": {
            "dish": ("lasagna", "chicken curry", "banana bread", "pad thai", "mushroom risotto",
                     "beef stew", "shakshuka", "sourdough bread", "lentil soup", "carrot cake",
                     "fried rice", "chili con carne", "pancakes", "tiramisu", "falafel",
                     "ramen", "apple pie", "guacamole", "salmon teriyaki", "paella", "pierogi",
                     "butter chicken", "minestrone", "cinnamon rolls", "fish tacos"),
            "ingredient": ("eggs", "butter", "heavy cream", "buttermilk", "garlic",
                           "fresh basil", "soy sauce", "brown sugar", "baking powder",
                           "coconut milk", "ricotta", "chickpeas", "tofu", "white wine",
                           "parmesan", "spinach", "sweet potatoes", "leftover rice"),
            "diet": ("vegan", "gluten-free", "low-carb", "dairy-free", "nut-free",
                     "vegetarian", "low-sodium", "keto", "halal", "high-protein"),
            "equipment": ("air fryer", "slow cooker", "Instant Pot", "cast iron pan",
                          "toaster oven", "rice cooker", "microwave", "dutch oven"),
            "failure": ("dry", "soggy", "too salty", "dense", "bland", "burnt on the bottom",
                        "runny", "rubbery", "flat", "greasy"),
        },
        "requests": (
            "Can you give me a recipe for {dish} that serves {n_people}?",
            "What can I use instead of {ingredient} in {dish}?",
            "How do I make {dish} in my {equipment}?",
            "I want to make a {diet} version of {dish}. What should I change?",
            "Plan a week of {diet} dinners for {n_people} people on a budget of {budget}.",
            "Why does my {dish} always come out {failure}? I follow the recipe exactly.",
            "How long can cooked {dish} stay in the fridge, and can I freeze it?",
            "What drink or side dish goes well with {dish}?",
            "Give me a shopping list for {dish} and {dish2} for {n_people} people.",
            "I have {ingredient}, {ingredient2} and {ingredient3} left. What can I cook tonight?",
            "Scale this {dish} recipe from 4 servings to {n_people} servings and convert to grams.",
            "Explain the difference between baking soda and baking powder, and when to use each.",
        ),
        "short": ("quick {dish} recipe pls", "best way to reheat {dish}?",
                  "can I freeze leftover {dish}", "good substitute for {ingredient} in baking?",
                  "easy {diet} {dish} for {n_people}?"),
        "contexts": (
            "I'm hosting {n_people} friends on {weekday}.",
            "{person} only eats {diet} food and I'm not used to cooking that way.",
            "I'm a pretty beginner cook and only have a tiny kitchen.",
            "Last time I tried this it was a disaster.",
            "We're trying to cut down on takeaway food this month.",
            "I only have about {minutes} minutes after work to cook.",
        ),
        "pii": (
            "I'm catering for {other_name}'s birthday at {other_address}. Can you plan a "
            "{diet} menu for {n_people} guests?",
            "I have {my_condition} and take {my_med}. Which foods should I avoid when I cook "
            "{dish}?",
        ),
    },
    "travel": {
        "weight": 2.5,
        "pii_rate": 1.0,
        "slots": {
            "days": _int(2, 14),
            "style": ("on a tight budget", "with two small kids", "as a solo traveller",
                      "for our honeymoon", "with my elderly parents", "by train only",
                      "without a car", "in a wheelchair", "with a dog"),
            "thing": ("street food", "museums", "hiking", "nightlife", "beaches",
                      "architecture", "live music", "markets", "day trips", "hot springs"),
        },
        "requests": (
            "Plan a {days}-day itinerary for {city} {style}.",
            "What's the best time of year to visit {city} if I care mostly about {thing}?",
            "Is {city} or {city2} better for a {days}-day trip focused on {thing}?",
            "How should I get from the airport to the centre of {city} late at night?",
            "What should I pack for {days} days in {city} in {month}?",
            "Which neighbourhoods in {city} are good to stay in {style}?",
            "Give me a rough daily budget for {city}, including food, transport and {thing}.",
            "What are common tourist scams in {city} and how do I avoid them?",
            "My flight to {city} got cancelled. What are my rights and what should I do now?",
            "Suggest some phrases in {language} I should learn before my trip.",
        ),
        "short": ("things to do in {city}", "is {city} safe at night?",
                  "is {city} nice in {month}?",
                  "do I need a visa for {city}?", "cheap eats near central {city}?"),
        "contexts": (
            "We have {days} days off in {month}.",
            "I've never travelled abroad before and I'm a bit nervous.",
            "Our total budget is about {budget} per person.",
            "I'm going with {person}, who hates long walks.",
            "We already booked the flights but nothing else.",
        ),
        "pii": (
            "Write an email to the hotel asking to change my booking. Name: {my_name}, "
            "phone {my_phone}, arriving {month} {n}.",
            "Fill in this visa form text for me: {my_name}, born {my_dob}, address "
            "{my_address}, travelling to {city} for {days} days.",
            "My passport was stolen in {city}. I'm {my_name}, DOB {my_dob}. What steps should "
            "I take and what should I tell the embassy?",
        ),
    },
    "personal_finance": {
        "weight": 2.0,
        "pii_rate": 1.5,
        "slots": {
            "income": ("$2,800", "$3,500", "$4,200", "$5,000", "$6,500", "£2,100", "€3,000"),
            "goal": ("pay off my credit card", "save for a house deposit",
                     "build an emergency fund",
                     "start investing", "save for a wedding", "retire early",
                     "stop living paycheck to paycheck", "buy a car without a loan"),
            "product": ("index funds", "a high-yield savings account", "a Roth IRA",
                        "government bonds", "a 401(k)", "robo-advisors", "a cash ISA",
                        "dividend stocks", "a certificate of deposit"),
        },
        "requests": (
            "I earn {income} a month after tax. Help me make a budget so I can {goal}.",
            "Explain {product} to me like I'm a complete beginner.",
            "Should I {goal} first or put money into {product}?",
            "What's the 50/30/20 rule and does it work if rent takes half my income?",
            "How much should I keep in an emergency fund if my expenses are {income} a month?",
            "Compare {product} and {product2} for someone in their late twenties.",
            "Is it smart to use a balance transfer card to {goal}?",
            "Make me a spreadsheet layout to track spending by category.",
            "What questions should I ask a financial advisor before hiring one?",
        ),
        "short": ("what exactly is {product}", "how to {goal}", "is {product} safe?",
                  "emergency fund how much if I earn {income}"),
        "contexts": (
            "I'm 29 and I have almost no savings.",
            "I have about {budget} in credit card debt at 24% interest.",
            "My partner and I just combined our finances.",
            "I got a small inheritance and don't want to waste it.",
            "I'm self-employed so my income goes up and down a lot.",
        ),
        "pii": (
            "My bank ({my_iban}) charged me an overdraft fee twice. Draft a message asking for "
            "a refund, signed {my_name}.",
            "Here's my situation: {my_name}, born {my_dob}, account {my_account}, earning "
            "{income} a month. Should I refinance my loan?",
            "Someone used my card ending {card_last4} for purchases I didn't make. What do I "
            "say when I call the bank? My number on file is {my_phone}.",
        ),
    },
    "python": {
        "weight": 3.0,
        "pii_rate": 0.2,
        "slots": {
            "ptask": ("read a CSV file and group rows by a column",
                      "download a web page and extract all the links",
                      "rename every file in a folder with a date prefix",
                      "merge two dictionaries without losing nested keys",
                      "parse command-line arguments", "send an HTTP POST with JSON",
                      "find duplicate files by hash", "resize all images in a directory",
                      "schedule a function to run every hour", "flatten a nested list",
                      "read an Excel sheet into pandas", "write unit tests for a small function",
                      "remove stopwords from a text", "count word frequencies in a file"),
            "pconcept": ("decorators", "generators", "list comprehensions", "async/await",
                         "context managers", "dataclasses", "type hints", "the GIL",
                         "virtual environments", "*args and **kwargs", "closures",
                         "metaclasses", "the walrus operator"),
            "plib": ("pandas", "requests", "numpy", "pathlib", "asyncio", "FastAPI",
                     "Flask", "pytest", "matplotlib", "SQLAlchemy", "BeautifulSoup"),
        },
        "requests": (
            "Write a Python script to {ptask}.",
            "How do I {ptask} in Python using {plib}?",
            "Explain {pconcept} in Python with a simple example.",
            "What's the difference between {pconcept} and {pconcept2}?",
            "Refactor this so it's more pythonic: for i in range(len(items)): "
            "if items[i] != None: result.append(items[i]*2)",
            "Can you review my Python function that tries to {ptask}? It's slow on big inputs.",
            "Write pytest tests for a function that validates email addresses.",
            "How should I structure a small Python project that uses {plib}?",
            "Is {plib} or {plib2} better for a beginner who wants to {ptask}?",
        ),
        "short": ("python {pconcept} explained simply?", "{plib} vs {plib2} for beginners",
                  "how to {ptask} python",
                  "python one-liner to {ptask}"),
        "contexts": (
            "I'm {level} in Python.",
            "This is for a work script that runs every night.",
            "I'm on Windows and Python 3.11.",
            "My teacher said I shouldn't use any external libraries.",
            "I've been stuck on this for {minutes} minutes.",
        ),
        "pii": (
            "Write a Python script that emails a report to {other_email} every {weekday} "
            "morning.",
        ),
    },
    "javascript": {
        "weight": 2.0,
        "pii_rate": 0.2,
        "slots": {
            "jtask": ("debounce a search input", "fetch data from an API and show a spinner",
                      "validate a signup form", "sort an array of objects by date",
                      "make a dark mode toggle", "deep clone an object",
                      "build a simple todo list", "lazy load images",
                      "store settings in localStorage", "format a number as currency"),
            "jconcept": ("closures", "promises", "the event loop", "hoisting", "this binding",
                         "prototypes", "async/await", "optional chaining", "ES modules",
                         "React hooks", "useEffect cleanup", "TypeScript generics"),
            "jlib": ("React", "Vue", "Svelte", "Next.js", "Express", "Node.js", "jQuery",
                     "TypeScript", "Tailwind"),
        },
        "requests": (
            "How do I {jtask} in plain JavaScript?",
            "Explain {jconcept} in JavaScript with a small code example.",
            "Write a {jlib} component that can {jtask}.",
            "Why does my {jlib} app re-render forever when I use useEffect?",
            "What's the difference between {jconcept} and {jconcept2}?",
            "Convert this callback-based code to async/await: getUser(id, function(err, user) "
            "... )",
            "Should I learn {jlib} or {jlib2} first if I want a frontend job?",
            "My {jlib} build is huge. How can I reduce the bundle size?",
        ),
        "short": ("can someone explain js {jconcept}", "{jlib} vs {jlib2} in {year}?",
                  "how to {jtask} js"),
        "contexts": (
            "I'm {level} with JavaScript.",
            "It's a side project, nothing fancy.",
            "I'm using {jlib} with Vite.",
            "It works in Chrome but not in Safari.",
        ),
    },
    "sql": {
        "weight": 1.5,
        "pii_rate": 0.2,
        "slots": {
            "table": ("orders", "customers", "employees", "invoices", "page_views",
                      "subscriptions", "products", "payments", "students", "tickets"),
            "stask": ("find the top 5 customers by total spend",
                      "get monthly revenue for the last year",
                      "find rows that appear more than once",
                      "compute a running total per user", "delete duplicate rows but keep one",
                      "find users who signed up but never ordered",
                      "pivot sales by region and quarter", "calculate a 7-day moving average",
                      "get the second highest salary in each department"),
            "db": ("PostgreSQL", "MySQL", "SQLite", "SQL Server", "BigQuery", "Snowflake"),
        },
        "requests": (
            "Write a SQL query to {stask} from the {table} table.",
            "In {db}, how do I {stask}?",
            "Explain the difference between INNER JOIN and LEFT JOIN using {table} and {table2}.",
            "My query on {table} takes forever. Which indexes should I add?",
            "What is a window function and when would I use one on {table}?",
            "Design a simple schema for {table} and {table2} with foreign keys.",
            "Why does GROUP BY give me an error about a column not being aggregated?",
            "Convert this {db} query to {db2}: SELECT TOP 10 * FROM {table} ORDER BY id DESC",
        ),
        "short": ("sql {stask}", "{db} vs {db2} for a small app", "what is a CTE in {db}"),
        "contexts": (
            "The {table} table has about {n} million rows.",
            "I'm using {db}.",
            "I'm a data analyst, not a developer, so keep it simple.",
        ),
    },
    "bash": {
        "weight": 1.3,
        "pii_rate": 0.1,
        "slots": {
            "btask": ("find all files larger than 1GB", "rename files to lowercase",
                      "back up a folder every night with cron",
                      "count lines in all .py files", "kill the process using port 8080",
                      "replace a string in many files", "tail a log and grep for errors",
                      "loop over lines in a file", "check disk usage by folder",
                      "copy files over ssh", "extract a tar.gz into a specific folder",
                      "run a command only if the previous one succeeded"),
            "shell": ("bash", "zsh", "PowerShell", "fish"),
            "chmod": ("755", "644", "600", "777", "+x", "-R 750", "u+rw"),
            "os": ("Ubuntu", "macOS", "WSL", "a Raspberry Pi", "CentOS", "Arch"),
        },
        "requests": (
            "How do I {btask} in {shell}?",
            "Write a bash script to {btask}.",
            "Explain what this does: find . -name '*.log' -mtime +7 -exec rm {{}} \\;",
            "What's the difference between > and >> and 2>&1 in {shell}?",
            "On {os}, how can I {btask}?",
            "My cron job doesn't run but the script works by hand. Why?",
            "Make this {shell} one-liner safer: rm -rf $DIR/*",
        ),
        "short": ("bash {btask}", "how to make a {shell} alias", "what does chmod {chmod} mean"),
        "contexts": ("I'm on {os}.", "I'm new to the terminal.", "This runs on a shared server."),
    },
    "debugging": {
        "weight": 2.5,
        "pii_rate": 0.15,
        "slots": {
            "error": (
                "TypeError: 'NoneType' object is not subscriptable", "KeyError: 'user_id'",
                "IndentationError: unexpected indent",
                "ModuleNotFoundError: No module named 'pandas'",
                "Uncaught TypeError: Cannot read properties of undefined (reading 'map')",
                "SyntaxError: unexpected EOF while parsing", "segmentation fault (core dumped)",
                "ERROR 1064 (42000): You have an error in your SQL syntax",
                "Permission denied (publickey)", "npm ERR! code ERESOLVE",
                "CUDA out of memory", "java.lang.NullPointerException",
                "RecursionError: maximum recursion depth exceeded",
                "CORS policy: No 'Access-Control-Allow-Origin' header",
                "fatal: refusing to merge unrelated histories",
                "ValueError: could not convert string to float: ''",
                "ImportError: cannot import name 'x' from partially initialized module",
                "docker: Error response from daemon: port is already allocated",
            ),
            "when": ("when I run my script", "only in production", "after I upgraded",
                     "on my colleague's laptop but not mine", "randomly, maybe 1 in 10 runs",
                     "right after deployment", "when the input file is empty",
                     "as soon as I start the server", "in CI but not locally"),
        },
        "requests": (
            "I'm getting '{error}' {when}. What does it mean and how do I fix it?",
            "What usually causes '{error}'?",
            "Help me debug this: {error}. It happens {when}.",
            "I keep seeing {error} {when}. I already tried reinstalling everything.",
            "How do I read this stack trace? The last line says {error}.",
            "What's a systematic way to debug errors that only happen {when}?",
        ),
        "short": ("{error}", "fix {error}?", "{error} help"),
        "contexts": (
            "It worked fine yesterday.",
            "I didn't change anything, I swear.",
            "The code is pretty long so I'll only paste the relevant part.",
            "I've googled it but the answers don't match my setup.",
            "Deadline is tomorrow and I'm panicking a bit.",
        ),
    },
    "math_homework": {
        "weight": 2.0,
        "pii_rate": 0.1,
        "slots": {
            "a": _int(2, 19),
            "b": _int(2, 40),
            "c": _int(1, 99),
            "mtopic": ("derivatives", "integration by parts", "quadratic equations",
                       "probability", "the Pythagorean theorem", "logarithms", "matrices",
                       "limits", "fractions", "percentages", "standard deviation",
                       "proof by induction", "Bayes' theorem", "eigenvalues", "trigonometry"),
        },
        "requests": (
            "Solve {a}x + {b} = {c} and show every step.",
            "Can you explain {mtopic} to me? My textbook makes no sense.",
            "Find the derivative of {a}x^3 - {b}x + {c}.",
            "A train leaves at {a}:00 going {b}0 km/h. Another leaves an hour later going "
            "{c} km/h faster. When does it catch up?",
            "What's {a}% of {c}0, and how do I do it in my head?",
            "Give me {n} practice problems on {mtopic} with answers at the end.",
            "I roll two dice. What's the probability the sum is {a}? Explain why.",
            "Check my work: I got x = {a} for x^2 - {b}x + {c} = 0. Is that right?",
            "Why does {mtopic} matter in real life?",
            "Explain the intuition behind {mtopic} without formulas first.",
        ),
        "short": ("what is {mtopic}", "{a}/{b} as a decimal", "solve x^2 = {c} for x",
                  "need help with {mtopic} asap"),
        "contexts": (
            "I'm in high school and maths is my worst subject.",
            "My exam is on {weekday}.",
            "I'm helping {person} with homework and I forgot how this works.",
            "I'm not asking you to do it for me, I want to understand it.",
        ),
    },
    "fitness": {
        "weight": 2.0,
        "pii_rate": 0.8,
        "slots": {
            "fgoal": ("lose 5 kg", "run a 5K", "do my first pull-up", "build muscle",
                      "improve my posture", "train for a half marathon", "get more flexible",
                      "get stronger legs", "be able to hike all day"),
            "days": _int(2, 6),
            "equipment": ("no equipment", "a pair of dumbbells", "resistance bands",
                          "a full gym", "a kettlebell", "a pull-up bar"),
            "injury": ("a bad knee", "lower back pain", "a sore shoulder", "shin splints",
                       "a weak ankle", "tennis elbow"),
        },
        "requests": (
            "Make me a {days}-day-a-week plan to {fgoal} using {equipment}.",
            "How can I {fgoal} if I have {injury}?",
            "What should I eat before and after a workout if I want to {fgoal}?",
            "Is it bad to work out every day? I want to {fgoal}.",
            "How do I do a proper squat with {injury}?",
            "Create a {minutes}-minute home workout with {equipment}.",
            "How many calories should I eat to {fgoal}? I'm moderately active.",
            "Explain progressive overload simply.",
        ),
        "short": ("how to {fgoal}", "workout with {equipment}", "stretches for {injury}"),
        "contexts": (
            "I'm in my forties and haven't exercised in years.",
            "I work at a desk all day.",
            "I tried a program last year and quit after two weeks.",
            "I have {injury} so some exercises hurt.",
        ),
        "pii": (
            "I'm {my_name}, born {my_dob}, and I take {my_med} for {my_condition}. Is it safe "
            "for me to {fgoal}?",
        ),
    },
    "health": {
        "weight": 2.0,
        "pii_rate": 2.5,
        "slots": {
            "symptom": ("a headache that won't go away", "trouble sleeping", "heartburn",
                        "a persistent cough", "dizziness when I stand up", "itchy eyes",
                        "a rash on my arm", "back pain", "fatigue all the time",
                        "ringing in my ears", "cold hands and feet", "a sore throat"),
            "duration": ("two days", "a week", "three weeks", "a month", "since {month}"),
            "condition_person": ("mum", "dad", "partner", "grandfather", "aunt"),
        },
        "requests": (
            "I've had {symptom} for {duration}. When should I see a doctor?",
            "What are common causes of {symptom}?",
            "What questions should I ask my doctor about {symptom}?",
            "Are there home remedies for {symptom} that actually work?",
            "Explain what a normal blood pressure reading is and what the numbers mean.",
            "Is it okay to take ibuprofen and paracetamol together?",
            "How can I tell the difference between a cold and the flu?",
            "Help me prepare for a doctor's appointment about {symptom}.",
        ),
        "short": ("{symptom} causes", "is {symptom} serious?", "remedy for {symptom}"),
        "contexts": (
            "I'm not looking for a diagnosis, just general info.",
            "My GP appointment isn't until {month}.",
            "{person} says I'm overreacting.",
            "I don't have health insurance right now.",
        ),
        "pii": (
            "I'm {my_name}, {my_dob}. I take {my_med} {my_dose} for {my_condition} and I've "
            "had {symptom} for {duration}. Could it be a side effect?",
            "Write a note to my doctor: patient {my_name}, DOB {my_dob}, phone {my_phone}. "
            "I need a refill of {my_med} for my {my_condition}.",
            "My {condition_person} {other_name} has {my_condition} and just started {my_med}. "
            "What side effects should we watch for?",
            "Summarise my history for a new clinic: {my_condition} since {year}, currently "
            "on {my_med} {my_dose}, address {my_address}.",
        ),
    },
    "relationships": {
        "weight": 2.0,
        "pii_rate": 0.6,
        "slots": {
            "issue": ("we keep arguing about chores", "they never text back",
                      "I feel like I'm always the one making plans",
                      "they forgot my birthday", "we disagree about having kids",
                      "they spend all their money on gadgets",
                      "they're always on their phone at dinner",
                      "I said something hurtful and regret it",
                      "they don't get along with my friends",
                      "we're moving in together and I'm nervous"),
        },
        "requests": (
            "How do I talk to {person} about the fact that {issue}?",
            "Give me advice: {issue}. Am I overreacting?",
            "Write a text message to {person} apologising because {issue}.",
            "How do I set boundaries with {person} without starting a fight?",
            "What are signs of a healthy relationship versus a controlling one?",
            "{person} and I had a fight because {issue}. How do I start the conversation?",
            "How can I make new friends as an adult in a new city?",
        ),
        "short": ("how to apologise to {person}", "am I wrong to be upset with {person}?",
                  "dealing with a friend who cancels plans last minute"),
        "contexts": (
            "We've been together for {n} years.",
            "It's been bothering me for weeks.",
            "I'm not great at confrontation.",
            "Some background: {issue}.",
        ),
        "pii": (
            "My ex {other_name} keeps messaging me from {other_phone}. How do I block them and "
            "should I report it?",
        ),
    },
    "email_writing": {
        "weight": 3.0,
        "pii_rate": 2.5,
        "slots": {
            "recipient": ("my manager", "a client", "my professor", "the HR team", "a landlord",
                          "my child's teacher", "a recruiter", "the school principal",
                          "a supplier", "my team", "a potential investor", "the city council"),
            "purpose": ("ask for a deadline extension", "decline a meeting politely",
                        "follow up on an unpaid invoice", "request a day off",
                        "say I'm resigning", "ask for feedback", "apologise for a mistake",
                        "introduce myself", "ask for a raise", "complain about noise",
                        "reschedule an interview", "thank them after an event"),
        },
        "requests": (
            "Write an email to {recipient} to {purpose}.",
            "Help me write a {tone} email to {recipient}. I need to {purpose}.",
            "Make this email sound more {tone}: 'hey, just checking if you saw my last email?'",
            "Draft a short email to {recipient} to {purpose}. Keep it {tone}.",
            "What's a good subject line for an email where I {purpose}?",
            "Rewrite my email so it doesn't sound passive-aggressive. I want to {purpose}.",
            "Proofread this: 'Dear sir, I am writting to inform you that i will not attend.'",
        ),
        "short": ("email to {purpose}", "{tone} email template for {recipient}",
                  "how to end a formal email to {recipient}"),
        "contexts": (
            "English is my second language so I worry about sounding rude.",
            "This is the second time I'm asking.",
            "I've only been at this job for {n} months.",
            "The relationship with {recipient} is a bit tense right now.",
        ),
        "pii": (
            "Write an email to {other_name} ({other_email}) to {purpose}. Sign it {my_name}, "
            "{my_phone}.",
            "Draft an email to {recipient} to {purpose}. My details: {my_name}, {my_email}, "
            "{my_address}.",
            "Send a reminder to {other_email} that invoice {order_no} is overdue. From "
            "{my_name}.",
            "Write a {tone} email to my landlord {other_name} at {other_email} about the "
            "broken heating at {my_address}.",
        ),
    },
    "job_applications": {
        "weight": 2.2,
        "pii_rate": 2.0,
        "slots": {
            "role": ("data analyst", "junior developer", "nurse", "project manager",
                     "graphic designer", "teacher", "sales associate", "marketing coordinator",
                     "warehouse supervisor", "UX researcher", "accountant", "barista",
                     "customer success manager", "lab technician"),
            "years": _int(1, 15),
        },
        "requests": (
            "Write a cover letter for a {role} position. I have {years} years of experience.",
            "Improve this resume bullet: 'responsible for doing reports'.",
            "What are common interview questions for a {role} and how should I answer them?",
            "How do I explain a {years}-year gap in my resume?",
            "I'm switching careers from {role} to {role2}. How do I frame my experience?",
            "Write a LinkedIn summary for a {role} with {years} years of experience.",
            "How should I negotiate salary for a {role} offer?",
            "Write a thank-you note after my {role} interview.",
        ),
        "short": ("interview tips for a {role} role", "resume summary for {role}",
                  "cover letter opening line for {role}"),
        "contexts": (
            "I was laid off last month.",
            "This is my dream company and I'm nervous.",
            "I've applied to {n}0 jobs and heard nothing back.",
            "I'm a recent graduate with little experience.",
        ),
        "pii": (
            "Format the header of my CV: {my_name}, {my_address}, {my_phone}, {my_email}, "
            "applying for {role}.",
            "Write a cover letter for a {role} job addressed to {other_name}. My name is "
            "{my_name} and my email is {my_email}.",
            "My reference is {other_name}, {other_phone}. Write a short note asking them if "
            "they'd be a reference for a {role} role.",
        ),
    },
    "legal_tenancy": {
        "weight": 1.5,
        "pii_rate": 2.0,
        "slots": {
            "lproblem": ("my landlord won't return my deposit",
                         "there's mould in the bedroom and the landlord ignores it",
                         "my landlord wants to raise the rent by 20%",
                         "I want to break my lease early",
                         "the landlord enters without notice",
                         "my neighbour's tree fell on my fence",
                         "I got a parking ticket I think is unfair",
                         "my employer hasn't paid my last paycheck",
                         "I was charged a cancellation fee that wasn't in the contract"),
        },
        "requests": (
            "What are my rights if {lproblem}?",
            "Write a formal letter because {lproblem}.",
            "Explain in plain English what 'joint and several liability' means in a lease.",
            "Do I need a lawyer if {lproblem}, or can I handle it myself?",
            "What evidence should I collect if {lproblem}?",
            "Is a verbal agreement legally binding for renting a room?",
            "Help me understand the notice period rules for ending a tenancy.",
        ),
        "short": ("tenant rights when the deposit is withheld", "{lproblem}, what now?",
                  "how does small claims court work for {budget}"),
        "contexts": (
            "I know you're not a lawyer, I just want general information.",
            "I've lived here for {n} years and always paid on time.",
            "The contract is in {language} and my {language} isn't great.",
        ),
        "pii": (
            "Write a letter to my landlord {other_name} because {lproblem}. I'm {my_name} at "
            "{my_address}.",
            "Draft a demand letter: tenant {my_name}, property {my_address}, deposit paid "
            "to account {my_account}. Problem: {lproblem}.",
        ),
    },
    "parenting": {
        "weight": 1.5,
        "pii_rate": 0.8,
        "slots": {
            "kid_age": ("2-year-old", "toddler", "4-year-old", "7-year-old", "10-year-old",
                        "teenager", "newborn", "12-year-old", "twins (age 5)"),
            "pissue": ("won't sleep through the night", "throws tantrums in shops",
                       "refuses to eat vegetables", "spends hours on the tablet",
                       "is being bullied at school", "lies about homework",
                       "is scared of the dark", "fights with their sibling constantly"),
        },
        "requests": (
            "My {kid_age} {pissue}. What can I try?",
            "How much screen time is okay for a {kid_age}?",
            "Give me {n} rainy-day activities for a {kid_age}.",
            "How do I explain death of a pet to a {kid_age}?",
            "What chores are appropriate for a {kid_age}?",
            "Write a bedtime story for a {kid_age} about a brave snail.",
            "How do I talk to my {kid_age} about money?",
        ),
        "short": ("{kid_age} {pissue}", "activities for a {kid_age}",
                  "sleep training tips for a {kid_age}"),
        "contexts": (
            "I'm a single parent and exhausted.",
            "We just moved house, which might be part of it.",
            "{person} thinks I'm too strict.",
        ),
        "pii": (
            "Write a note to my kid's teacher {other_name} explaining that my son will miss "
            "school {weekday}. Signed {my_name}, {my_phone}.",
            "My daughter (born {my_dob}) has {my_condition}. How do I explain her medication "
            "{my_med} to her class?",
        ),
    },
    "gardening": {
        "weight": 1.2,
        "pii_rate": 0.1,
        "slots": {
            "plant": ("tomatoes", "basil", "roses", "a fiddle leaf fig", "succulents",
                      "strawberries", "lavender", "a monstera", "peppers", "hydrangeas",
                      "an orchid", "courgettes", "blueberries", "a lemon tree"),
            "gproblem": ("yellow leaves", "brown spots", "aphids", "root rot",
                         "wilting in the afternoon", "no flowers", "white powder on the leaves",
                         "slugs everywhere"),
            "space": ("a small balcony", "a shady backyard", "a sunny windowsill",
                      "raised beds", "clay soil", "an allotment"),
        },
        "requests": (
            "My {plant} has {gproblem}. What's wrong and how do I fix it?",
            "How often should I water {plant} on {space}?",
            "What can I grow on {space} as a beginner?",
            "When should I plant {plant} if I live somewhere with cold winters?",
            "How do I propagate {plant}?",
            "Plan a small vegetable garden for {space}.",
            "Is it safe to use coffee grounds on {plant}?",
        ),
        "short": ("my {plant} has {gproblem}", "can I grow {plant} indoors?",
                  "{plant} care tips for {space}"),
        "contexts": ("I have {space}.", "I kill every plant I touch.", "We get a lot of rain."),
    },
    "home_repair": {
        "weight": 1.5,
        "pii_rate": 0.6,
        "slots": {
            "hproblem": ("a dripping tap", "a running toilet", "a squeaky door",
                         "a crack in the drywall", "a clogged drain", "a tripping breaker",
                         "a drafty window", "peeling paint in the bathroom",
                         "a wobbly ceiling fan", "a leaking radiator valve", "grout going black"),
            "tool": ("a drill", "a multimeter", "a plunger", "a stud finder", "a caulk gun",
                     "an adjustable wrench"),
        },
        "requests": (
            "How do I fix {hproblem} myself?",
            "Is {hproblem} something I can fix or should I call a professional?",
            "What tools do I need to fix {hproblem}? I only own {tool}.",
            "Step by step, how do I patch a hole in drywall the size of a fist?",
            "How much should it roughly cost to repair {hproblem}?",
            "How do I safely use {tool} as a beginner?",
            "What's the best way to prevent {hproblem} from coming back?",
        ),
        "short": ("how to fix {hproblem}", "can I fix {hproblem} diy?", "how to use {tool}"),
        "contexts": ("I'm renting, so I don't want to damage anything.",
                     "The house is about {n}0 years old.",
                     "I'm not very handy but willing to try."),
        "pii": (
            "Write a message to the plumber {other_name} ({other_phone}) asking them to come "
            "fix {hproblem} at {my_address} on {weekday}.",
        ),
    },
    "cars": {
        "weight": 1.3,
        "pii_rate": 0.8,
        "slots": {
            "car": ("2012 Honda Civic", "2018 Toyota Corolla", "2009 Ford Focus",
                    "2015 VW Golf", "2020 Tesla Model 3", "2011 Subaru Outback",
                    "2016 Mazda CX-5", "2007 Nissan Micra", "2019 Kia Sportage"),
            "noise": ("a squealing noise when braking", "a clicking when I turn",
                      "the check engine light on", "a burning smell", "a shaking steering wheel",
                      "trouble starting in the cold", "the AC blowing warm air"),
        },
        "requests": (
            "My {car} has {noise}. What could it be?",
            "Is it worth repairing a {car} with 200,000 km or should I sell it?",
            "How often should I change the oil on a {car}?",
            "Should I buy a used {car} or a new {car2}?",
            "How do I jump-start a car safely?",
            "What should I check before buying a used car from a private seller?",
            "Explain how hybrid cars actually save fuel.",
        ),
        "short": ("{car} {noise}", "is a {car} reliable?", "what tyre pressure for a {car}"),
        "contexts": ("I drive about {n}0 km a day.", "The mechanic quoted me {budget}.",
                     "I know nothing about cars."),
        "pii": (
            "Write a complaint to the dealership: I'm {my_name}, I bought a {car} and it had "
            "{noise} within a week. Reach me at {my_phone}.",
        ),
    },
    "pets": {
        "weight": 1.5,
        "pii_rate": 0.3,
        "slots": {
            "pet": ("puppy", "senior dog", "rescue cat", "kitten", "rabbit", "parrot",
                    "guinea pig", "hamster", "border collie", "labrador", "bearded dragon"),
            "behaviour": ("keeps scratching the sofa", "barks at night", "won't eat",
                          "pulls on the lead", "is scared of visitors", "pees indoors",
                          "chews everything", "is losing fur"),
        },
        "requests": (
            "My {pet} {behaviour}. What should I do?",
            "How do I introduce a new {pet} to my {pet2}?",
            "What human foods are toxic to a {pet}?",
            "How much exercise does a {pet} need?",
            "Suggest {n} names for a {pet}.",
            "Is it normal that my {pet} {behaviour}?",
            "What should I pack for a road trip with a {pet}?",
        ),
        "short": ("my {pet} {behaviour}", "names for a {pet}", "can a {pet} eat grapes"),
        "contexts": ("We adopted him {n} weeks ago.", "She's {n} years old.",
                     "We live in a small apartment."),
    },
    "language_learning": {
        "weight": 1.5,
        "pii_rate": 0.1,
        "slots": {
            "grammar": ("the subjunctive", "past tense", "gendered nouns", "formal vs informal "
                        "you", "word order", "particles", "conditionals", "reflexive verbs"),
        },
        "requests": (
            "How can I learn {language} in {n} months with {minutes} minutes a day?",
            "Explain {grammar} in {language} with examples.",
            "Make me a vocabulary list for ordering food in {language}.",
            "Correct my {language}: I want practise speaking more every days.",
            "What's the best way to practise speaking {language} if I don't know any speakers?",
            "Is {language} or {language2} easier for an English speaker?",
            "Quiz me on {n} basic {language} phrases.",
        ),
        "short": ("fastest way to learn {language}", "{grammar} in {language} explained",
                  "best apps to learn {language}?"),
        "contexts": ("I'm {level}.", "I'm moving abroad in {month}.",
                     "{person} speaks {language} and I want to surprise them."),
    },
    "history": {
        "weight": 1.2,
        "pii_rate": 0.0,
        "slots": {
            "event": ("the fall of the Roman Empire", "the French Revolution",
                      "the printing press", "the Silk Road", "the Cold War",
                      "the Industrial Revolution", "the Meiji Restoration",
                      "the Black Death", "the moon landing", "the partition of India",
                      "the Ottoman Empire", "the Renaissance", "the abolition of slavery"),
        },
        "requests": (
            "What caused {event}?",
            "Summarise {event} in {words} words.",
            "How did {event} change everyday life for ordinary people?",
            "Compare {event} and {event2}.",
            "What are common myths about {event}?",
            "Recommend {n} books about {event} for a non-expert.",
        ),
        "short": ("quick summary of {event}", "why did {event} happen",
                  "timeline of {event} pls"),
        "contexts": ("I'm writing an essay.", "I just watched a documentary about this.",
                     "We're visiting a museum on this next week."),
    },
    "science": {
        "weight": 1.8,
        "pii_rate": 0.0,
        "slots": {
            "phenom": ("why the sky is blue", "how vaccines work", "black holes",
                       "photosynthesis", "quantum entanglement", "how tides work",
                       "climate change", "CRISPR", "how batteries store energy",
                       "plate tectonics", "how airplanes stay in the air", "entropy",
                       "the placebo effect", "how neural networks learn", "DNA replication"),
        },
        "requests": (
            "Explain {phenom} to a {age}-year-old.",
            "Explain {phenom} in detail, I have a science background.",
            "What's a common misconception about {phenom}?",
            "How do scientists know about {phenom}? What's the evidence?",
            "Give me a simple experiment to demonstrate {phenom} at home.",
            "What's the connection between {phenom} and {phenom2}?",
        ),
        "short": ("can you explain {phenom}?", "explain {phenom} simply", "eli5: {phenom}"),
        "contexts": ("My kid asked me and I had no idea.", "I'm preparing a talk.",
                     "I never understood this at school."),
    },
    "creative_writing": {
        "weight": 2.0,
        "pii_rate": 0.3,
        "slots": {
            "form": ("poem", "haiku", "limerick", "short story", "song chorus", "sonnet",
                     "flash fiction piece", "toast", "eulogy", "children's rhyme"),
            "rhyme": ("orange", "silver", "month", "purple", "heart", "rain", "forever"),
            "subject": ("autumn leaves", "a lost umbrella", "first love", "the ocean at night",
                        "a robot learning to paint", "my grandmother's kitchen",
                        "Monday mornings", "a city in the rain", "an old lighthouse",
                        "leaving home", "a cat who rules the house", "the last day of summer"),
        },
        "requests": (
            "Write a {form} about {subject}.",
            "Write a {tone} {form} about {subject} in under {words} words.",
            "Give me {n} opening lines for a {form} about {subject}.",
            "Help me continue my story: the door opened and {subject} was there.",
            "Write a {form} for {person}'s birthday that mentions {subject}.",
            "What's a good metaphor for {subject}?",
            "Turn this into a {form}: I miss {subject}.",
        ),
        "short": ("{form} about {subject}", "words that rhyme with {rhyme}",
                  "short {form} about {subject} pls"),
        "contexts": ("It's for a writing class.", "I want it to rhyme.",
                     "Make it a bit melancholy."),
        "pii": (
            "Write a wedding toast for {other_name} and their partner. I'm {my_name}, the best "
            "friend, and we met in {year}.",
        ),
    },
    "summarisation": {
        "weight": 2.0,
        "pii_rate": 1.0,
        "slots": {
            "passage": lambda f: f.passage(),
            "doc": ("set of meeting notes", "article", "email thread", "customer review",
                    "page of lecture notes", "report section"),
        },
        "requests": (
            "Summarise this {doc} in {n} bullet points: {passage}",
            "TL;DR this please: {passage}",
            "Can you summarise this {doc} for my boss in two sentences? {passage}",
            "Pull out the action items from this {doc}: {passage}",
            "What's the main point of this {doc}? {passage}",
        ),
        "short": ("summarise this: {passage}",),
        "contexts": ("I don't have time to read all of it.", "This is for a status update."),
        "pii": (
            "Summarise this email from {other_name} ({other_email}): {passage}",
            "Summarise my notes for the call with {other_name}, {other_phone}: {passage}",
        ),
    },
    "translation": {
        "weight": 1.8,
        "pii_rate": 0.8,
        "slots": {
            "phrase": ("Where is the nearest pharmacy?", "I'm allergic to peanuts.",
                       "Could we move the meeting to next week?",
                       "Thank you for your hospitality, we had a wonderful time.",
                       "The package arrived damaged and I would like a refund.",
                       "Happy birthday, I hope all your wishes come true.",
                       "I'm sorry for the delay in my reply.",
                       "Can I pay by card?", "My flight has been cancelled.",
                       "Please keep the noise down after ten at night.",
                       "We are looking for a two-bedroom apartment near the centre."),
        },
        "requests": (
            "Translate into {language}: '{phrase}'",
            "How would a native speaker say '{phrase}' in {language}?",
            "Translate '{phrase}' to {language} and {language2}.",
            "Is this {language} translation of '{phrase}' natural, or does it sound robotic?",
            "Translate this to {language}, keeping it {tone}: {phrase}",
        ),
        "short": ("'{phrase}' in {language}", "translate to {language}: {phrase}"),
        "contexts": ("It's for a message to {person}'s family.", "I'm travelling next week."),
        "pii": (
            "Translate my address for a form in {language}: {my_name}, {my_address}.",
            "Translate to {language}: 'My name is {my_name}, I have {my_condition} and I take "
            "{my_med}.'",
        ),
    },
    "product_comparison": {
        "weight": 1.8,
        "pii_rate": 0.3,
        "slots": {
            "gadget": ("noise-cancelling headphones", "a robot vacuum", "an e-reader",
                       "a budget laptop for school", "a mid-range phone", "a standing desk",
                       "an espresso machine", "a mattress", "running shoes", "a stroller",
                       "a mechanical keyboard", "a smartwatch", "a 4K monitor", "an e-bike"),
            "priority": ("battery life", "durability", "price", "comfort", "noise",
                         "ease of use", "repairability", "weight", "build quality"),
        },
        "requests": (
            "What should I look for when buying {gadget}? I care most about {priority}.",
            "Compare the main types of {gadget} for someone on a {budget} budget.",
            "Is it worth spending more on {gadget}, or are cheap ones fine?",
            "Make a pros and cons table for buying {gadget} new vs refurbished.",
            "Which matters more for {gadget}: {priority} or {priority2}?",
            "Help me choose between two models of {gadget} as a gift for {person}.",
        ),
        "short": ("best {gadget} under {budget}", "is {gadget} worth it?",
                  "{gadget} buying guide"),
        "contexts": ("My old one just broke.", "I'm really indecisive.",
                     "I've read {n} reviews and I'm more confused now."),
    },
    "event_planning": {
        "weight": 1.5,
        "pii_rate": 1.2,
        "slots": {
            "event_type": ("a 30th birthday party", "a baby shower", "a team offsite",
                           "a small wedding", "a surprise retirement party",
                           "a kids' birthday party", "a dinner party", "a charity bake sale",
                           "a family reunion", "a book club launch", "a housewarming"),
        },
        "requests": (
            "Help me plan {event_type} for {n_people} people with a budget of {budget}.",
            "Make a timeline and checklist for {event_type} in {month}.",
            "Suggest {n} themes for {event_type}.",
            "Write an invitation for {event_type} on {weekday}.",
            "What games or activities work for {event_type} with mixed ages?",
            "How much food do I need for {event_type} with {n_people} guests?",
        ),
        "short": ("ideas for {event_type}", "themes for {event_type}",
                  "invite wording for {event_type}"),
        "contexts": ("I've never organised anything like this.",
                     "It's for {person}, who hates being the centre of attention.",
                     "We only have {n} weeks to plan."),
        "pii": (
            "Write an invitation for {event_type} at {my_address} on {weekday}. RSVP to "
            "{my_name} at {my_phone} or {my_email}.",
            "Make a guest list message for {event_type}. Contact {other_name} at {other_email} "
            "for the venue.",
        ),
    },
    "small_business": {
        "weight": 1.5,
        "pii_rate": 1.0,
        "slots": {
            "biz": ("bakery", "dog-walking service", "Etsy shop", "cleaning company",
                    "coffee cart", "tutoring business", "photography studio",
                    "bike repair shop", "food truck", "bookkeeping practice", "yoga studio"),
            "btopic": ("pricing", "marketing on Instagram", "hiring my first employee",
                       "getting my first customers", "cash flow", "writing a business plan",
                       "choosing a business structure", "dealing with bad reviews"),
        },
        "requests": (
            "I run a small {biz}. Give me advice on {btopic}.",
            "Write a short Instagram post announcing a new product at my {biz}.",
            "How should I approach {btopic} for a {biz}?",
            "Write a business plan outline for a {biz}.",
            "Give me {n} name ideas for a {biz}.",
            "Write a polite reply to a one-star review for my {biz}.",
            "What are the biggest mistakes people make when starting a {biz}?",
        ),
        "short": ("{biz} {btopic}", "names for a {biz}", "how to price a {biz}"),
        "contexts": ("I started it {n} months ago.", "Money is tight.",
                     "It's just me and {person}."),
        "pii": (
            "Write an invoice email to {other_name} ({other_email}) for {budget}, payable to "
            "{my_iban}, from {my_name}'s {biz}.",
            "Write the 'About us' page for my {biz}: owner {my_name}, located at {my_address}, "
            "call {my_phone}.",
        ),
    },
    "mental_wellbeing": {
        "weight": 1.8,
        "pii_rate": 1.0,
        "slots": {
            "feeling": ("overwhelmed at work", "anxious before social events",
                        "lonely since moving", "burnt out", "unmotivated",
                        "stressed about exams", "sad for no clear reason",
                        "guilty about taking breaks", "nervous about a presentation"),
        },
        "requests": (
            "I've been feeling {feeling}. Do you have any tips?",
            "Give me a {minutes}-minute routine to calm down when I'm {feeling}.",
            "How do I know if I should talk to a therapist about feeling {feeling}?",
            "Write me a short encouraging message for days when I feel {feeling}.",
            "What are some journaling prompts for when I'm {feeling}?",
            "Explain box breathing and when to use it.",
        ),
        "short": ("what to do when feeling {feeling}",
                  "how to stop overthinking everything {person} says",
                  "tips for when I'm {feeling}"),
        "contexts": ("It's been like this for a few weeks.", "I don't want to worry {person}.",
                     "I'm okay, just need some ideas."),
        "pii": (
            "I'm {my_name}, I've been diagnosed with {my_condition} and take {my_med}. Some "
            "days I still feel {feeling}. Is that normal?",
        ),
    },
    "tax": {
        "weight": 1.2,
        "pii_rate": 2.0,
        "slots": {
            "tax_q": ("what I can deduct as a freelancer", "how to file if I moved states",
                      "whether my side hustle income is taxable",
                      "how capital gains tax works on shares",
                      "what to do if I missed the filing deadline",
                      "whether I need to pay estimated taxes",
                      "how to claim home office expenses", "how tax brackets actually work"),
        },
        "requests": (
            "Can you explain {tax_q}?",
            "I'm confused about {tax_q}. I earned about {budget} extra last year.",
            "Make a checklist of documents I need for my {year} tax return.",
            "Explain the difference between a tax credit and a deduction.",
            "Help me understand {tax_q} in simple terms.",
        ),
        "short": ("{tax_q}?", "tax brackets explained with a {budget} example",
                  "freelance taxes first year {year}"),
        "contexts": ("I'm not an accountant, obviously.", "This is my first year freelancing.",
                     "I got a letter from the tax office and panicked."),
        "pii": (
            "Write a letter to the tax office: I'm {my_name}, tax reference {tax_ref}, "
            "address {my_address}. I need more time to file for {year}.",
            "My tax refund should go to {my_iban}. My reference is {tax_ref}. How do I check "
            "the status?",
        ),
    },
    "insurance_claims": {
        "weight": 1.0,
        "pii_rate": 3.0,
        "slots": {
            "ins_type": ("car", "home", "renters", "travel", "pet", "phone"),
            "incident": ("a burst pipe flooded my kitchen", "my bike was stolen",
                         "someone rear-ended my car", "my phone screen cracked",
                         "a storm damaged our roof", "my luggage was lost on a flight",
                         "my laptop got water damage"),
        },
        "requests": (
            "How do I make an insurance claim because {incident}?",
            "What should I photograph or document since {incident}?",
            "My claim was denied after {incident}. How do I appeal?",
            "Explain what an excess or deductible is.",
            "Is it worth claiming for a small amount or will my premium go up?",
        ),
        "short": ("insurance claim tips after {incident}", "{incident}, claim?",
                  "what is a deductible on {ins_type} insurance"),
        "contexts": ("The insurer is being really slow.", "This happened last {weekday}."),
        "pii": (
            "Write a claim letter: policy {policy_no}, holder {my_name}, {my_address}. "
            "On {month} {n}, {incident}.",
            "Draft an appeal for claim {claim_no}. I'm {my_name}, phone {my_phone}, email "
            "{my_email}. In short, {incident} and they refused to pay.",
            "Help me describe the incident for my insurer: {incident}. Policy {policy_no}, "
            "DOB {my_dob}.",
        ),
    },
    "customer_support": {
        "weight": 2.0,
        "pii_rate": 2.5,
        "slots": {
            "complaint": ("my order arrived broken", "I was charged twice",
                          "the refund never came", "my internet has been down for three days",
                          "they cancelled my flight without notice",
                          "the subscription renewed after I cancelled",
                          "the item is nothing like the photo", "my package was left outside "
                          "in the rain", "the delivery is two weeks late"),
            "company": ("an online store", "my internet provider", "an airline",
                        "my phone carrier", "a furniture shop", "a streaming service",
                        "my gym", "a food delivery app"),
        },
        "requests": (
            "Write a complaint to {company} because {complaint}.",
            "How do I get a refund from {company}? Basically, {complaint}.",
            "Make this complaint more {tone}: 'this is ridiculous, {complaint}, fix it now'.",
            "What can I do if {company} ignores my complaint that {complaint}?",
            "Write a chat message to {company} support: {complaint}.",
        ),
        "short": ("{complaint}, what do I do", "refund from {company}?",
                  "complaint template for {company}"),
        "contexts": ("I've already called them {n} times.", "I've been a customer for {n} years.",
                     "The chatbot keeps sending me in circles."),
        "pii": (
            "Write a complaint to {company}: order {order_no}, {complaint}. My account email "
            "is {my_email} and phone {my_phone}.",
            "Draft a message: I'm {my_name}, customer at {my_address}, account {my_account}. "
            "Issue: {complaint}.",
            "Help me dispute a charge on my card ending {card_last4} from {company}. "
            "Reason: {complaint}. Contact {my_email}.",
        ),
    },
    "study_skills": {
        "weight": 1.3,
        "pii_rate": 0.2,
        "slots": {
            "subject_area": ("organic chemistry", "economics", "anatomy", "statistics",
                             "law", "accounting", "biology", "philosophy", "computer science"),
        },
        "requests": (
            "Make me a study schedule for {subject_area} exams in {n} weeks.",
            "What are the best techniques to memorise {subject_area} facts?",
            "How do I stop procrastinating on my {subject_area} essay?",
            "Create flashcards for the basics of {subject_area}.",
            "How should I take notes in {subject_area} lectures?",
        ),
        "short": ("study tips {subject_area}", "does the pomodoro technique work for "
                  "{subject_area}?", "make flashcards for {subject_area}"),
        "contexts": ("I'm in my first year of university.", "I work part-time too.",
                     "I failed this once already."),
    },
    "spreadsheets": {
        "weight": 1.3,
        "pii_rate": 0.2,
        "slots": {
            "sheet_task": ("look up a price from another sheet", "count unique values",
                           "highlight overdue dates", "split full names into two columns",
                           "sum values by month", "remove duplicates", "make a pivot table",
                           "calculate days between two dates"),
            "app": ("Excel", "Google Sheets", "LibreOffice Calc", "Numbers"),
        },
        "requests": (
            "In {app}, how do I {sheet_task}?",
            "Write a formula to {sheet_task}.",
            "Explain XLOOKUP vs VLOOKUP vs INDEX/MATCH.",
            "My {app} formula returns #N/A when I try to {sheet_task}. Why?",
            "How can I automate a weekly report in {app}?",
        ),
        "short": ("{app} {sheet_task}", "vlookup not working in {app}", "{app} formula help"),
        "contexts": ("I have about {n} thousand rows.", "My boss wants it by {weekday}."),
    },
    "movies_books": {
        "weight": 1.3,
        "pii_rate": 0.0,
        "slots": {
            "genre": ("sci-fi", "cozy mystery", "historical fiction", "fantasy", "horror",
                      "romantic comedy", "true crime", "literary fiction", "thriller",
                      "graphic novel", "documentary"),
            "mood": ("something uplifting", "something that makes me think",
                     "something light for a flight", "a slow burn", "something scary but not "
                     "gory"),
        },
        "requests": (
            "Recommend {n} {genre} books if I want {mood}.",
            "What {genre} movies are good for a family night?",
            "I loved a {genre} book about time travel. What should I read next?",
            "Explain the ending of a {genre} film where everything was a dream, is that a "
            "cliché?",
            "Make a reading challenge with {n} {genre} books for this year.",
        ),
        "short": ("good {genre} recs for a rainy {weekday}", "recommend {mood} to watch",
                  "best {genre} of {year}"),
        "contexts": ("I read a lot but I'm in a slump.", "Watching with {person} tonight."),
    },
    "real_estate": {
        "weight": 1.0,
        "pii_rate": 1.0,
        "slots": {
            "home_q": ("renting vs buying", "how a mortgage pre-approval works",
                       "what to ask at a house viewing", "how to budget for moving",
                       "what closing costs are", "how to pick a good neighbourhood"),
        },
        "requests": (
            "Explain {home_q}.",
            "I'm thinking about {home_q}. We earn about {budget} a week combined.",
            "Make a moving checklist for {month}.",
            "What red flags should I look for when viewing an apartment?",
            "Help me think through {home_q} for a family of {n}.",
        ),
        "short": ("quick question about {home_q}", "moving checklist for {city}",
                  "first home tips for a family of {n}"),
        "contexts": ("We're moving to {city} for work.", "It's our first time buying."),
        "pii": (
            "Write a rental application cover note: {my_name}, currently at {my_address}, "
            "{my_phone}, {my_email}, employed as a nurse.",
        ),
    },
    "tech_support": {
        "weight": 1.8,
        "pii_rate": 0.6,
        "slots": {
            "device": ("laptop", "iPhone", "Android phone", "printer", "Wi-Fi router",
                       "smart TV", "Windows PC", "MacBook", "tablet"),
            "tproblem": ("is really slow", "won't connect to Wi-Fi", "keeps restarting",
                         "battery drains fast", "has no sound", "won't turn on",
                         "says storage is full", "keeps disconnecting Bluetooth"),
        },
        "requests": (
            "My {device} {tproblem}. How do I fix it?",
            "How do I back up my {device} before resetting it?",
            "Explain how to set up two-factor authentication for my email.",
            "Is it safe to let my {device} update automatically?",
            "My parents' {device} {tproblem}. How can I explain the fix over the phone?",
            "How do I transfer photos from my {device} to my {device2}?",
        ),
        "short": ("my {device} {tproblem}", "how to factory reset my {device}",
                  "{device} battery saving tips"),
        "contexts": ("It's about {n} years old.", "I'm not very techy.",
                     "I already tried turning it off and on again."),
        "pii": (
            "I got a suspicious email at {my_email} saying my account is locked and asking for "
            "my phone {my_phone}. Is this phishing?",
        ),
    },
    "ai_ml": {
        "weight": 1.2,
        "pii_rate": 0.0,
        "slots": {
            "ml": ("overfitting", "transformers", "gradient descent", "embeddings",
                   "fine-tuning", "differential privacy", "RAG", "tokenisation",
                   "cross-validation", "batch normalisation", "LoRA", "attention"),
        },
        "requests": (
            "Explain {ml} with an analogy.",
            "What's the difference between {ml} and {ml2}?",
            "How do I get started learning about {ml} if I know some Python?",
            "Write a short PyTorch example that shows {ml}.",
            "What are the limitations of {ml}?",
        ),
        "short": ("{ml} explained for beginners", "what is {ml} in simple terms", "{ml} vs {ml2}"),
        "contexts": ("I'm a software engineer moving into ML.", "It's for a reading group."),
    },
    "philosophy_trivia": {
        "weight": 1.0,
        "pii_rate": 0.0,
        "slots": {
            "idea": ("the trolley problem", "stoicism", "free will", "utilitarianism",
                     "the ship of Theseus", "existentialism", "Occam's razor",
                     "the prisoner's dilemma", "Pascal's wager"),
        },
        "requests": (
            "Explain {idea} and the main objections to it.",
            "How would a follower of {idea} handle a stressful job?",
            "Give me a fun fact about {idea} I can share at dinner.",
            "Compare {idea} and {idea2}.",
            "Write a short dialogue between two friends arguing about {idea}.",
        ),
        "short": ("{idea} explained simply", "what is {idea} in a nutshell",
                  "real life examples of {idea}"),
        "contexts": ("I'm just curious.", "We argued about this at the pub."),
    },
    "sports_hobbies": {
        "weight": 1.0,
        "pii_rate": 0.1,
        "slots": {
            "hobby": ("chess", "rock climbing", "knitting", "photography", "guitar",
                      "watercolour painting", "bouldering", "birdwatching", "sourdough baking",
                      "woodworking", "tennis", "swimming", "board games", "3D printing"),
        },
        "requests": (
            "How do I get started with {hobby} on a budget of {budget}?",
            "Make me a {n}-week plan to get better at {hobby}.",
            "What beginner mistakes should I avoid in {hobby}?",
            "Is {hobby} or {hobby2} better for relaxing after work?",
            "What gear do I actually need for {hobby}?",
        ),
        "short": ("{hobby} for complete beginners", "{hobby} tips for beginners",
                  "cheap {hobby} gear to start with"),
        "contexts": ("I've wanted to try this for years.", "I have {minutes} minutes a day."),
    },
}

# Sentence pool for summarisation passages (meeting notes, reviews, articles).
_PASSAGE_SENTENCES = (
    "The team agreed to move the launch to {month} because testing is behind schedule.",
    "{n} customers reported that the checkout page freezes on mobile.",
    "Marketing wants a bigger budget, roughly {budget}, for the spring campaign.",
    "The new supplier is cheaper but deliveries have been late twice this quarter.",
    "Everyone liked the prototype, although the battery life was a concern.",
    "We need a decision on the office move by {weekday}.",
    "Sales in {city} grew by {n} percent compared to last year.",
    "The hotel was clean and the staff were friendly, but breakfast was disappointing.",
    "The author argues that remote work improves focus but hurts mentoring of juniors.",
    "Two people are leaving the team next month, so hiring is now urgent.",
    "The study followed {n} hundred participants over {n} years.",
    "Customer complaints fell after the new returns policy was introduced.",
    "The council plans to close the main road for repairs during {month}.",
    "Some members felt the proposal was rushed and asked for more data.",
    "The report recommends replacing the old servers before the end of {year}.",
    "Action item: someone needs to update the onboarding guide.",
    "The product arrived on time, but the instructions were confusing.",
    "Researchers found that short walks after meals lowered blood sugar levels.",
    "The school is introducing a four-day week as a pilot in {city}.",
    "The budget for next year is flat, so every new project needs a sponsor.",
    "Attendance at the weekly meeting has dropped, and people want it shorter.",
    "Overall, the reviewer gave it three stars and said it was fine for the price.",
)
# fmt: on


# ---------------------------------------------------------------------------------------------
# Slot filling.
# ---------------------------------------------------------------------------------------------


class _Filler(dict):
    """``str.format_map`` target that draws each slot lazily (and consistently) from the rng."""

    def __init__(
        self, rng: random.Random, slots: dict[str, SlotValue], persona: dict[str, str]
    ) -> None:
        super().__init__()
        self.rng = rng
        self.slots = slots
        self.persona = persona
        self.pii_kinds: set[str] = set()

    def fill(self, template: str) -> str:
        return template.format_map(self)

    def passage(self) -> str:
        k = self.rng.randint(3, 6)
        sentences = self.rng.sample(_PASSAGE_SENTENCES, k)
        # Fresh filler per sentence so repeated slots ({n}) vary within the passage.
        out = []
        for s in sentences:
            sub = _Filler(self.rng, self.slots, self.persona)
            out.append(sub.fill(s))
        return " ".join(out)

    def _draw(self, key: str) -> str:
        if key in _PII_KIND:
            self.pii_kinds.add(_PII_KIND[key])
            if key in self.persona:
                return self.persona[key]
            return _PII_GENERATORS[key](self)
        base = key.rstrip("0123456789") or key
        spec = self.slots.get(base)
        if spec is None:
            spec = _COMMON.get(base)
        if spec is None:
            raise KeyError(key)
        if callable(spec):
            value = spec(self)
        else:
            value = self.rng.choice(spec)
            if base != key:  # e.g. {dish2}: avoid repeating {dish}
                taken = {v for k, v in self.items() if k.rstrip("0123456789") == base}
                for _ in range(5):
                    if value not in taken:
                        break
                    value = self.rng.choice(spec)
        # Slot values may themselves contain slots (e.g. "since {month}").
        if "{" in value:
            value = value.format_map(self)
        return value

    def __missing__(self, key: str) -> str:
        value = self._draw(key)
        self[key] = value
        return value


# ---------------------------------------------------------------------------------------------
# Styling: openers/closers, lowercase, typos, texting abbreviations.
# ---------------------------------------------------------------------------------------------

# fmt: off
_CASUAL = (("please", "pls"), ("you", "u"), ("thanks", "thx"), ("because", "bc"),
           ("probably", "prob"), ("tomorrow", "tmrw"), ("people", "ppl"))
# fmt: on


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s and s[0].islower() else s


def _typo(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    idx = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not idx:
        return text
    i = rng.choice(idx)
    w = words[i]
    j = rng.randrange(1, len(w) - 1)
    op = rng.randrange(3)
    if op == 0:
        w = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    elif op == 1:
        w = w[:j] + w[j + 1 :]
    else:
        w = w[:j] + w[j] + w[j:]
    words[i] = w
    return " ".join(words)


def _casualise(text: str) -> str:
    words = text.split(" ")
    subs = dict(_CASUAL)
    return " ".join(subs.get(w.lower(), w) for w in words)


# ---------------------------------------------------------------------------------------------
# Users and records.
# ---------------------------------------------------------------------------------------------

TOPICS: tuple[str, ...] = tuple(_TOPIC_SPECS)
_TOPIC_WEIGHTS = tuple(float(_TOPIC_SPECS[t]["weight"]) for t in TOPICS)


def _weighted_sample(rng: random.Random, items: Sequence[Any], weights: Sequence[float], k: int):
    """k distinct items, sampled without replacement proportional to weight."""
    keys = [(rng.random() ** (1.0 / w) if w > 0 else 0.0, i) for i, w in enumerate(weights)]
    keys.sort(reverse=True)
    return [items[i] for _, i in keys[:k]]


def _make_user(rng: random.Random) -> dict[str, Any]:
    k = rng.randint(2, 4)
    return {
        "persona": _make_persona(rng),
        "favourites": _weighted_sample(rng, TOPICS, _TOPIC_WEIGHTS, k),
        "p_fav": rng.uniform(0.55, 0.85),
        "p_lower": rng.choice((0.0, 0.05, 0.1, 0.3, 0.7)),
        "p_typo": rng.choice((0.0, 0.0, 0.05, 0.15, 0.3)),
        "p_casual": rng.choice((0.0, 0.0, 0.1, 0.4)),
        "p_polite": rng.uniform(0.05, 0.7),
        "p_context": rng.uniform(0.2, 0.75),
        "p_short": rng.choice((0.05, 0.1, 0.15, 0.3)),
    }


def _compose(
    rng: random.Random, topic: str, user: dict[str, Any], with_pii: bool
) -> tuple[str, set[str]]:
    """One instruction: [opener] [context...] [pii] request [follow-up] [constraint] [closer]."""
    spec = _TOPIC_SPECS[topic]
    filler = _Filler(rng, spec["slots"], user["persona"])

    if not with_pii and rng.random() < user["p_short"]:
        text = filler.fill(rng.choice(spec["short"]))
        if rng.random() < 0.4:
            text = _cap(text)
        if rng.random() < user["p_typo"]:
            text = _typo(rng, text)
        return text, filler.pii_kinds

    # (template, optional): optional parts are dropped again if the text gets too long.
    parts: list[tuple[str, bool]] = []
    if rng.random() < user["p_context"]:
        ctx = spec["contexts"]
        k = 2 if (len(ctx) > 2 and rng.random() < 0.35) else 1
        parts.extend((c, True) for c in rng.sample(ctx, k))
    if rng.random() < 0.12:
        parts.append((rng.choice(_RAMBLES), True))

    pii_line = None
    pii_templates = spec.get("pii", ())
    if with_pii and pii_templates and rng.random() < 0.65:
        core = rng.choice(pii_templates)
    else:
        core = rng.choice(spec["requests"])
        if with_pii:
            pii_line = rng.choice(_GENERIC_PII)
    if pii_line and rng.random() < 0.5:
        parts.append((pii_line, False))
        pii_line = None
    parts.append((core, False))
    if pii_line:
        parts.append((pii_line, False))
    if rng.random() < 0.15:
        follow = rng.choice([r for r in spec["requests"] if r != core])
        parts.append((rng.choice(_FOLLOW_UPS) + follow[:1].lower() + follow[1:], True))
    if rng.random() < 0.3:
        parts.append((rng.choice(_CONSTRAINTS), True))

    filled = [(_cap(filler.fill(t)), opt) for t, opt in parts]
    # Keep instructions at most ~_MAX_WORDS words: drop the longest optional parts first.
    while sum(len(t.split()) for t, _ in filled) > _MAX_WORDS and any(o for _, o in filled):
        longest = max((i for i, (_, o) in enumerate(filled) if o), key=lambda i: len(filled[i][0]))
        del filled[longest]
    sentences = [t for t, _ in filled]
    if rng.random() < user["p_polite"]:
        if rng.random() < 0.5:
            opener = rng.choice(_OPENERS)
            first = sentences[0]
            if opener[-1] in ",:" and len(first) > 1 and first[1].islower():
                sentences[0] = first[0].lower() + first[1:]
            sentences.insert(0, opener)
        else:
            sentences.append(rng.choice(_CLOSERS))
    text = " ".join(sentences)

    if rng.random() < user["p_casual"]:
        text = _casualise(text)
    if rng.random() < user["p_lower"]:
        text = text.lower()
        if rng.random() < 0.5:
            text = text.rstrip(".!")
    if rng.random() < user["p_typo"]:
        text = _typo(rng, text)
        if rng.random() < 0.3:
            text = _typo(rng, text)
    return text, filler.pii_kinds


def generate_tagged_records(
    n: int = 3000, seed: int = 0, num_users: int = 300
) -> list[dict[str, Any]]:
    """Like :func:`generate_demo_records` but each record also has ``topic`` and ``pii``.

    Why: tests and evaluation (e.g. checking that PII scrubbing or DP filtering works)
    need ground truth that the plain demo records deliberately do not expose.
    ``pii`` is a sorted list of the fake detail kinds present (empty when none).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if num_users < 1:
        raise ValueError("num_users must be >= 1")
    rng = random.Random(seed)
    width = max(4, len(str(num_users)))
    users = [_make_user(rng) for _ in range(num_users)]

    # Zipf-like activity: a random user gets rank r with weight 1/r.
    ranks = list(range(1, num_users + 1))
    rng.shuffle(ranks)
    activity = [1.0 / r for r in ranks]
    if n >= num_users:
        owners = list(range(num_users))
        owners += rng.choices(range(num_users), weights=activity, k=n - num_users)
    else:
        owners = rng.choices(range(num_users), weights=activity, k=n)
    rng.shuffle(owners)

    topics = []
    for u in owners:
        user = users[u]
        if rng.random() < user["p_fav"]:
            topics.append(rng.choice(user["favourites"]))
        else:
            topics.append(rng.choices(TOPICS, weights=_TOPIC_WEIGHTS, k=1)[0])

    # Exactly round(PII_SHARE * n) records carry personal details, chosen by topic propensity.
    n_pii = round(PII_SHARE * n)
    propensity = [max(float(_TOPIC_SPECS[t]["pii_rate"]), 0.02) for t in topics]
    pii_idx = set(_weighted_sample(rng, range(n), propensity, n_pii))

    records = []
    for i, (u, topic) in enumerate(zip(owners, topics, strict=True)):
        text, kinds = _compose(rng, topic, users[u], i in pii_idx)
        records.append(
            {
                "id": f"demo-{i + 1:06d}",
                "user_id": f"user-{u + 1:0{width}d}",
                "text": text,
                "topic": topic,
                "pii": sorted(kinds),
            }
        )
    return records


def generate_demo_records(n: int = 3000, seed: int = 0, num_users: int = 300) -> list[dict]:
    """Synthetic private chat-log records for ``dpray demo`` (offline, deterministic).

    Each record: ``{"id": "demo-000001", "user_id": "user-0042", "text": "..."}``.
    Same ``(n, seed, num_users)`` gives the same list; every user appears at least once
    when ``n >= num_users``; about 20% of texts contain clearly fake personal details.
    """
    return [
        {"id": r["id"], "user_id": r["user_id"], "text": r["text"]}
        for r in generate_tagged_records(n=n, seed=seed, num_users=num_users)
    ]


def write_demo_jsonl(
    path: str | pathlib.Path, n: int = 3000, seed: int = 0, num_users: int = 300
) -> pathlib.Path:
    """Write :func:`generate_demo_records` as JSONL (one record a line) and return the path.

    Why: the pipeline's readers take JSONL files, so the demo materialises its private
    corpus on disk exactly like a provider's exported chat logs would be.
    """
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for rec in generate_demo_records(n=n, seed=seed, num_users=num_users):
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out
