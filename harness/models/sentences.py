"""The fixed sentence set of the text-embedding workload: every backend embeds the same texts.

SHORT: one-line sentences (8-20 tokens), in near-paraphrase pairs -- (0, 1), (2, 3), ... -- followed by unrelated
sentences. LONG: paragraphs of 100-160 tokens, paraphrase pairs too. The pairs give the ranking check something
real to find (a sentence's nearest neighbour is its paraphrase); the unrelated sentences make the set a search
space. Written for diffbench; no dataset is downloaded.
"""
from __future__ import annotations

SHORT_PAIRS = (
    ("The train to the airport leaves every twenty minutes.",
     "Every twenty minutes a train departs for the airport."),
    ("She forgot her umbrella and got soaked on the way home.",
     "Having left her umbrella behind, she was drenched walking home."),
    ("The server crashed because it ran out of memory.",
     "Running out of memory made the server go down."),
    ("Our team won the final match by a single goal.",
     "We took the championship game one goal to nothing."),
    ("Fresh bread from the bakery smells wonderful in the morning.",
     "In the morning the bakery's new loaves have a lovely smell."),
    ("The museum is closed on Mondays for maintenance.",
     "On Mondays the museum shuts its doors for upkeep."),
    ("He learned to play the piano when he was seven.",
     "At the age of seven he took up the piano."),
    ("Heavy snow blocked the mountain pass overnight.",
     "Overnight, thick snowfall closed the road over the mountains."),
    ("The recipe needs two cups of flour and one egg.",
     "You will need one egg and two cups of flour for this recipe."),
    ("Prices at the grocery store went up again this month.",
     "This month the supermarket raised its prices once more."),
    ("The cat sleeps on the warm windowsill all afternoon.",
     "All afternoon the cat naps on the sunny window ledge."),
    ("Please send me the report before the meeting on Friday.",
     "Could you email the report to me ahead of Friday's meeting?"),
)
SHORT_UNRELATED = (
    "Volcanic soil is often rich in minerals.",
    "The violinist tuned her instrument before the concert.",
    "A compiler translates source code into machine instructions.",
    "Whales communicate with low-frequency songs across oceans.",
    "The library extended its opening hours during exams.",
    "Saffron is one of the most expensive spices by weight.",
    "The bridge was painted bright red last summer.",
    "Quantum computers use qubits instead of classical bits.",
)
SHORT = tuple(s for pair in SHORT_PAIRS for s in pair) + SHORT_UNRELATED

LONG_PAIRS = (
    ("When the city opened its new light-rail line, commuters who had spent an hour in traffic every morning "
     "suddenly found themselves arriving at work in twenty-five minutes. Shops near the stations reported more "
     "customers within weeks, and the council began planning a second line toward the university, although some "
     "residents complained about construction noise and the loss of parking spaces along the main avenue. Within a "
     "year ridership had passed every forecast, the buses that used to run the same route were moved to outlying "
     "districts, and the old depot beside the river was turned into a market hall where farmers sell vegetables, "
     "cheese and bread every Saturday morning.",
     "Commuters used to sit in traffic for an hour each morning, but after the city launched its light-rail line "
     "the same trip took about twenty-five minutes. Businesses close to the stops saw customer numbers rise within "
     "a few weeks, and plans for a second line to the university followed, despite complaints from some locals "
     "about building noise and fewer parking spots on the main avenue. Passenger numbers beat every prediction "
     "within twelve months, the buses that had served that route were reassigned to the outer suburbs, and the "
     "former depot by the river became a covered market where growers sell produce, cheese and loaves each "
     "Saturday morning."),
    ("The research team trained a small language model on a carefully filtered dataset and found that it matched "
     "a model ten times larger on several reading-comprehension benchmarks. They argued that the quality of the "
     "training data mattered more than its quantity, but reviewers pointed out that the benchmarks might overlap "
     "with the filtered data, which would make the comparison less meaningful than it first appeared. The authors "
     "responded by releasing their filtering code and rerunning the evaluation on a fresh set of questions "
     "written after the data had been collected; the gap narrowed but did not disappear, and the debate about "
     "how much data a model really needs continued at the next conference.",
     "A compact language model, trained by the researchers on data they had filtered with care, performed as "
     "well as a model ten times its size on a number of reading-comprehension tests. Their conclusion was that "
     "data quality beats data quantity, yet reviewers noted that the test sets could overlap with the filtered "
     "training data, which would weaken the comparison considerably. In reply the authors published the code "
     "behind their filter and evaluated again on new questions written only after the data collection; the "
     "difference shrank without vanishing, and the argument over how much data models truly require carried on "
     "at the following conference."),
    ("Our grandmother kept a vegetable garden behind the house for more than forty years. Every spring she "
     "planted tomatoes, beans and courgettes, and every autumn she preserved what the family could not eat in "
     "glass jars that lined the cellar shelves. She never used a written plan; she simply remembered which beds "
     "had held which plants the year before and rotated them so the soil would stay healthy. Neighbours came by "
     "in late summer with baskets, and she sent each of them home with more than they could carry, insisting "
     "that vegetables taste best the day they are picked and that a garden shared is a garden doubled.",
     "For over four decades our grandmother tended a vegetable patch behind her house. She sowed tomatoes, beans "
     "and zucchini each spring, and each autumn she bottled the surplus into jars that filled the shelves of the "
     "basement. She had no written plan at all: she remembered what had grown in every bed the previous year and "
     "moved the crops around to keep the soil in good condition. Late every summer the neighbours dropped in with "
     "baskets and left with more than they could manage, because she believed vegetables are tastiest on the day "
     "they are harvested and that sharing a garden makes it twice as large."),
)
LONG_UNRELATED = (
    "The history of cartography shows how maps reflected the beliefs of the people who drew them. Medieval world "
    "maps placed Jerusalem at the centre and filled unknown regions with monsters, while later navigators "
    "demanded accurate coastlines, which led to careful surveys, better instruments and, eventually, satellite "
    "imagery that measures the surface of the earth to within a few centimetres. Today a phone in a pocket "
    "carries more geographic detail than every atlas of the nineteenth century combined, yet the choices of "
    "projection, scale and naming still shape how readers imagine distant places and their inhabitants.",
    "To replace a bicycle chain, first shift to the smallest sprocket, then use a chain tool to push out one pin "
    "and remove the old chain. Thread the new chain through the derailleur, cut it to the right length by "
    "comparing it with the old one, and join the ends with a quick link or a new pin before checking that every "
    "gear changes smoothly. Finally lubricate the chain lightly, turn the pedals backwards for a minute so the "
    "oil reaches every roller, and wipe off the excess with a clean cloth, because surplus oil attracts dirt "
    "that wears out the sprockets much faster than riding in the rain ever would.",
)
LONG = tuple(s for pair in LONG_PAIRS for s in pair) + LONG_UNRELATED

SEQUENCE_LENGTHS = {"short": 16, "long": 128}


def texts_for(seq: int) -> tuple[str, ...]:
    """The set a case of this sequence length embeds: short sentences up to 32 tokens, paragraphs above."""
    return SHORT if seq <= 32 else LONG


def paraphrase_of(index: int, texts: tuple[str, ...]) -> int | None:
    """The index of a text's paraphrase in its set, or None for an unrelated text."""
    pairs = len(SHORT_PAIRS) if texts is SHORT else len(LONG_PAIRS)
    if index >= 2 * pairs:
        return None
    return index + 1 if index % 2 == 0 else index - 1
