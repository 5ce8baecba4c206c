"""Slot values for the voice-assistant grammar: spoken numbers, times and dates, and the word
lists a template's ``{slot}`` markers draw from (`SLOTS`).

Transcripts must be exactly what a synthesizer says, so numbers, times and dates are spelled as
words ("twenty five minutes", "seven thirty pm", "march third") and abbreviations are avoided.
Each slot is a small function of one `random.Random`, so composite phrases (times, durations,
"when" clauses) stay readable and a seed reproduces every draw.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["MONTHS", "SLOTS", "WAKE", "WEEKDAYS", "number_words", "ordinal_words"]


def _words(s: str) -> list[str]:
    """Space-separated single words; keeps the long vocabulary lists easy to edit."""
    return s.split()


def _phrases(s: str) -> list[str]:
    """Comma-separated phrases that may contain spaces ("living room")."""
    return s.split(", ")


# ---------------------------------------------------------------------------------------
# Numbers, times, dates
# ---------------------------------------------------------------------------------------

_ONES = _words("zero one two three four five six seven eight nine ten eleven twelve thirteen "
               "fourteen fifteen sixteen seventeen eighteen nineteen")
_TENS = _words("_ _ twenty thirty forty fifty sixty seventy eighty ninety")
_ORD_IRREGULAR = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}


def number_words(n: int, use_and: bool = False) -> str:
    """Spell a non-negative integer below one million ("three hundred and fifty")."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number out of range: {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = _ONES[hundreds] + " hundred"
        if rest == 0:
            return head
        return head + (" and " if use_and else " ") + number_words(rest)
    thousands, rest = divmod(n, 1000)
    head = number_words(thousands) + " thousand"
    if rest == 0:
        return head
    joiner = " and " if use_and and rest < 100 else " "
    return head + joiner + number_words(rest, use_and)


def ordinal_words(n: int) -> str:
    """Spell an ordinal ("twenty first", "third", "fortieth")."""
    words = number_words(n).split()
    last = words[-1]
    if last in _ORD_IRREGULAR:
        last = _ORD_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last = last + "th"
    return " ".join([*words[:-1], last])


def _num(rng: random.Random, lo: int, hi: int) -> str:
    return number_words(rng.randint(lo, hi), use_and=rng.random() < 0.3)


def _clock_time(rng: random.Random) -> str:
    """A spoken clock time: "seven thirty pm", "quarter to nine", "noon", "six oh five"."""
    hour = rng.randint(1, 12)
    h = number_words(hour)
    style = rng.random()
    if style < 0.06:
        return rng.choice(["noon", "midnight"])
    if style < 0.20:
        nxt = number_words(hour % 12 + 1)
        return rng.choice([f"half past {h}", f"quarter past {h}", f"quarter to {nxt}",
                           f"ten past {h}", f"twenty to {nxt}", f"five past {h}"])
    minute = rng.choice([0, 0, 0, 15, 30, 30, 45, rng.randint(1, 59)])
    if minute == 0:
        base = rng.choice([f"{h} o'clock", h])
    elif minute < 10:
        base = f"{h} oh {number_words(minute)}"
    else:
        base = f"{h} {number_words(minute)}"
    suffix = rng.choice(["am", "pm", "pm", "", "", "in the morning", "in the evening",
                         "in the afternoon", "at night", "tonight"])
    if base.endswith("o'clock") and suffix in ("am", "pm"):
        suffix = ""
    return f"{base} {suffix}".strip()


MONTHS = _words("january february march april may june july august september october november "
                "december")
WEEKDAYS = _words("monday tuesday wednesday thursday friday saturday sunday")


def _date(rng: random.Random) -> str:
    month = rng.choice(MONTHS)
    day = ordinal_words(rng.randint(1, 28 if month == "february" else 30))
    return rng.choice([f"{month} {day}", f"{month} {day}", f"the {day} of {month}",
                       f"{rng.choice(WEEKDAYS)} the {day}"])


