"""Seeded text generator for a synthetic voice-assistant corpus.

Every sentence is something a voice assistant hears: timers, alarms, reminders, calendar,
weather, music and volume, smart-home control, calls and messages, navigation, shopping
lists, unit conversion, arithmetic and general questions.

Why it looks like this:
  * Transcripts must be speakable by espeak-ng *and* be exactly what it says, so numbers,
    times and dates are written as words ("set a timer for twenty five minutes",
    "seven thirty pm", "march third") and abbreviations are avoided.
  * The charset is fixed to lower-case a-z, apostrophe and space (see `normalize_text`),
    so the tokenizer elsewhere never meets an unknown character.
  * Templates are plain strings with ``{slot}`` markers; a trailing digit on a slot name
    (``{city2}``) draws a second, independent value from the same slot.  Slots are small
    functions of the RNG so composite phrases (times, durations, "when" clauses) stay
    readable.
  * Everything is driven by one `random.Random`, so a seed reproduces the corpus.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator


def _words(s: str) -> list[str]:
    """Space-separated single words; keeps the long vocabulary lists easy to edit."""
    return s.split()


def _phrases(s: str) -> list[str]:
    """Comma-separated phrases that may contain spaces ("living room")."""
    return s.split(", ")


MIN_WORDS = 2
MAX_WORDS = 14

_BAD_CHARS = re.compile(r"[^a-z' ]+")
_SPACES = re.compile(r" +")


def normalize_text(s: str) -> str:
    """Lower-case, map anything outside [a-z' ] to a space, collapse spaces.

    Hyphens and other punctuation become word breaks rather than vanishing so that
    "twenty-five" normalizes to "twenty five", not "twentyfive".
    """
    s = _BAD_CHARS.sub(" ", s.lower())
    return _SPACES.sub(" ", s).strip()


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
    return " ".join(words[:-1] + [last])


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

ROOMS = _phrases("kitchen, living room, bedroom, bathroom, office, garage, hallway, "
                 "dining room, basement, nursery, guest room, attic, laundry room, study, "
                 "den, master bedroom, kids room, playroom, family room, porch, patio, "
                 "sunroom")
APPLIANCES = _phrases("fan, heater, air conditioner, television, coffee maker, dishwasher, "
                      "washing machine, dryer, robot vacuum, humidifier, air purifier, oven, "
                      "fireplace, sprinklers, kettle, ceiling fan, radio, dehumidifier, "
                      "hot tub, space heater, electric blanket, projector")
LIGHTS = _phrases("lights, lamp, ceiling light, floor lamp, desk lamp, night light, "
                  "reading light, string lights, porch light, overhead lights")
COLORS = ["red", "blue", "green", "purple", "orange", "yellow", "pink", "white", "teal",
          "warm white", "cool white", "soft blue", "lavender", "gold", "turquoise",
          "magenta", "amber", "daylight"]
DOORS = _phrases("front door, back door, side door, garage door, patio door, basement door, "
                 "gate, shed")
COVERINGS = _words("blinds curtains shades shutters")
SCENES = _phrases("movie night, good night, good morning, away, reading, dinner, party, "
                  "relax, focus, bedtime, vacation, romantic")
NAMES = _words("sarah michael emily david jessica james olivia daniel sophia matthew emma "
               "andrew chloe ryan hannah kevin laura brian rachel steven megan jason natalie "
               "thomas rebecca peter amanda george lucy oliver grace henry alice jack "
               "isabella samuel victoria william charlotte benjamin zoe nathan claire robert "
               "julia patrick katie marcus nina oscar ruby simon tara vincent wendy linda "
               "carlos maria fatima ahmed priya raj mei kenji anna ivan sofia luca")
RELATIONS = _phrases("mom, dad, grandma, grandpa, my wife, my husband, my sister, my brother, "
                     "my boss, the dentist, the office, the doctor, my aunt, my uncle, "
                     "my neighbor, the babysitter, the plumber, my daughter, my son")
CITIES = _phrases("london, paris, tokyo, new york, chicago, boston, seattle, denver, dallas, "
                  "houston, miami, atlanta, phoenix, san francisco, los angeles, san diego, "
                  "portland, austin, detroit, toronto, vancouver, montreal, sydney, "
                  "melbourne, dublin, edinburgh, glasgow, manchester, liverpool, berlin, "
                  "madrid, rome, lisbon, amsterdam, vienna, prague, oslo, stockholm, "
                  "helsinki, copenhagen, athens, cairo, nairobi, mumbai, delhi, singapore, "
                  "bangkok, seoul, mexico city, lima, buenos aires, cape town, honolulu, "
                  "nashville, philadelphia, pittsburgh, minneapolis, las vegas, orlando, "
                  "new orleans")
COUNTRIES = _phrases("france, germany, japan, canada, brazil, australia, india, china, italy, "
                     "spain, mexico, egypt, kenya, norway, sweden, finland, iceland, ireland, "
                     "scotland, portugal, greece, turkey, peru, chile, argentina, thailand, "
                     "vietnam, indonesia, new zealand, south africa, morocco, poland, russia, "
                     "switzerland, austria, belgium, denmark, nigeria, colombia, cuba")
LANGUAGES = _words("spanish french german italian japanese chinese portuguese russian arabic "
                   "hindi korean dutch greek swedish polish turkish")
PHRASES = _phrases("thank you, good morning, where is the bathroom, how much does this cost, "
                   "nice to meet you, good night, excuse me, i'm sorry, happy birthday, "
                   "where is the train station, i would like a coffee, see you tomorrow, "
                   "i don't understand, the check please, how are you")
GENRES = _phrases("jazz, rock, pop, classical, hip hop, country, blues, reggae, folk, metal, "
                  "soul, funk, disco, techno, electronic, ambient, indie, punk, gospel, "
                  "opera, salsa, lo fi, bluegrass, swing, piano, acoustic")
ARTISTS = _phrases("the beatles, taylor swift, queen, miles davis, mozart, beethoven, bach, "
                   "adele, coldplay, elvis presley, madonna, prince, bob marley, "
                   "frank sinatra, ed sheeran, the rolling stones, nirvana, abba, "
                   "dolly parton, johnny cash, billie holiday, ella fitzgerald, "
                   "louis armstrong, chopin, vivaldi, stevie wonder, whitney houston, "
                   "bruce springsteen, fleetwood mac, pink floyd, david bowie, "
                   "aretha franklin, norah jones")
MOODS = _phrases("relaxing, upbeat, calm, happy, sad, romantic, energetic, peaceful, dreamy, "
                 "cheerful, quiet, soothing, party, workout, study, sleep")
PLAYLISTS = _phrases("my favorites, morning mix, road trip, chill vibes, workout, "
                     "dinner party, sunday morning, throwback hits, rainy day, summer songs, "
                     "focus, bedtime, cooking, running, kids songs")
SPORTS = _words("football basketball baseball hockey soccer tennis golf cricket rugby")
SHOP_ITEMS = _phrases("milk, eggs, bread, butter, cheese, apples, bananas, oranges, grapes, "
                      "strawberries, blueberries, lemons, avocados, tomatoes, potatoes, "
                      "onions, garlic, carrots, broccoli, spinach, lettuce, cucumbers, "
                      "peppers, mushrooms, rice, pasta, flour, sugar, salt, pepper, "
                      "olive oil, coffee, tea, orange juice, yogurt, cereal, oatmeal, "
                      "peanut butter, jam, honey, chicken, beef, salmon, tuna, bacon, "
                      "sausages, tofu, beans, chickpeas, lentils, soup, crackers, chips, "
                      "cookies, chocolate, ice cream, frozen peas, paper towels, "
                      "toilet paper, dish soap, laundry detergent, shampoo, toothpaste, "
                      "trash bags, batteries, light bulbs, sponges, napkins, aluminum foil, "
                      "dog food, cat food, diapers, tissues, sparkling water, almonds, "
                      "walnuts, cinnamon, vanilla, baking soda, ketchup, mustard, mayonnaise")
QUANTITIES = _phrases("a dozen, two, three, four, six, a bag of, a box of, a bottle of, "
                      "a jar of, a carton of, a pound of, two pounds of, a loaf of, "
                      "a pack of, some")
TASKS = _phrases("call the dentist, take out the trash, water the plants, pick up the kids, "
                 "buy milk, pay the electric bill, feed the cat, walk the dog, book a table, "
                 "send the report, take my medicine, charge my phone, pack my lunch, "
                 "check the mail, renew my passport, return the library books, "
                 "lock the back door, stretch, drink some water, call my mother, "
                 "pick up the dry cleaning, buy a birthday present, email my manager, "
                 "move the car, clean the fridge, change the air filter, order flowers, "
                 "make a doctor's appointment, cancel my subscription, practice piano, "
                 "do my homework, start the laundry, defrost the chicken, bring an umbrella, "
                 "fill up the gas tank, back up my laptop, update my resume, "
                 "wish dad a happy birthday, check the oven, go to the gym")
EVENTS = _phrases("dentist appointment, team meeting, yoga class, soccer practice, "
                  "birthday party, doctor's appointment, parent teacher conference, haircut, "
                  "job interview, book club, dinner reservation, flight, piano lesson, "
                  "staff meeting, car service, date night, coffee with a friend")
MESSAGES = _phrases("i'm running late, i'm on my way, happy birthday, call me when you can, "
                    "dinner is ready, don't forget the milk, thanks for everything, "
                    "can you pick me up, good luck today, i love you, i'll call you later, "
                    "the meeting is cancelled, i just landed, are you free tonight, "
                    "i left my keys at home, see you soon, what time is the party, "
                    "i'll be there in five minutes, please call me back, "
                    "let's have pizza tonight, the kids are asleep, congratulations")
PLACES = _phrases("gas station, pharmacy, grocery store, coffee shop, post office, hospital, "
                  "bank, library, airport, train station, park, gym, hardware store, bakery, "
                  "museum, zoo, movie theater, parking garage, hotel, pizza place, bookstore, "
                  "car wash, vet, hair salon, beach, mall, farmers market, bus stop, school, "
                  "swimming pool, police station, dentist")
CUISINES = _words("italian mexican chinese thai indian japanese greek french korean "
                  "vietnamese spanish lebanese ethiopian vegetarian vegan seafood barbecue "
                  "sushi")
STREETS = _words("main oak maple elm pine cedar park lake hill washington lincoln church "
                 "market river sunset highland broad spring walnut chestnut jefferson madison")
STREET_TYPES = _words("street avenue road drive lane boulevard court place way")
ANIMALS = _words("dog cat horse elephant lion tiger giraffe dolphin whale penguin owl eagle "
                 "octopus shark bear wolf fox rabbit kangaroo koala zebra cheetah gorilla "
                 "turtle frog bee butterfly parrot camel hippo squirrel flamingo")
ANIMALS_PLURAL = _words("dogs cats horses elephants lions tigers giraffes dolphins whales "
                        "penguins owls eagles sharks bears wolves rabbits turtles parrots "
                        "hamsters goldfish")
DISHES = _phrases("pancakes, lasagna, chocolate chip cookies, banana bread, chicken soup, "
                  "guacamole, fried rice, mashed potatoes, apple pie, french toast, "
                  "spaghetti carbonara, chili, beef stew, pad thai, hummus, scrambled eggs, "
                  "lemonade, pizza dough, tomato sauce, potato salad, brownies, omelette, "
                  "curry, risotto, meatballs, muffins, cheesecake, tacos")
FOODS = _phrases("an apple, a banana, an egg, a slice of pizza, a cup of rice, "
                 "a glass of milk, an avocado, a bagel, a cup of coffee, a donut, "
                 "a hamburger, a chicken breast, a bowl of oatmeal, a can of soda, "
                 "a handful of almonds")
WORDS = _phrases("necessary, rhythm, accommodate, serendipity, ubiquitous, ephemeral, "
                 "conscientious, mischievous, onomatopoeia, entrepreneur, pneumonia, "
                 "quarantine, embarrass, definitely, restaurant, beautiful, separate, "
                 "colonel, yacht, queue, algorithm, photosynthesis, democracy, nostalgia, "
                 "resilience, empathy, paradigm, gregarious")
LANDMARKS = _phrases("the eiffel tower, mount everest, the statue of liberty, big ben, "
                     "the empire state building, the great wall of china, "
                     "the golden gate bridge, the grand canyon, niagara falls, the colosseum, "
                     "stonehenge, the leaning tower of pisa, mount kilimanjaro, "
                     "the space needle")
SCIENCE = _phrases("the speed of light, the distance to the moon, the boiling point of water, "
                   "the tallest building in the world, the largest ocean, the longest river, "
                   "the smallest planet, the biggest desert, the deepest lake, "
                   "the closest star, the hottest planet, the fastest animal")
PEOPLE = _phrases("albert einstein, isaac newton, marie curie, william shakespeare, "
                  "abraham lincoln, leonardo da vinci, charles darwin, nelson mandela, "
                  "cleopatra, napoleon, galileo, jane austen, martin luther king, "
                  "george washington, amelia earhart, mark twain")
BOOKS = _phrases("pride and prejudice, moby dick, the great gatsby, hamlet, romeo and juliet, "
                 "war and peace, the hobbit, little women, treasure island, frankenstein, "
                 "dracula, the odyssey, jane eyre, the raven")
HOLIDAYS = _phrases("christmas, thanksgiving, halloween, easter, new year's eve, "
                    "valentine's day, mother's day, father's day, independence day, "
                    "labor day, memorial day, hanukkah, saint patrick's day, my birthday, "
                    "the summer holidays")
COMPANIES = _words("apple google amazon microsoft tesla netflix nike disney boeing intel")
LIST_NAMES = _phrases("packing, camping, party, christmas, chores, birthday, gift ideas, "
                      "hardware, homework, holiday, moving, books to read, movies to watch")
LENGTH_UNITS = _words("inches feet yards miles centimeters meters kilometers millimeters")
WEIGHT_UNITS = _words("ounces pounds grams kilograms stones tons")
VOLUME_UNITS = ["cups", "teaspoons", "tablespoons", "liters", "milliliters", "gallons",
                "quarts", "pints", "fluid ounces"]
TEMP_UNITS = ["degrees fahrenheit", "degrees celsius"]
CURRENCIES = _words("dollars euros pounds yen pesos rupees francs")
TIMER_LABELS = _phrases("pasta, egg, pizza, laundry, tea, rice, cookie, workout, nap, "
                        "homework, bread, steak, oven, meditation, study, break")
PODCAST_TOPICS = _phrases("history, science, true crime, comedy, business, technology, "
                          "sports, cooking, health, politics, travel, gardening")
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
    "animal": _pick(ANIMALS), "animals": _pick(ANIMALS_PLURAL), "dish": _pick(DISHES),
    "food": _pick(FOODS), "word": _pick(WORDS), "landmark": _pick(LANDMARKS),
    "fact": _pick(SCIENCE), "person": _pick(PEOPLE), "book": _pick(BOOKS),
    "holiday": _pick(HOLIDAYS), "company": _pick(COMPANIES), "listname": _pick(LIST_NAMES),
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

# (kind, template).  kind "cmd" may take a politeness prefix/suffix; "q" (questions and
# phrases where "please"/"can you" would sound wrong) takes a wake word only.
TEMPLATES: list[tuple[str, str]] = [
    # timers
    ("cmd", "set a timer for {duration}"),
    ("cmd", "set a {label} timer for {duration}"),
    ("cmd", "start a {duration} timer"),
    ("cmd", "add {duration} to the {label} timer"),
    ("cmd", "cancel the {label} timer"),
    ("q", "how much time is left on my {label} timer"),
    ("q", "how much time is left on the timer"),
    ("cmd", "pause the timer"),
    ("cmd", "start a stopwatch"),
    # alarms
    ("cmd", "set an alarm for {time}"),
    ("cmd", "wake me up at {time} {day}"),
    ("cmd", "set an alarm for {time} every {weekday}"),
    ("cmd", "turn off my {time} alarm"),
    ("cmd", "snooze for {small} minutes"),
    ("cmd", "change my alarm to {time}"),
    ("q", "what alarms do i have {day}"),
    ("cmd", "delete all my alarms"),
    # reminders and calendar
    ("cmd", "remind me to {task} {when}"),
    ("cmd", "remind me {when} to {task}"),
    ("q", "don't let me forget to {task}"),
    ("q", "what's on my calendar {day}"),
    ("cmd", "schedule a meeting with {contact} {day} at {time}"),
    ("cmd", "add a {event} to my calendar on {date}"),
    ("q", "am i free {day} at {time}"),
    ("q", "when is my next {event}"),
    ("cmd", "cancel my {time} appointment"),
    ("cmd", "move my {event} to {date}"),
    # weather
    ("q", "what's the weather like in {city}"),
    ("q", "what's the weather {day}"),
    ("q", "will it rain {day}"),
    ("q", "do i need an umbrella {day}"),
    ("q", "is it going to snow in {city} {day}"),
    ("q", "how hot will it be in {city} {day}"),
    ("q", "what's the forecast for {day}"),
    ("q", "what time is sunset {day}"),
    ("q", "how windy is it in {city} right now"),
    ("q", "what's the temperature outside"),
    # smart home
    ("cmd", "turn on the {room} {light}"),
    ("cmd", "turn off the {light} in the {room}"),
    ("cmd", "dim the {room} lights to {percent} percent"),
    ("cmd", "set the {room} lights to {color}"),
    ("cmd", "make the {light} in the {room} brighter"),
    ("cmd", "set the thermostat to {temp} degrees"),
    ("cmd", "set the {room} to {celsius} degrees celsius"),
    ("cmd", "turn the heat up by {small} degrees"),
    ("cmd", "lower the temperature in the {room}"),
    ("q", "what's the temperature in the {room}"),
    ("cmd", "lock the {door}"),
    ("cmd", "unlock the {door}"),
    ("q", "is the {door} locked"),
    ("cmd", "open the {covering} in the {room}"),
    ("cmd", "close the {room} {covering} halfway"),
    ("cmd", "turn on the {appliance} in the {room}"),
    ("cmd", "switch off the {appliance}"),
    ("q", "is the {appliance} still on"),
    ("cmd", "activate {scene} mode"),
    ("cmd", "turn everything off in the {room}"),
    ("cmd", "preheat the oven to {oven} degrees"),
    # calls and messages
    ("cmd", "call {contact}"),
    ("cmd", "call {contact} on speaker"),
    ("cmd", "video call {contact}"),
    ("cmd", "text {contact} {message}"),
    ("cmd", "send a message to {contact} saying {message}"),
    ("cmd", "tell {contact} {message}"),
    ("cmd", "dial {phone}"),
    ("cmd", "read my new messages"),
    ("q", "did {contact} call me {day}"),
    ("q", "what did {contact} say"),
    ("cmd", "call the nearest {place}"),
    # music, media, volume
    ("cmd", "play some {genre} music"),
    ("cmd", "play {artist}"),
    ("cmd", "play {artist} in the {room}"),
    ("cmd", "play something {mood}"),
    ("cmd", "play some {mood} {genre}"),
    ("cmd", "shuffle my {playlist} playlist"),
    ("cmd", "add this song to my {playlist} playlist"),
    ("cmd", "play a {topic} podcast"),
    ("cmd", "set the volume to {percent} percent"),
    ("q", "volume {small}"),
    ("cmd", "turn the volume {updown}"),
    ("cmd", "turn it {updown} a little"),
    ("cmd", "skip this song"),
    ("cmd", "play the next song"),
    ("cmd", "pause the music"),
    ("q", "who sings this song"),
    ("q", "what's the name of this song"),
    ("cmd", "mute the {room} speaker"),
    # navigation and places
    ("cmd", "navigate to {address}"),
    ("cmd", "give me directions to the nearest {place}"),
    ("q", "how long will it take to drive to {city}"),
    ("q", "how far is {city} from {city2}"),
    ("q", "where is the closest {place}"),
    ("cmd", "find a {cuisine} restaurant near me"),
    ("q", "is the {place} open right now"),
    ("q", "what time does the {place} close {day}"),
    ("q", "how's the traffic on the way to work"),
    ("cmd", "take me home"),
    ("q", "when is the next bus to {address}"),
    # shopping and lists
    ("cmd", "add {item} to my shopping list"),
    ("cmd", "add {qty} {item} to the grocery list"),
    ("cmd", "put {item} and {item2} on my list"),
    ("cmd", "remove {item} from my shopping list"),
    ("q", "what's on my shopping list"),
    ("q", "do i need {item}"),
    ("cmd", "order more {item}"),
    ("cmd", "create a {listname} list"),
    ("cmd", "add {task} to my to do list"),
    ("q", "what's on my {listname} list"),
    # time, dates, conversions, calculations
    ("q", "what time is it in {city}"),
    ("q", "what day of the week is {date}"),
    ("q", "how many days until {holiday}"),
    ("q", "when is {holiday} this year"),
    ("q", "{conversion}"),
    ("q", "{calc}"),
    ("q", "what is {n} {currency} in {currency2}"),
    ("q", "how many calories are in {food}"),
    # general questions
    ("q", "what is the capital of {country}"),
    ("q", "what's the population of {country}"),
    ("q", "what language do they speak in {country}"),
    ("q", "how tall is {landmark}"),
    ("q", "where is {landmark}"),
    ("q", "what is {fact}"),
    ("q", "who was {person}"),
    ("q", "when was {person} born"),
    ("q", "who wrote {book}"),
    ("q", "what happened in {year}"),
    ("q", "how do you spell {word}"),
    ("q", "what does {word} mean"),
    ("cmd", "translate {phrase} into {language}"),
    ("q", "how do you say {phrase} in {language}"),
    ("q", "what sound does a {animal} make"),
    ("q", "how long do {animals} live"),
    ("cmd", "tell me a fun fact about {animals}"),
    ("q", "how do i make {dish}"),
    ("cmd", "find me a recipe for {dish}"),
    ("q", "who won the {sport} game last night"),
    ("q", "when does the {sport} season start"),
    ("q", "what's the stock price of {company}"),
    ("cmd", "read me the {topic} news"),
    # chit-chat and control
    ("cmd", "tell me a joke"),
    ("cmd", "flip a coin"),
    ("cmd", "pick a number between {small} and {n}"),
    ("q", "what can you do"),
    ("cmd", "repeat that"),
    ("cmd", "stop"),
    ("q", "how are you {day}"),
    ("cmd", "start a {small} minute workout"),
    ("q", "how many steps did i walk {day}"),
]

_POLITE_PREFIX = ["please", "can you", "could you", "would you please", "hey can you",
                  "i want you to"]
_POLITE_SUFFIX = ["please", "thanks", "thank you", "right now", "for me"]
_SLOT_RE = re.compile(r"\{([a-z]+?)\d*\}")


def _fill(template: str, rng: random.Random) -> str:
    """Replace each {slot} with a fresh draw from its generator."""
    return _SLOT_RE.sub(lambda m: SLOTS[m.group(1)](rng), template)


def _decorate(kind: str, text: str, rng: random.Random) -> str:
    """Add optional wake words and politeness so the same intent has several surfaces."""
    if kind == "cmd":
        r = rng.random()
        if r < 0.15:
            text = f"{rng.choice(_POLITE_PREFIX)} {text}"
        elif r < 0.25:
            text = f"{text} {rng.choice(_POLITE_SUFFIX)}"
    if rng.random() < 0.08:
        text = f"{rng.choice(WAKE)} {text}"
    return text


def sentence(rng: random.Random) -> str:
    """One random sentence (may be outside the length limits; see `sentence_stream`)."""
    kind, template = rng.choice(TEMPLATES)
    return normalize_text(_decorate(kind, _fill(template, rng), rng))


def sentence_stream(rng: random.Random, seen: set[str] | None = None,
                    max_misses: int = 20000) -> Iterator[str]:
    """Yield distinct sentences of MIN_WORDS..MAX_WORDS words forever.

    `seen` (updated in place) lets callers exclude texts, e.g. held-out sentences.  If the
    grammar cannot produce a new sentence in `max_misses` draws it starts repeating instead
    of looping forever; with the default grammar that never happens in practice.
    """
    seen = set() if seen is None else seen
    misses = 0
    while True:
        s = sentence(rng)
        if not MIN_WORDS <= len(s.split()) <= MAX_WORDS:
            continue
        if s in seen and misses < max_misses:
            misses += 1
            continue
        misses = 0
        seen.add(s)
        yield s


def sentences(n: int, rng: random.Random | int) -> list[str]:
    """Return `n` sentences, distinct whenever the grammar allows; `rng` may be a seed."""
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    stream = sentence_stream(rng)
    return [next(stream) for _ in range(n)]


def vocabulary(texts: list[str]) -> set[str]:
    """Distinct words used by `texts`."""
    return {w for t in texts for w in t.split()}


if __name__ == "__main__":  # quick look: python -m data_prep.grammar
    sample = sentences(20000, random.Random(0))
    for s in sample[:25]:
        print(s)
    print(f"templates={len(TEMPLATES)} vocabulary={len(vocabulary(sample))} "
          f"distinct={len(set(sample))}/{len(sample)}")
