"""Write examples/demo_batch.jsonl: 8 documents x 6 questions, shuffled, in the OpenAI Batch API format.

Every prompt is a shared system prompt + one document + one question, so prompts share long prefixes.
Run: python examples/make_demo_batch.py
"""

import json
import os
import random

SYSTEM = ("You are a careful reading assistant. Answer the question using only the document. "
          "If the document does not say, answer 'not stated'. Keep answers to one sentence.")

DOCUMENTS = {
    "lighthouse": "The lighthouse at Grey Point was built in 1871 from granite quarried on the island itself. "
    "Its lamp was first fuelled by whale oil, then by kerosene, and was electrified in 1934. Three keepers "
    "lived there in rotation until 1989, when the light was automated. The tower is 31 metres tall and its "
    "beam can be seen 22 nautical miles out to sea. Today the keepers' cottage is a small museum that opens "
    "from May to September.",
    "sourdough": "A sourdough starter is a mixture of flour and water colonised by wild yeast and lactic acid "
    "bacteria. It is fed daily with equal weights of flour and water. A healthy starter doubles in size four "
    "to eight hours after feeding and smells pleasantly sour. Bakers usually mix the dough when the starter "
    "is at its peak, let it ferment in bulk for four to six hours, shape it, and proof it overnight in the "
    "refrigerator before baking at a high temperature in a covered pot.",
    "comet": "Comet Lerato was discovered in March 2019 by an amateur astronomer in Botswana using a 20 cm "
    "telescope. It follows an elliptical orbit with a period of about 74 years and comes closest to the Sun "
    "inside the orbit of Venus. Its nucleus is estimated to be 4 kilometres wide. During its last approach "
    "the comet developed two tails, one of dust and one of ionised gas, which pointed in slightly different "
    "directions.",
    "railway": "The narrow-gauge railway between Alder and Wick opened in 1902 to carry slate from the "
    "quarries to the harbour. The line is 19 kilometres long, climbs 240 metres, and crosses the river on a "
    "stone viaduct of eleven arches. Passenger services began in 1905 and ended in 1951. Volunteers reopened "
    "the first six kilometres in 1978, and steam trains now run on weekends from Easter to October.",
    "bees": "Honey bee colonies have a single queen, several thousand female workers, and in summer a few "
    "hundred male drones. Workers change jobs as they age: young bees clean cells and feed larvae, middle-aged "
    "bees build comb and guard the entrance, and the oldest bees forage for nectar and pollen. A forager "
    "tells her sisters where flowers are with a waggle dance whose angle shows direction and whose length "
    "shows distance.",
    "library": "The city library moved into the old grain exchange in 2011 after a four-year renovation. The "
    "building keeps its cast-iron roof and glass skylights. It holds about 410,000 books, a local history "
    "archive of maps and photographs, and a workshop with 3D printers that members can book for two hours "
    "a week. It is open every day except public holidays, and membership is free for residents.",
    "volcano": "Mount Serac is a stratovolcano 2,950 metres high. Its last major eruption, in 1783, sent ash "
    "as far as the coast and buried two villages on its eastern slope. Since then it has produced only small "
    "steam explosions. Scientists monitor it with seismometers, GPS stations and gas sensors, and the summit "
    "crater is closed to hikers when sulfur dioxide levels rise above the safety limit.",
    "chess": "The chess club meets on Tuesday and Thursday evenings in the back room of the community hall. "
    "It was founded in 1967 by two schoolteachers and has about sixty members, from age eight to ninety. "
    "Beginners get a free lesson on their first visit. The club runs a rapid tournament every month and a "
    "long-play championship each winter, and its first team plays in the regional league.",
}

QUESTIONS = [
    "When did it begin or when was it founded?",
    "Give one number the document mentions and what it measures.",
    "Who or what does the work described in the document?",
    "What changed over time, according to the document?",
    "What is the single most important fact here?",
    "Summarise the document in five words.",
]


def main() -> None:
    rng = random.Random(0)
    lines = []
    for name, doc in DOCUMENTS.items():
        for q, question in enumerate(QUESTIONS):
            body = {
                "model": "sharekv-demo-v1",
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {question}"}],
                "max_tokens": 32,
                "temperature": 0,
            }
            lines.append({"custom_id": f"{name}-q{q}", "method": "POST", "url": "/v1/chat/completions",
                          "body": body})
    rng.shuffle(lines)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_batch.jsonl")
    with open(path, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    print(f"wrote {len(lines)} requests to {path}")


if __name__ == "__main__":
    main()