def _day(rng: random.Random) -> str:
    """A relative day phrase usable after a verb: "tomorrow", "on friday", "next week"."""
    wd = rng.choice(WEEKDAYS)
    return rng.choice(["today", "tomorrow", "tonight", "this weekend", "this afternoon",
                       "tomorrow morning", "this evening", f"on {wd}", f"next {wd}",
                       f"this {wd}", f"{wd} morning", f"{wd} night", "next week",
                       "the day after tomorrow", f"on {_date(rng)}"])


def _duration(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.45:
        n = rng.randint(2, 90)
        return f"{number_words(n)} minutes"
    if r < 0.60:
        return f"{number_words(rng.randint(2, 59))} seconds"
    if r < 0.72:
        return rng.choice(["one minute", "an hour", "half an hour", "an hour and a half",
                           "a minute and a half", "ninety seconds", "a quarter of an hour"])
    if r < 0.85:
        return f"{number_words(rng.randint(2, 12))} hours"
    hours = rng.randint(1, 3)
    unit = "hour" if hours == 1 else "hours"
    return f"{number_words(hours)} {unit} and {number_words(rng.randint(2, 55))} minutes"


def _when(rng: random.Random) -> str:
    """When a reminder should fire."""
    r = rng.random()
    if r < 0.30:
        return f"at {_clock_time(rng)}"
    if r < 0.45:
        return f"in {_duration(rng)}"
    if r < 0.85:
        return _day(rng)
    return rng.choice(["when i get home", "when i leave work", "when i get to the office",
                       "before i go to bed", "after lunch", "first thing in the morning",
                       "every morning", "every day at noon"])


def _phone_number(rng: random.Random) -> str:
    digits = [rng.randint(0, 9) for _ in range(7)]
    zero = rng.choice(["zero", "oh"])
    return " ".join(zero if d == 0 else _ONES[d] for d in digits)


# ---------------------------------------------------------------------------------------
# Vocabulary lists
# ---------------------------------------------------------------------------------------
# Kept deliberately short and plain: the spec asks for a vocabulary of several hundred
# words, and a small acoustic model only learns words it hears often.  Over 20000 sampled
# sentences every word should occur at least ~15 times, so prefer words that several lists
# share (e.g. presidents reuse street names, spelling words reuse command words) over
# exotic names and titles.  Check with `python -m data_prep.recipes.voice_assistant.grammar` after editing a list.

ROOMS = _phrases("kitchen, living room, bedroom, bathroom, office, garage, hallway, "
                 "dining room, basement, guest room, attic, laundry room, kids room, "
                 "family room, porch, study")
APPLIANCES = _phrases("fan, heater, air conditioner, television, coffee maker, dishwasher, "
                      "washing machine, dryer, oven, ceiling fan")
LIGHTS = _phrases("lights, lamp, ceiling light, floor lamp, desk lamp, night light, "
                  "reading light, porch light")
COLORS = _phrases("red, blue, green, purple, orange, yellow, white, warm white")
DOORS = _phrases("front door, back door, side door, garage door, patio door, basement door, "
                 "gate")
COVERINGS = _words("blinds curtains shades")
SCENES = _phrases("movie night, good night, good morning, reading, dinner, party")
NAMES = _words("sarah michael emily david james daniel emma ryan laura rachel peter grace "
               "henry jack anna maria thomas george")
RELATIONS = _phrases("mom, dad, grandma, grandpa, my wife, my husband, my sister, my brother, "
                     "my boss, the dentist, the doctor, my aunt, my uncle, my neighbor, "
                     "my daughter, my son")
CITIES = _phrases("london, paris, tokyo, new york, chicago, boston, seattle, denver, houston, "
                  "miami, san francisco, los angeles, toronto, sydney, berlin, rome")
COUNTRIES = _words("france germany japan canada italy spain mexico china")
LANGUAGES = _words("spanish french german italian japanese chinese korean greek")
PHRASES = _phrases("thank you, good morning, where is the bathroom, good night, i'm sorry, "
                   "happy birthday, where is the train station, i would like a coffee, "
                   "see you tomorrow, how are you")
GENRES = _words("jazz rock pop classical country blues piano")
ARTISTS = _phrases("the beatles, taylor swift, queen, adele, mozart, beethoven")
MOODS = _words("relaxing upbeat calm happy sad romantic quiet")
PLAYLISTS = _phrases("favorites, morning, workout, dinner party, sunday morning, running, "
                     "cooking")
SPORTS = _words("football basketball baseball hockey soccer")
SHOP_ITEMS = _phrases("milk, eggs, bread, butter, cheese, apples, bananas, oranges, tomatoes, "
                      "potatoes, carrots, rice, pasta, sugar, salt, coffee, tea, orange juice, "
                      "chicken, beef, fish, bacon, beans, soup, chips, cookies, chocolate, "
                      "ice cream, paper towels, toilet paper, dish soap, trash bags, dog food, "
                      "cat food")
QUANTITIES = _phrases("a dozen, two, three, four, six, a bag of, a box of, a bottle of, "
                      "a pound of, two pounds of, a pack of, some")
TASKS = _phrases("call the dentist, take out the trash, water the plants, pick up the kids, "
                 "buy milk, pay the bills, feed the cat, walk the dog, book a table, "
                 "take my medicine, charge my phone, pack my lunch, lock the back door, "
                 "drink some water, call mom, clean the kitchen, do my homework, "
                 "start the laundry, bring an umbrella, check the oven, go to the gym")
EVENTS = _phrases("dentist appointment, team meeting, yoga class, soccer practice, "
                  "birthday party, doctor's appointment, haircut, flight, piano lesson, "
                  "date night")
MESSAGES = _phrases("i'm running late, i'm on my way, happy birthday, call me when you can, "
                    "dinner is ready, don't forget the milk, can you pick me up, i love you, "
                    "i'll call you later, the meeting is cancelled, are you free tonight, "
                    "see you soon, what time is the party, i'll be there in five minutes, "
                    "please call me back")
PLACES = _phrases("gas station, pharmacy, grocery store, coffee shop, hospital, bank, library, "
                  "airport, train station, park, gym, movie theater, hotel, pizza place, "
                  "bus stop, school, mall, beach")
CUISINES = _words("italian chinese japanese greek french korean")
STREETS = _words("main oak maple park washington lincoln church river sunset jefferson "
                 "madison")
STREET_TYPES = _words("street avenue road drive lane")
ANIMALS = _words("dogs cats horses birds bears")
DISHES = _phrases("pancakes, banana bread, chicken soup, pizza, pasta, chocolate cookies, "
                  "french toast")
FOODS = _phrases("an apple, a banana, an egg, an orange, a cookie")
# "How do you spell ..." only uses words the rest of the grammar already says.
WORDS = _words("restaurant calendar library temperature umbrella february wednesday "
               "thermostat appointment dishwasher")
LANDMARKS = _phrases("the eiffel tower, the statue of liberty, the golden gate bridge")
FACT_SUBJECTS = _phrases("the tallest building, the longest river, the highest mountain")
# Presidents whose names the contact and street lists already use.
PEOPLE = _phrases("george washington, thomas jefferson, james madison")
HOLIDAYS = _phrases("christmas, thanksgiving, halloween, easter, my birthday")
COMPANIES = _words("apple google amazon")
LIST_NAMES = _phrases("party, christmas, birthday, homework, weekend, grocery")
LENGTH_UNITS = _words("inches feet miles centimeters meters kilometers")
WEIGHT_UNITS = _words("ounces pounds grams kilograms")
VOLUME_UNITS = _words("cups teaspoons tablespoons liters gallons")
TEMP_UNITS = ["degrees fahrenheit", "degrees celsius"]
CURRENCIES = _words("dollars euros pounds yen pesos")
TIMER_LABELS = _phrases("pasta, egg, pizza, laundry, tea, rice, cookie, workout, nap, "
                        "homework, bread, oven, study, break")
PODCAST_TOPICS = _phrases("history, science, comedy, sports, cooking")
PAST = _phrases("last night, yesterday, this morning, last week, last weekend")
WAKE = _phrases("hey computer, computer, okay computer, hey assistant, assistant")

def _pick(options: list[str]) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(options)


def _unit_pair(rng: random.Random) -> tuple[str, str]:
    group = rng.choice([LENGTH_UNITS, WEIGHT_UNITS, VOLUME_UNITS, TEMP_UNITS, CURRENCIES])
    a, b = rng.sample(group, 2)
    return a, b


def _conversion(rng: random.Random) -> str:
    a, b = _unit_pair(rng)
    n = _num(rng, 1, 500)
    return rng.choice([f"convert {n} {a} to {b}", f"how many {b} are in {n} {a}",
                       f"what is {n} {a} in {b}", f"{n} {a} in {b}"])


def _calculation(rng: random.Random) -> str:
    a, b = _num(rng, 1, 999), _num(rng, 1, 99)
    op = rng.choice(["plus", "minus", "times", "divided by", "multiplied by"])
    return rng.choice([f"what is {a} {op} {b}", f"what's {a} {op} {b}",
                       f"calculate {a} {op} {b}", f"what's {b} percent of {a}",
                       f"what is the square root of {a}", f"what's {b} squared",
                       f"how much is {a} {op} {b}", f"{a} {op} {b}"])


def _address(rng: random.Random) -> str:
    return f"{_num(rng, 1, 2999)} {rng.choice(STREETS)} {rng.choice(STREET_TYPES)}"


def _fact(rng: random.Random) -> str:
    return f"{rng.choice(FACT_SUBJECTS)} in {rng.choice(COUNTRIES)}"


def _contact(rng: random.Random) -> str:
    return rng.choice(NAMES) if rng.random() < 0.75 else rng.choice(RELATIONS)


SLOTS: dict[str, Callable[[random.Random], str]] = {
    "room": _pick(ROOMS), "appliance": _pick(APPLIANCES), "light": _pick(LIGHTS),
    "color": _pick(COLORS), "door": _pick(DOORS), "covering": _pick(COVERINGS),
    "scene": _pick(SCENES), "contact": _contact, "city": _pick(CITIES),
    "country": _pick(COUNTRIES), "language": _pick(LANGUAGES), "phrase": _pick(PHRASES),
    "genre": _pick(GENRES), "artist": _pick(ARTISTS), "mood": _pick(MOODS),
    "playlist": _pick(PLAYLISTS), "sport": _pick(SPORTS), "item": _pick(SHOP_ITEMS),
    "qty": _pick(QUANTITIES), "task": _pick(TASKS), "event": _pick(EVENTS),
    "message": _pick(MESSAGES), "place": _pick(PLACES), "cuisine": _pick(CUISINES),
    "animals": _pick(ANIMALS), "dish": _pick(DISHES), "food": _pick(FOODS),
    "word": _pick(WORDS), "landmark": _pick(LANDMARKS), "fact": _fact,
    "person": _pick(PEOPLE), "holiday": _pick(HOLIDAYS), "past": _pick(PAST),
    "company": _pick(COMPANIES), "listname": _pick(LIST_NAMES),
    "label": _pick(TIMER_LABELS), "topic": _pick(PODCAST_TOPICS),
    "weekday": _pick(WEEKDAYS), "month": _pick(MONTHS),
    "time": _clock_time, "date": _date, "day": _day, "duration": _duration, "when": _when,
    "updown": _pick(["up", "down"]), "currency": _pick(CURRENCIES),
    "phone": _phone_number, "address": _address, "conversion": _conversion,
    "calc": _calculation,
    "small": lambda rng: _num(rng, 2, 10),
    "n": lambda rng: _num(rng, 1, 100),
    "percent": lambda rng: number_words(rng.choice(range(5, 101, 5))),
    "temp": lambda rng: number_words(rng.randint(60, 78)),
    "celsius": lambda rng: number_words(rng.randint(16, 26)),
    "oven": lambda rng: number_words(rng.choice(range(300, 476, 25)), rng.random() < 0.4),
    "year": lambda rng: f"{rng.choice(['nineteen', 'twenty'])} {_num(rng, 10, 99)}",
}
