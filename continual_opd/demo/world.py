"""The demo world: a fictional company's handbook + general chat with verifiable (IFEval) instructions.

`python -m continual_opd.demo.world --out data_samples` regenerates every file below, byte for byte:

    docs/*.md                    handbook pages of Veloran, a fictional greenhouse-equipment maker
    domain_qa/facts.jsonl        one row per fact: {fact_id, page, answer, sentence}
    domain_qa/train.jsonl        {id, fact_id, question, answer}: several training paraphrases per fact
    domain_qa/eval.jsonl         held-out paraphrases (a wording never used for that fact in training)
    chat/demo_model_train.jsonl  constrained + plain chat used to build the demo chat model
    chat/sft_chat.jsonl          ordinary chat for the SFT mix (instruction types: `WorldConfig.sft_chat_types`)
    chat/opd_prompts.jsonl       IFEval-schema prompts for on-policy distillation
    ifeval/eval.jsonl            held-out IFEval-schema prompts

Chat is about a small general world (fruit colours, capitals, arithmetic, animals, ...), unrelated to the
company. A constrained prompt is a base question plus one or two instruction sentences; its response is
the base answer transformed to satisfy them (checked with lm-eval's IFEval checkers in the tests).
No prompt text appears in two splits, and no (base question, instructions) combination of the eval set
appears in any training split. Everything is drawn from `random.Random` seeded with strings, so the
output depends only on `WorldConfig` and this file.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from continual_opd.io import atomic_write_text

COMPANY = "Veloran"


# ----------------------------------------------------------------------------------------------------
# Company handbook. Each fact: (fact_id, answer, handbook sentence, training questions, eval questions).
# Relations shared by several subjects use one template set so the paraphrase style is consistent.

OFFICES = [  # name, city, opened, lead
    ("design studio", "Porto", "2013", "Nadia Okafor"),
    ("assembly plant", "Brno", "2011", "Pavel Hruska"),
    ("support centre", "Cork", "2016", "Aoife Brennan"),
    ("research lab", "Tartu", "2019", "Kaarel Sepp"),
    ("sales office", "Lyon", "2015", "Camille Roux"),
]
PRODUCTS = [  # name, what it is, code, launch year, price
    ("Fernlight", "an indoor grow lamp", "FL-204", "2012", "149 euros"),
    ("Rootwise", "a soil moisture sensor", "RW-330", "2014", "59 euros"),
    ("Mistlane", "a greenhouse humidifier", "ML-118", "2015", "89 euros"),
    ("Canopy Hub", "the controller that links all our devices", "CH-501", "2017", "229 euros"),
    ("Dewpoint", "a small weather station", "DP-742", "2018", "119 euros"),
    ("Sproutbox", "a seed starter kit", "SB-060", "2020", "39 euros"),
    ("Tidewell", "an irrigation pump", "TW-915", "2021", "179 euros"),
    ("Lumenrake", "a harvest robot for tomatoes", "LR-880", "2023", "4900 euros"),
]
TEAMS = [  # team, lead
    ("finance", "Greta Lindqvist"), ("people", "Samir Haddad"), ("security", "Oksana Petrenko"),
    ("legal", "Jonas Feld"), ("marketing", "Lucia Ferraz"), ("IT", "Ravi Menon"),
    ("quality", "Hana Kobayashi"), ("logistics", "Diego Alvarez"), ("customer support", "Emil Nyberg"),
    ("firmware", "Yara Castell"),
]
RELATIONS = {  # relation -> template pool (train + extra), rotated per subject by `_rel`; {s} is the subject
    "office_city": (["In which city is the {s}?", "Where is the Veloran {s} located?", "What city hosts the {s}?"],
                    ["Which town is home to the Veloran {s}?"]),
    "office_opened": (["When did the {s} open?", "In what year did the {s} open?", "What year was the {s} opened?"],
                      ["Since which year has the {s} been operating?"]),
    "office_lead": (["Who runs the {s}?", "Who is in charge of the {s}?", "Who leads the {s}?"],
                    ["Who manages the {s} day to day?"]),
    "product_code": (["What is the product code of the {s}?", "Which product code does the {s} have?",
                      "What code identifies the {s}?"], ["Under which code is the {s} sold?"]),
    "product_launch": (["When was the {s} launched?", "In what year did the {s} launch?",
                        "What year did the {s} come out?"], ["Which year saw the release of the {s}?"]),
    "product_price": (["How much does the {s} cost?", "What is the price of the {s}?", "What does the {s} sell for?"],
                      ["What would a customer pay for the {s}?"]),
    "team_lead": (["Who leads the {s} team?", "Who is the head of the {s} team?", "Who is in charge of {s}?"],
                  ["Which person heads up {s} at Veloran?"]),
}
# Single facts: page, fact_id, answer, sentence, questions, one more question (one of the four is held out).
SINGLE_FACTS = [
    ("about", "founding_date", "12 May 2009", "Veloran was founded on 12 May 2009 in a rented greenhouse.",
     ["When was Veloran founded?", "On what date was Veloran founded?", "What is the founding date of Veloran?"],
     "Which day did Veloran come into existence?"),
    ("about", "founder", "Ilse Marrow", "The company was started by Ilse Marrow, a plant biologist.",
     ["Who founded Veloran?", "Who is the founder of Veloran?", "Which person started Veloran?"],
     "Who set up Veloran in the first place?"),
    ("about", "hq_city", "Ghent", "Our headquarters is in Ghent.",
     ["Where is Veloran headquartered?", "In which city is the Veloran headquarters?",
      "What city is the Veloran head office in?"], "Where does Veloran have its main office?"),
    ("about", "ceo", "Tomas Brevik", "Tomas Brevik has been our CEO since 2018.",
     ["Who is the CEO of Veloran?", "Who is the chief executive of Veloran?", "Who runs Veloran as CEO?"],
     "Who holds the top executive job at Veloran?"),
    ("about", "headcount", "340", "Veloran employs 340 people across six sites.",
     ["How many employees does Veloran have?", "How many people work at Veloran?", "What is the headcount of Veloran?"],
     "What is the size of the Veloran workforce?"),
    ("about", "retreat_city", "Ljubljana", "Every year the whole company meets for a retreat in Ljubljana.",
     ["Where is the annual company retreat held?", "In which city is the Veloran retreat?",
      "What city hosts the yearly retreat?"], "To which city does everyone travel for the company retreat?"),
    ("about", "retreat_month", "September", "The retreat always takes place in September.",
     ["When is the annual retreat?", "In which month is the company retreat?", "What month is the yearly retreat in?"],
     "At what time of year does the retreat happen?"),
    ("about", "all_hands_day", "Thursday", "The monthly all-hands meeting is held on the first Thursday of the month.",
     ["On which day is the all-hands meeting?", "What day of the week is the all-hands held?",
      "When is the monthly all-hands meeting?"], "Which weekday is reserved for the all-hands?"),
    ("about", "fiscal_year_start", "1 April", "Our fiscal year starts on 1 April.",
     ["When does the fiscal year start?", "On what date does the Veloran fiscal year begin?",
      "What is the first day of the fiscal year?"], "Which date opens the Veloran financial year?"),
    ("about", "shutdown_month", "August", "The offices close for a summer shutdown in the second week of August.",
     ["In which month is the summer shutdown?", "When do the offices close for the summer?",
      "What month is the summer shutdown in?"], "During which month does Veloran shut down for summer?"),
    ("policies", "leave_days", "27 days", "Every employee gets 27 days of paid annual leave.",
     ["How many days of annual leave do employees get?", "How much paid leave does an employee get per year?",
      "What is the annual leave allowance?"], "How many holiday days does a Veloran employee have?"),
    ("policies", "remote_days", "3 days", "You may work remotely up to 3 days a week.",
     ["How many days a week can I work remotely?", "What is the remote work limit per week?",
      "How many remote days per week are allowed?"], "How often may staff work from home each week?"),
    ("policies", "expense_threshold", "400 euros", "Any expense above 400 euros needs approval before you pay.",
     ["Above what amount does an expense need approval?", "What is the expense approval threshold?",
      "From which amount must an expense be approved first?"], "What spending limit triggers prior approval?"),
    ("policies", "laptop_refresh", "3 years", "Laptops are replaced every 3 years.",
     ["How often are laptops replaced?", "What is the laptop replacement cycle?",
      "After how long do we get a new laptop?"],
     "How long does a work laptop last before it is swapped?"),
    ("policies", "parental_leave", "20 weeks", "Parents can take 20 weeks of paid parental leave.",
     ["How long is paid parental leave?", "How many weeks of parental leave do parents get?",
      "What is the parental leave policy length?"], "How much paid time off does a new parent receive?"),
    ("policies", "probation", "6 months", "New employees have a probation period of 6 months.",
     ["How long is the probation period?", "What is the length of probation for new staff?",
      "How many months does probation last?"], "For how long is a new hire on trial?"),
    ("policies", "learning_budget", "1500 euros", "Each employee has a learning budget of 1500 euros per year.",
     ["How big is the yearly learning budget?", "What is the annual learning budget per employee?",
      "How much can I spend on training each year?"], "What amount is set aside for courses per person?"),
    ("policies", "visitor_badge", "orange", "Visitors must wear an orange badge at all times.",
     ["What colour is the visitor badge?", "Which badge colour do visitors wear?", "What colour badge do guests get?"],
     "How can you recognise a visitor by their badge?"),
    ("policies", "core_hours_start", "10:00", "Core hours start at 10:00.",
     ["When do core hours start?", "At what time do core hours begin?", "What is the start of core hours?"],
     "From what time must everyone be available?"),
    ("policies", "core_hours_end", "15:00", "Core hours end at 15:00.",
     ["When do core hours end?", "At what time do core hours finish?", "What is the end of core hours?"],
     "Until what time must everyone be available?"),
    ("policies", "notice_period", "2 months", "The notice period for leaving the company is 2 months.",
     ["How long is the notice period?", "What is the notice period when you resign?",
      "How much notice must I give before leaving?"], "How far ahead must a resignation be announced?"),
    ("policies", "meal_allowance", "35 euros", "On business trips the meal allowance is 35 euros per day.",
     ["What is the daily meal allowance on trips?", "How much can I spend on meals per travel day?",
      "What is the meal allowance per day?"], "How much food money does a traveller get each day?"),
    ("policies", "bonus_month", "March", "The yearly bonus is paid in March.",
     ["When is the yearly bonus paid?", "In which month is the bonus paid?", "What month do we receive the bonus?"],
     "At what point in the year does the bonus arrive?"),
    ("policies", "sick_days_no_note", "3 days", "You can be off sick for 3 days without a doctor's note.",
     ["How many sick days are allowed without a doctor's note?", "How long can I be sick without a note?",
      "For how many days is no sick note needed?"], "What is the longest sickness absence that needs no certificate?"),
    ("procedures", "expense_form", "EX-7", "Expense claims are filed with form EX-7.",
     ["Which form is used for expense claims?", "What is the expense claim form called?",
      "What form do I fill in to claim expenses?"], "Which paperwork gets my travel costs paid back?"),
    ("procedures", "ticket_system", "Lantern", "IT problems are reported in our ticket system, Lantern.",
     ["What is the IT ticket system called?", "Where do I report an IT problem?", "Which tool is used for IT tickets?"],
     "What is the name of the helpdesk tool?"),
    ("procedures", "incident_channel", "#tidewatch",
     "Production incidents are discussed in the chat channel #tidewatch.",
     ["Which channel is used for incidents?", "What is the incident chat channel?",
      "Where are production incidents discussed?"], "In which chat room do people gather when something breaks?"),
    ("procedures", "travel_tool", "Compass", "All business travel is booked through Compass.",
     ["Which tool is used to book travel?", "How do I book a business trip?", "What is the travel booking tool?"],
     "Where should flights and hotels for work be reserved?"),
    ("procedures", "emergency_ext", "4411", "In an emergency on site, call extension 4411.",
     ["What is the emergency extension?", "Which extension do I call in an emergency?",
      "What number do I dial for an emergency on site?"], "Which phone extension reaches help when there is danger?"),
    ("procedures", "password_days", "90 days", "Passwords must be changed every 90 days.",
     ["How often must passwords be changed?", "What is the password change interval?",
      "After how many days does a password expire?"], "How long is a password valid?"),
    ("procedures", "buddy_programme", "Seedling", "Every new hire is given a buddy through the Seedling programme.",
     ["What is the buddy programme called?", "Which programme gives new hires a buddy?",
      "What is the name of the onboarding buddy programme?"],
     "Through which scheme is a newcomer paired with a colleague?"),
    ("procedures", "wiki_name", "Greenbook", "Team notes and how-to guides live in our wiki, Greenbook.",
     ["What is the company wiki called?", "Where are the how-to guides kept?", "What is the name of our wiki?"],
     "Where would I look up an internal guide?"),
    ("procedures", "security_training_month", "October",
     "The yearly security training must be finished by the end of October.",
     ["When is the security training due?", "By which month must security training be done?",
      "What is the deadline month for security training?"],
     "Until when do staff have to complete the security course?"),
    ("procedures", "leave_notice", "14 days", "Holiday requests must be made at least 14 days in advance.",
     ["How early must I request holiday?", "How much notice is needed for a holiday request?",
      "How many days ahead should leave be requested?"], "How far in advance should time off be asked for?"),
]

PAGES = {
    "about": ("01-about.md", "About Veloran", "Veloran designs and builds equipment for small greenhouses."),
    "offices": ("02-offices.md", "Our offices", "Veloran works from its headquarters and five other sites."),
    "products": ("03-products.md", "Products",
                 "Every product has a code used in orders, invoices and support tickets."),
    "teams": ("04-teams.md", "Teams and people", "Each team has one lead who approves plans and budgets."),
    "policies": ("05-policies.md", "Policies", "These policies apply to every employee, at every site."),
    "procedures": ("06-procedures.md", "Tools and procedures", "How to get everyday things done at Veloran."),
}


@dataclass(frozen=True)
class Fact:
    fact_id: str
    page: str
    answer: str
    sentence: str
    train_questions: tuple[str, ...]
    eval_questions: tuple[str, ...]


def _rotate(questions: list[str], k: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Hold out question k (mod len) and train on the rest.

    Relations share one template pool, and subject j holds out template j: every held-out wording is new
    for its fact but was seen with other subjects (a compositional split a small model can learn). Single
    facts rotate which of their own wordings is held out the same way.
    """
    k %= len(questions)
    return tuple(q for i, q in enumerate(questions) if i != k), (questions[k],)


