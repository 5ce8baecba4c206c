"""Seeded sentence grammar for a synthetic voice-assistant corpus: templates, politeness and wake
words, and the stream of distinct sentences the corpus driver draws from.

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
    (``{city2}``) draws a second, independent value from the same slot.  The slots (numbers,
    times, dates, word lists) live in `slots`.
  * Everything is driven by one `random.Random`, so a seed reproduces the corpus.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from data_prep.recipes.voice_assistant.slots import SLOTS, WAKE
from hpc_asr.data.text import normalize

__all__ = ["MAX_WORDS", "MIN_WORDS", "TEMPLATES", "normalize_text", "sentence", "sentence_stream", "sentences",
           "vocabulary"]

MIN_WORDS = 2
MAX_WORDS = 14


def normalize_text(s: str) -> str:
    """Lower-case, map anything outside [a-z' ] to a space, collapse spaces (`hpc_asr.data.text`, the
    one normaliser the tokenizer, the LM and scoring share).

    Hyphens and other punctuation become word breaks rather than vanishing so that
    "twenty-five" normalizes to "twenty five", not "twentyfive".
    """
    return normalize(s)


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
    ("q", "what's the first thing on my calendar {day}"),
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
    ("q", "what's the temperature outside in {city}"),
    ("q", "what's the weather like in {country} in {month}"),
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
    ("q", "who sings the song playing in the {room}"),
    ("q", "what's the name of this {genre} song"),
    ("cmd", "mute the {room} speaker"),
    # navigation and places
    ("cmd", "navigate to {address}"),
    ("cmd", "give me directions to the nearest {place}"),
    ("q", "how long will it take to drive to {city}"),
    ("q", "how far is {city} from {city2}"),
    ("q", "where is the closest {place}"),
    ("q", "when should i leave for the {place}"),
    ("cmd", "find a {cuisine} restaurant near me"),
    ("q", "is the {place} open right now"),
    ("q", "is the {place} open on {holiday}"),
    ("q", "what time does the {place} close {day}"),
    ("q", "how's the traffic on the way to work {day}"),
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
    ("q", "how far is {landmark} from {city}"),
    ("q", "what is {fact}"),
    ("q", "where is {fact}"),
    ("q", "who was {person}"),
    ("q", "when was {person} born"),
    ("q", "what happened in {year}"),
    ("q", "how do you spell {word}"),
    ("cmd", "translate {phrase} into {language}"),
    ("q", "how do you say {phrase} in {language}"),
    ("q", "what sound do {animals} make"),
    ("q", "how long do {animals} live"),
    ("cmd", "tell me a fun fact about {animals}"),
    ("q", "how do i make {dish}"),
    ("cmd", "find me a recipe for {dish}"),
    ("q", "who won the {sport} game {past}"),
    ("q", "when does the {sport} season start"),
    ("q", "what time does the {sport} game start {day}"),
    ("q", "what's the stock price of {company}"),
    ("q", "what was the {company} stock price {past}"),
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


if __name__ == "__main__":  # quick look: python -m data_prep.recipes.voice_assistant.grammar
    sample = sentences(20000, random.Random(0))
    for s in sample[:25]:
        print(s)
    counts: dict[str, int] = {}
    for s in sample:
        for w in s.split():
            counts[w] = counts.get(w, 0) + 1
    rare = sorted(w for w, c in counts.items() if c < 15)
    print(f"templates={len(TEMPLATES)} vocabulary={len(counts)} "
          f"distinct={len(set(sample))}/{len(sample)} min_count={min(counts.values())} "
          f"under_15={len(rare)} {' '.join(rare)}")