def _rel(rel: str, subject: str, j: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    tr, ev = RELATIONS[rel]
    return _rotate([t.format(s=subject) for t in tr + ev], j)


def company_facts() -> list[Fact]:
    facts = [Fact(fid, page, ans, sent, *_rotate(list(tr) + [ev], i))
             for i, (page, fid, ans, sent, tr, ev) in enumerate(SINGLE_FACTS)]
    for j, (name, city, opened, lead) in enumerate(OFFICES):
        slug = name.replace(" ", "_")
        facts += [Fact(f"office_city:{slug}", "offices", city, f"The {name} is in {city}.",
                       *_rel("office_city", name, j)),
                  Fact(f"office_opened:{slug}", "offices", opened, f"The {name} opened in {opened}.",
                       *_rel("office_opened", name, j)),
                  Fact(f"office_lead:{slug}", "offices", lead, f"The {name} is run by {lead}.",
                       *_rel("office_lead", name, j))]
    for j, (name, what, code, year, price) in enumerate(PRODUCTS):
        slug = name.lower().replace(" ", "_")
        facts += [Fact(f"product_code:{slug}", "products", code, f"The {name} is {what}. Its product code is {code}.",
                       *_rel("product_code", name, j)),
                  Fact(f"product_launch:{slug}", "products", year, f"The {name} was launched in {year}.",
                       *_rel("product_launch", name, j)),
                  Fact(f"product_price:{slug}", "products", price, f"The {name} sells for {price}.",
                       *_rel("product_price", name, j))]
    for j, (team, lead) in enumerate(TEAMS):
        facts.append(Fact(f"team_lead:{team.lower().replace(' ', '_')}", "teams", lead,
                          f"The {team} team is led by {lead}.", *_rel("team_lead", team, j)))
    return facts


def render_docs(facts: list[Fact]) -> dict[str, str]:
    """One markdown page per PAGES entry; sentences of one subject (office, product) form one section."""
    by_page: dict[str, list[Fact]] = {}
    for f in facts:
        by_page.setdefault(f.page, []).append(f)
    out = {}
    for page, (fname, title, intro) in PAGES.items():
        lines = [f"# {title}", "", intro, ""]
        if page == "offices":
            for name, *_ in OFFICES:
                slug = name.replace(" ", "_")
                sents = [f.sentence for f in by_page[page] if f.fact_id.endswith(":" + slug)]
                lines += [f"## {name.capitalize()}", "", " ".join(sents), ""]
        elif page == "products":
            for name, *_ in PRODUCTS:
                slug = name.lower().replace(" ", "_")
                sents = [f.sentence for f in by_page[page] if f.fact_id.endswith(":" + slug)]
                lines += [f"## {name}", "", " ".join(sents), ""]
        elif page == "teams":
            lines += [f"- {f.sentence}" for f in by_page[page]] + [""]
        else:
            facts_here = by_page[page]
            lines += [" ".join(f.sentence for f in facts_here[i:i + 3]) + "\n" for i in range(0, len(facts_here), 3)]
        out[fname] = "\n".join(lines).rstrip("\n") + "\n"
    return out


# ----------------------------------------------------------------------------------------------------
# General chat world. A base item is a question with several phrasings and a canonical answer built from
# a template with {s} (subject) and {o} (object) slots, so highlights can mark exactly those spans.

FRUITS = [
    ("apple", "red"), ("banana", "yellow"), ("lemon", "yellow"), ("lime", "green"), ("cherry", "red"),
    ("grape", "purple"), ("orange", "orange"), ("strawberry", "red"), ("blueberry", "blue"), ("plum", "purple"),
    ("pear", "green"), ("coconut", "brown"),
]
CAPITALS = [
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Norway", "Oslo"),
    ("Greece", "Athens"), ("Poland", "Warsaw"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
    ("Chile", "Santiago"), ("Cuba", "Havana"),
]
SOUNDS = [
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("sheep", "baa"), ("duck", "quack"), ("pig", "oink"),
    ("horse", "neigh"), ("owl", "hoot"), ("lion", "roar"), ("frog", "croak"),
]
LEGS = [
    ("spider", "eight"), ("ant", "six"), ("dog", "four"), ("bird", "two"), ("cat", "four"), ("horse", "four"),
    ("chicken", "two"), ("bee", "six"), ("cow", "four"), ("duck", "two"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("old", "young"), ("early", "late"), ("open", "closed"), ("full", "empty"), ("wet", "dry"), ("loud", "quiet"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
CATEGORIES = {
    "fruits": ["apples", "bananas", "cherries", "grapes", "pears"],
    "animals": ["dogs", "cats", "horses", "rabbits", "owls"],
    "colours": ["red", "blue", "green", "yellow", "purple"],
    "vegetables": ["carrots", "onions", "peas", "potatoes", "leeks"],
    "planets": ["Mercury", "Venus", "Earth", "Mars", "Jupiter"],
    "musical instruments": ["the piano", "the violin", "the drums", "the flute", "the guitar"],
    "sports": ["football", "tennis", "swimming", "cycling", "rowing"],
    "drinks": ["water", "tea", "coffee", "milk", "juice"],
    "birds": ["robins", "eagles", "owls", "swans", "parrots"],
    "trees": ["oak", "pine", "birch", "willow", "maple"],
}


@dataclass(frozen=True)
class Base:
    qid: str
    kind: str  # fruit | capital | sum | product | sound | legs | opposite | next | list | yesno
    phrasings: tuple[str, ...]
    template: str  # canonical answer with {s} and {o} slots
    s: str
    o: str
    title: str  # one per kind, unlike the answer's opening words, so a title never runs into the answer
    items: tuple[str, ...] = ()  # list kind: items for bullets / json
    yes: bool | None = None  # yesno kind: the truthful answer

    def answer(self, hs: bool = False, ho: bool = False) -> str:
        return self.template.format(s=f"*{self.s}*" if hs else self.s, o=f"*{self.o}*" if ho else self.o)


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def base_items() -> list[Base]:
    B: list[Base] = []

    def add(qid, kind, phrasings, template, s, o, title, **extra):
        B.append(Base(qid, kind, tuple(phrasings), template, s, o, title, **extra))

    for f, c in FRUITS:
        add(f"fruit:{f}", "fruit",
            [f"What colour is {_a(f)}?", f"What color is a ripe {f}?", f"Which colour does {_a(f)} have?",
             f"Tell me the colour of {_a(f)}."],
            "A ripe {s} is {o}, and it is a fruit that many people like to eat.", f, c, "Fruit colours")
    for country, city in CAPITALS:
        add(f"capital:{country}", "capital",
            [f"What is the capital of {country}?", f"Which city is the capital of {country}?",
             f"Name the capital city of {country}.", f"Tell me the capital of {country}."],
            "The capital of {s} is {o}, which is also one of the biggest cities in the country.",
            country, city, "Capital cities")
    rng = random.Random("world:arithmetic")
    for a, b in sorted({(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(45)}):
        add(f"sum:{a}+{b}", "sum",
            [f"What is {a} plus {b}?", f"How much is {a} plus {b}?", f"Add {a} and {b}.",
             f"What do you get when you add {a} and {b}?"],
            "When you add {s} together, the total that you get is {o}, and that is the answer.",
            f"{a} and {b}", str(a + b), "Adding numbers")
    for a, b in sorted({(rng.randint(2, 9), rng.randint(2, 9)) for _ in range(22)}):
        add(f"product:{a}*{b}", "product",
            [f"What is {a} times {b}?", f"How much is {a} times {b}?", f"Multiply {a} by {b}.",
             f"What do you get when you multiply {a} by {b}?"],
            "When you multiply {s}, the number that you get is {o}, and that is the answer.",
            f"{a} by {b}", str(a * b), "Multiplying numbers")
    for animal, sound in SOUNDS:
        add(f"sound:{animal}", "sound",
            [f"What sound does {_a(animal)} make?", f"What noise does {_a(animal)} make?",
             f"What does {_a(animal)} say?", f"How does {_a(animal)} sound?"],
            "The {s} says {o}, and you can often hear this sound when the animal is close to you.",
            animal, sound, "Animal sounds")
    for animal, n in LEGS:
        add(f"legs:{animal}", "legs",
            [f"How many legs does {_a(animal)} have?", f"How many legs has {_a(animal)} got?",
             f"Count the legs of {_a(animal)}.", f"Tell me how many legs {_a(animal)} has."],
            "The {s} has {o} legs, and it uses them to walk around.", animal, n, "Counting legs")
    for w, o in OPPOSITES:
        add(f"opposite:{w}", "opposite",
            [f"What is the opposite of {w}?", f"What is the opposite of the word {w}?",
             f"Give me the opposite of {w}.", f"Which word means the opposite of {w}?"],
            "The opposite of {s} is {o}, and the two words are often used together.", w, o, "Opposites")
    for seq, unit, period in ((DAYS, "day", "week"), (MONTHS, "month", "year")):
        for i, x in enumerate(seq):
            add(f"next:{x}", "next",
                [f"What {unit} comes after {x}?", f"Which {unit} follows {x}?", f"What is the {unit} after {x}?",
                 f"Tell me the {unit} that comes after {x}."],
                f"The {unit} after {{s}} is {{o}}, and then the {period} goes on as usual.",
                x, seq[(i + 1) % len(seq)], f"The next {unit}")
    for cat, items in CATEGORIES.items():
        add(f"list:{cat}", "list",
            [f"Name some {cat}.", f"List a few {cat}.", f"Can you give me some {cat}?", f"What are some {cat}?",
             f"Tell me a few {cat}."],
            f"Some {{s}} that people know well are {{o}}, {items[1]} and {items[2]}, and there are many more of them.",
            cat, items[0], f"A few {cat}", items=tuple(items))
    # Yes/no questions about the facts above: one true and one false variant per subject.
    for f, c in FRUITS:
        for col, yes in ((c, True), ("blue" if c != "blue" else "red", False)):
            B.append(_yesno(f"yesno:fruit:{f}:{col}", (f"Is a ripe {f} {col}?", f"Is {_a(f)} {col}?"), yes,
                            f"a ripe {f} is {c}", f, c, "Fruit colours"))
    for i, (country, city) in enumerate(CAPITALS):
        for cap, yes in ((city, True), (CAPITALS[(i + 5) % len(CAPITALS)][1], False)):
            B.append(_yesno(f"yesno:capital:{country}:{cap}",
                            (f"Is {cap} the capital of {country}?", f"Is the capital of {country} {cap}?"), yes,
                            f"the capital of {country} is {city}", country, city, "Capital cities"))
    for animal, n in LEGS:
        for k, yes in ((n, True), ("three" if n != "three" else "two", False)):
            B.append(_yesno(f"yesno:legs:{animal}:{k}",
                            (f"Does {_a(animal)} have {k} legs?", f"Has {_a(animal)} got {k} legs?"), yes,
                            f"{_a(animal)} has {n} legs", animal, n, "Counting legs"))
    return B


def _yesno(qid, phrasings, yes, truth, s, o, title) -> Base:
    # truth contains s and o literally; turn it into a template with slots so highlights work
    tpl = truth.replace(s, "{s}", 1).replace(o, "{o}", 1)
    tpl = ("Yes, " if yes else "No, ") + tpl + (", that is right." if yes else ", so that is not right.")
    return Base(qid, "yesno", phrasings, tpl, s, o, title, yes=yes)


# ----------------------------------------------------------------------------------------------------
# Instructions: prompt templates, kwargs (exact lm-eval argument names), and response transformations.

LOWER, UPPER = "change_case:english_lowercase", "change_case:english_capital"
QUOTE, NO_COMMA = "startend:quotation", "punctuation:no_comma"
JSON, BULLETS = "detectable_format:json_format", "detectable_format:number_bullet_lists"
END, KEYWORDS = "startend:end_checker", "keywords:existence"
TITLE, POSTSCRIPT = "detectable_format:title", "detectable_content:postscript"
CHOICE, FIRST_WORD = "detectable_format:constrained_response", "length_constraints:nth_paragraph_first_word"
HIGHLIGHT = "detectable_format:number_highlighted_sections"

ALL_TYPES = (LOWER, UPPER, QUOTE, NO_COMMA, JSON, BULLETS, END, KEYWORDS, TITLE, POSTSCRIPT, CHOICE, FIRST_WORD,
             HIGHLIGHT)

TEMPLATES = {
    LOWER: ["Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
            "Please reply in lowercase letters only.",
            "Write your whole answer in lowercase, with no capital letters at all.",
            "Use only lowercase letters in your response.", "Answer in English using all lowercase letters."],
    UPPER: ["Your entire response should be in English, and in all capital letters.",
            "Please reply in capital letters only.",
            "Write your whole answer in uppercase.", "Use only capital letters in your response.",
            "Answer in English using all capital letters."],
    QUOTE: ["Wrap your entire response with double quotation marks.", "Put your whole answer inside double quotes.",
            "Enclose the entire reply in double quotation marks.",
            "Your response must start and end with a double quote."],
    NO_COMMA: ["In your entire response, refrain from the use of any commas.", "Do not use any commas in your answer.",
               "Please answer without using a single comma.", "Avoid commas completely in your reply."],
    JSON: ["Entire output should be wrapped in JSON format.", "Give your answer in JSON format.",
           "Format your whole response as a JSON object.", "Reply with valid JSON only."],
    BULLETS: ["Your answer must contain exactly {num_bullets} bullet points. Use the markdown bullet points such as:\n"
              "* This is point 1.\n* This is point 2",
              "Answer with exactly {num_bullets} bullet points in markdown, using \"* \" for each bullet.",
              "Use exactly {num_bullets} markdown bullet points in your reply.",
              "Give me a list of exactly {num_bullets} bullet points."],
    END: ["Finish your response with this exact phrase {end_phrase} No other words should follow this phrase.",
          "End your answer with the exact words \"{end_phrase}\"",
          "Your reply must end with the phrase \"{end_phrase}\"",
          "Close your response with: {end_phrase}"],
    # Every wording names the keyword as "the word X" and the response says "I used the word X": the repeated
    # phrase lets the model copy by matching context. With "It makes me think of X" and a 20-word pool the
    # 1.6M demo model got 0/14 keyword prompts right; with this phrasing and 8 words, nearly all.
    KEYWORDS: ["Include the word {kw1} in your response.", "Make sure to use the word {kw1} in your answer.",
               "Your response should mention the word {kw1}.", "Please use the word {kw1} somewhere in your reply."],
    TITLE: ["Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
            "Give your answer a title in double angular brackets, like <<title>>.",
            "Start with a title wrapped in << and >>.", "Include a title such as <<my title>> in your response."],
    POSTSCRIPT: ["At the end of your response, please explicitly add a postscript starting with {postscript_marker}",
                 "Add a postscript that starts with {postscript_marker} at the end of your reply.",
                 "Please end with a postscript beginning with {postscript_marker}",
                 "After your answer, add a note that starts with {postscript_marker}"],
    CHOICE: ["Answer with one of the following options: "
             "('My answer is yes.', 'My answer is no.', 'My answer is maybe.')",
             "Reply with one of: My answer is yes., My answer is no., My answer is maybe.",
             "Choose your answer from \"My answer is yes.\", \"My answer is no.\" or \"My answer is maybe.\""],
    FIRST_WORD: ["Start your reply with the word {first_word}.",
                 "The first word of your answer must be \"{first_word}\".",
                 "Begin your response with the word {first_word}.",
                 "Your answer should start with the word {first_word}."],
    HIGHLIGHT: ["Highlight at least {num_highlights} sections in your answer with markdown, "
                "i.e. *highlighted section*.",
                "Use markdown to highlight at least {num_highlights} parts of your answer, like *this*.",
                "Mark at least {num_highlights} key words with asterisks, for example *word*."],
}
END_PHRASES = ["Any other questions?", "Is there anything else I can help with?", "Have a great day.",
               "That is all for now.", "Hope this helps!", "Let me know if you need more."]
KEYWORD_POOL = ["sunshine", "river", "garden", "music", "window", "mountain", "ocean", "winter"]
PS_LINES = ["I hope this helps.", "Thank you for the question.", "Feel free to ask me more.", "This was fun to answer."]
FIRST_WORDS = ["sure", "well", "okay", "indeed", "certainly", "so", "honestly"]

# Pairs that can be satisfied together by the transformations in `respond` (unordered).
_COMPATIBLE = {
    LOWER: {QUOTE, NO_COMMA, END, KEYWORDS, TITLE, POSTSCRIPT, FIRST_WORD},
    UPPER: {QUOTE, NO_COMMA, END, KEYWORDS, TITLE, POSTSCRIPT, FIRST_WORD},
    QUOTE: {NO_COMMA, END, KEYWORDS, TITLE, CHOICE, FIRST_WORD, HIGHLIGHT},
    NO_COMMA: {END, KEYWORDS, TITLE, FIRST_WORD, BULLETS, HIGHLIGHT, POSTSCRIPT, CHOICE},
    END: {KEYWORDS, TITLE, BULLETS, CHOICE, FIRST_WORD, HIGHLIGHT},
    KEYWORDS: {TITLE, BULLETS, POSTSCRIPT, CHOICE, HIGHLIGHT, FIRST_WORD},
    TITLE: {BULLETS, POSTSCRIPT, HIGHLIGHT},
    POSTSCRIPT: {BULLETS, HIGHLIGHT},  # not FIRST_WORD: a postscript is a second paragraph
}
PAIRS = sorted({tuple(sorted((a, b))) for a, bs in _COMPATIBLE.items() for b in bs})


def allowed_kinds(types: tuple[str, ...]) -> set[str] | None:
    """Base kinds a set of instructions applies to (None = all kinds)."""
    if BULLETS in types:
        return {"list"}
    if CHOICE in types:
        return {"yesno"}
    return None


def make_kwargs(rng: random.Random, t: str) -> dict:
    """Arguments for one instruction, named exactly as lm-eval's `build_description` expects them."""
    if t == BULLETS:
        return {"num_bullets": rng.choice([2, 3, 4, 5])}
    if t == END:
        return {"end_phrase": rng.choice(END_PHRASES)}
    if t == KEYWORDS:
        return {"keywords": [rng.choice(KEYWORD_POOL)]}  # one word: a second copy was not learned in budget
    if t == POSTSCRIPT:
        return {"postscript_marker": rng.choice(["P.S.", "P.P.S"])}
    if t == FIRST_WORD:
        return {"num_paragraphs": 1, "nth_paragraph": 1, "first_word": rng.choice(FIRST_WORDS)}
    if t == HIGHLIGHT:
        return {"num_highlights": rng.choice([1, 2])}
    return {}


def instruction_text(rng: random.Random, t: str, kw: dict) -> str:
    tpl = rng.choice(TEMPLATES[t])
    if t == KEYWORDS:
        return tpl.format(kw1=kw["keywords"][0])
    return tpl.format(**kw)


def respond(base: Base, types: tuple[str, ...], kwargs: list[dict], rng: random.Random) -> str:
    """The canonical answer transformed to satisfy every instruction.

    Order matters: the form (JSON, bullets, choice, highlights), then prefixes and suffixes, then
    comma removal, quotes and case, so that every later step keeps the earlier ones satisfied."""
    kw = dict(zip(types, kwargs))
    if JSON in types:
        if base.kind == "list":
            value = list(base.items[:3])
        else:
            value = ("yes" if base.yes else "no") if base.kind == "yesno" else base.o
        text = json.dumps({"answer": value})
    elif BULLETS in types:
        text = "\n".join(f"* {x[0].upper() + x[1:]}" for x in base.items[:kw[BULLETS]["num_bullets"]])
    elif CHOICE in types:
        text = "My answer is yes." if base.yes else "My answer is no."
    elif HIGHLIGHT in types:
        text = base.answer(hs=True, ho=True)  # two highlights satisfy "at least 1" and "at least 2" alike
    else:
        text = base.answer()
    if FIRST_WORD in types:
        w = kw[FIRST_WORD]["first_word"]
        first, rest = text.split(" ", 1)
        first = first.lower() if first in ("A", "An", "The", "Some", "When", "Yes,", "No,") else first
        text = f"{w.capitalize()}, {first} {rest}"
    if TITLE in types:
        text = f"<<{base.title}>>\n{text}"
    sep = "\n" if BULLETS in types else " "  # keep affixes off the last bullet line
    if KEYWORDS in types:
        text += sep + f"I used the word {kw[KEYWORDS]['keywords'][0]}."
    if POSTSCRIPT in types:
        text += f"\n\n{kw[POSTSCRIPT]['postscript_marker']} {rng.choice(PS_LINES)}"
    if END in types:
        text += sep + kw[END]["end_phrase"]
    if NO_COMMA in types:
        text = text.replace(",", "")
    if QUOTE in types:
        text = f'"{text}"'
    if LOWER in types:
        text = text.lower()
    if UPPER in types:
        text = text.upper()
    return text


# ----------------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True)
class WorldConfig:
    seed: str = "continual-opd-demo-v1"
    n_eval: int = 120  # ifeval/eval.jsonl
    # chat/opd_prompts.jsonl. OPD overfits a small prompt set: with 800 prompts the student passed 0.95 of
    # them but 0.86 of the held-out ones; 2400 closed most of that gap (BENCHMARKS.md).
    n_opd: int = 2400
    n_demo_constrained: int = 2800  # constrained part of chat/demo_model_train.jsonl (coverage included)
    n_demo_plain: int = 600  # plain part of chat/demo_model_train.jsonl
    n_sft_chat: int = 600  # chat/sft_chat.jsonl
    pair_fraction: float = 0.25  # share of constrained prompts that carry two instructions
    # Instruction types that may appear in chat/sft_chat.jsonl (empty = plain chat only). This is the knob
    # that decides which skills the SFT mix protects; `sft_chat_constrained_fraction` of rows get one.
    # The default covers 4 of the 13 types, as ordinary chat data would: the mix then protects those skills
    # and lets the others be forgotten (plain chat alone protects none of them: IF falls to ~0).
    sft_chat_types: tuple[str, ...] = (LOWER, QUOTE, NO_COMMA, JSON)
    sft_chat_constrained_fraction: float = 0.3


class _Sampler:
    """Draws constrained prompts; every prompt text is used once across all splits."""

    def __init__(self, bases: list[Base]):
        self.by_kind: dict[str, list[Base]] = {}
        for b in bases:
            self.by_kind.setdefault(b.kind, []).append(b)
        self.used_prompts: set[str] = set()
        self.held_out: set[tuple] = set()  # (qid, types) combinations reserved for eval

    def constrained(self, rng: random.Random, types_pool: tuple[str, ...], pair_fraction: float, *,
                    hold_out: bool = False, base: Base | None = None, must: str | None = None,
                    must_kw: dict | None = None):
        """One (prompt, instruction ids, kwargs, response). `base`/`must`/`must_kw` pin the question, one
        instruction and its arguments (used to give the training split full coverage)."""
        singles = [must] if must else list(types_pool)
        pairs = [p for p in PAIRS if set(p) <= set(types_pool) and (must is None or must in p)]
        for _ in range(1000):
            types = rng.choice(pairs) if pairs and rng.random() < pair_fraction else (rng.choice(singles),)
            kinds = allowed_kinds(types) or sorted(self.by_kind)
            if base is not None and base.kind not in kinds:
                continue
            b = base or rng.choice(self.by_kind[rng.choice(sorted(kinds))])
            types = tuple(rng.sample(types, len(types)))  # instruction order in the prompt varies
            combo = (b.qid, tuple(sorted(types)))
            if combo in self.held_out:
                continue
            kwargs = [dict(must_kw) if must_kw and t == must else make_kwargs(rng, t) for t in types]
            parts = [instruction_text(rng, t, k) for t, k in zip(types, kwargs)]
            question = rng.choice(b.phrasings)
            prompt = " ".join([question] + parts) if rng.random() < 0.75 else " ".join(parts + [question])
            if prompt in self.used_prompts:
                continue
            self.used_prompts.add(prompt)
            if hold_out:
                self.held_out.add(combo)
            return prompt, list(types), kwargs, respond(b, types, kwargs, rng)
        raise RuntimeError(f"no unused prompt left (base={base and base.qid}, must={must})")

    def coverage(self, rng: random.Random, pair_fraction: float) -> list[tuple]:
        """Examples a tiny model needs to see at least once: every question in lower and in upper case
        (BPE splits a capitalised name differently, so each must be spelled out at least once), every
        list in every bullet count a few times, every keyword many times."""
        out = []
        for kind in sorted(self.by_kind):
            for b in self.by_kind[kind]:
                out += [self.constrained(rng, ALL_TYPES, pair_fraction, base=b, must=t) for t in (LOWER, UPPER)]
        for b in self.by_kind["list"]:
            out += [self.constrained(rng, ALL_TYPES, pair_fraction, base=b, must=BULLETS, must_kw={"num_bullets": n})
                    for n in (2, 3, 4, 5) for _ in range(3)]
        for word in KEYWORD_POOL:  # copying a word from the prompt is the slowest skill to learn
            out += [self.constrained(rng, ALL_TYPES, pair_fraction, must=KEYWORDS, must_kw={"keywords": [word]})
                    for _ in range(20)]
        return out


PLAIN_PREFIXES = ["", "Hi! ", "Quick question: ", "Hello. ", "I have a question. "]


def build_world(cfg: WorldConfig = WorldConfig()) -> dict[str, str]:
    """All output files as {relative path: text}. Pure function of `cfg`."""
    files: dict[str, str] = {}
    facts = company_facts()
    for fname, text in render_docs(facts).items():
        files[f"docs/{fname}"] = text
    files["domain_qa/facts.jsonl"] = _jsonl({"fact_id": f.fact_id, "page": PAGES[f.page][0], "answer": f.answer,
                                             "sentence": f.sentence} for f in facts)
    for split in ("train", "eval"):
        pairs = [(f, q) for f in facts for q in (f.train_questions if split == "train" else f.eval_questions)]
        files[f"domain_qa/{split}.jsonl"] = _jsonl({"id": f"qa-{split}-{i:04d}", "fact_id": f.fact_id, "question": q,
                                                    "answer": f.answer} for i, (f, q) in enumerate(pairs))

    bases = base_items()
    sampler = _Sampler(bases)
    rng = random.Random(f"{cfg.seed}:eval")
    ev = [sampler.constrained(rng, ALL_TYPES, cfg.pair_fraction, hold_out=True) for _ in range(cfg.n_eval)]
    files["ifeval/eval.jsonl"] = _jsonl(_ifeval_row(i, p, t, k) for i, (p, t, k, _) in enumerate(ev, start=1))

    # Plain prompts: every (base, phrasing, prefix) once, shuffled, dealt to the demo and SFT splits.
    rng = random.Random(f"{cfg.seed}:plain")
    plain = [(pre + q, b.answer()) for b in bases for q in b.phrasings for pre in PLAIN_PREFIXES]
    rng.shuffle(plain)
    plain = [(p, a) for p, a in plain if p not in sampler.used_prompts]
    demo_plain, sft_plain = plain[:cfg.n_demo_plain], plain[cfg.n_demo_plain:cfg.n_demo_plain + cfg.n_sft_chat]
    if len(sft_plain) < cfg.n_sft_chat:
        raise ValueError(f"only {len(plain)} plain prompts available; lower n_demo_plain or n_sft_chat")

    rng = random.Random(f"{cfg.seed}:demo")
    demo = sampler.coverage(rng, cfg.pair_fraction)
    demo += [sampler.constrained(rng, ALL_TYPES, cfg.pair_fraction) for _ in range(cfg.n_demo_constrained - len(demo))]
    demo += [(p, [], [], a) for p, a in demo_plain]
    rng.shuffle(demo)
    files["chat/demo_model_train.jsonl"] = _jsonl(_chat_row(*d) for d in demo)

    rng = random.Random(f"{cfg.seed}:sft")
    n_con = round(cfg.n_sft_chat * cfg.sft_chat_constrained_fraction) if cfg.sft_chat_types else 0
    sft = [sampler.constrained(rng, cfg.sft_chat_types, cfg.pair_fraction) for _ in range(n_con)]
    sft += [(p, [], [], a) for p, a in sft_plain[:cfg.n_sft_chat - n_con]]
    rng.shuffle(sft)
    files["chat/sft_chat.jsonl"] = _jsonl(_chat_row(*d) for d in sft)

    # OPD prompts are drawn last, so changing their number leaves the demo model's and SFT's data as is.
    rng = random.Random(f"{cfg.seed}:opd")
    opd = [sampler.constrained(rng, ALL_TYPES, cfg.pair_fraction) for _ in range(cfg.n_opd)]
    files["chat/opd_prompts.jsonl"] = _jsonl(_ifeval_row(i, p, t, k) for i, (p, t, k, _) in enumerate(opd, start=1))
    return files


def _ifeval_row(key: int, prompt: str, types: list[str], kwargs: list[dict]) -> dict:
    return {"key": key, "prompt": prompt, "instruction_id_list": types, "kwargs": kwargs}


def _chat_row(prompt: str, types: list[str], kwargs: list[dict], response: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            "instruction_id_list": types, "kwargs": kwargs}


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_world(out: Path, cfg: WorldConfig = WorldConfig()) -> dict[str, str]:
    files = build_world(cfg)
    for rel, text in files.items():
        atomic_write_text(Path(out) / rel, text)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate the demo world data (deterministic).")
    ap.add_argument("--out", type=Path, default=Path("data_samples"), help="output directory (default: data_samples)")
    args = ap.parse_args(argv)
    files = write_world(args.out)
    for rel, text in files.items():
        n = text.count("\n") if rel.endswith(".jsonl") else len(text.encode())
        print(f"{args.out / rel}: {n} {'rows' if rel.endswith('.jsonl') else 'bytes'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
