"""Write examples/demo_batch.jsonl: 8 short documents x 6 questions about each, shuffled, as OpenAI Batch API
chat requests. The documents were written for this demo; SmolLM2-135M-Instruct can answer the questions
from them. Every prompt is a shared system prompt + one document + one question, so prompts share long
prefixes. Run: python examples/make_demo_batch.py
"""

import json
import os
import random

SYSTEM = "You are a helpful assistant. Answer the question about the document in one short sentence."

DOCUMENTS = {
    "lighthouse": (
        "The lighthouse at Grey Point was built in 1871 from granite cut on the island itself. It is 31 metres "
        "tall, and its white light can be seen 22 nautical miles out to sea.\n\n"
        "At first the lamp burned whale oil. Later it burned kerosene, and in 1934 it was changed to electric "
        "light. Three keepers took turns living in the lighthouse until 1989, when the light was automated.\n\n"
        "Today the old keepers' cottage is a small museum. It is open from May to September."
    ),
    "bread": (
        "Maria runs a small bakery on Harbour Street. She opens the shop at six o'clock every morning, and she "
        "bakes about two hundred loaves each day.\n\n"
        "Her most popular bread is a sourdough made with rye flour. She keeps the starter in a blue jar and "
        "feeds it with flour and water every evening. The dough rises slowly overnight in the refrigerator.\n\n"
        "On Saturdays Maria also makes cinnamon buns, and they are usually sold out by ten o'clock."
    ),
    "comet": (
        "Comet Lerato was discovered in March 2019 by an amateur astronomer in Botswana. She found it with a "
        "small telescope in her garden.\n\n"
        "The comet travels around the Sun once every 74 years. Its icy nucleus is about 4 kilometres wide. When "
        "it came close to the Sun, it grew two tails: one made of dust and one made of gas.\n\n"
        "The comet will return to the inner solar system in the year 2093."
    ),
    "railway": (
        "The little railway between Alder and Wick opened in 1902. It was built to carry slate from the quarries "
        "down to the harbour.\n\n"
        "The line is 19 kilometres long. It crosses the river on a stone bridge with eleven arches. Passenger "
        "trains ran from 1905 until 1951, when the line closed.\n\n"
        "In 1978 a group of volunteers reopened part of the line. Now steam trains run on weekends from Easter "
        "to October, and the trip takes forty minutes."
    ),
    "bees": (
        "A honey bee colony has one queen, thousands of female worker bees, and in summer a few hundred male "
        "bees called drones. The queen lays all the eggs.\n\n"
        "Worker bees change jobs as they get older. Young bees clean the cells and feed the larvae. Older bees "
        "build wax comb and guard the entrance. The oldest bees fly out to collect nectar and pollen.\n\n"
        "A bee that finds flowers does a waggle dance to show the other bees where the flowers are."
    ),
    "library": (
        "The city library moved into the old grain market building in 2011. The building still has its iron "
        "roof and large glass windows.\n\n"
        "The library has about 410,000 books. It also has a room of old maps and photographs of the town, and a "
        "workshop with 3D printers.\n\n"
        "The library is open every day except public holidays. Membership is free for people who live in the "
        "city, and members can borrow up to twelve books at a time."
    ),
    "volcano": (
        "Mount Serac is a volcano 2,950 metres high. Its last big eruption was in 1783. Ash from that eruption "
        "reached the coast and buried two villages.\n\n"
        "Since then the volcano has been mostly quiet. Scientists watch it with seismometers and gas sensors.\n\n"
        "Hikers can climb to the crater in summer, but the path is closed when the sensors find too much "
        "sulfur gas. The climb takes about five hours."
    ),
    "chess": (
        "The town chess club meets on Tuesday and Thursday evenings in the community hall. It was started in "
        "1967 by two teachers.\n\n"
        "The club has about sixty members. The youngest member is eight years old and the oldest is ninety. "
        "New players get a free lesson on their first visit.\n\n"
        "Every month the club holds a fast tournament, and every winter it holds a championship. The winner "
        "gets a silver cup."
    ),
}

QUESTIONS = {
    "lighthouse": ["When was the lighthouse built?", "How tall is the lighthouse?",
                   "What did the lamp burn at first?", "When was the light automated?",
                   "What is the keepers' cottage today?", "When is the museum open?"],
    "bread": ["Where is Maria's bakery?", "What time does the shop open?", "How many loaves does Maria bake each day?",
              "What is her most popular bread?", "Where does she keep the starter?",
              "What does Maria make on Saturdays?"],
    "comet": ["When was Comet Lerato discovered?", "Who discovered the comet?",
              "How often does the comet travel around the Sun?", "How wide is the nucleus?",
              "How many tails did the comet grow?", "When will the comet return?"],
    "railway": ["When did the railway open?", "What was the railway built to carry?", "How long is the line?",
                "How many arches does the bridge have?", "Who reopened the line in 1978?",
                "How long does the trip take?"],
    "bees": ["How many queens does a colony have?", "What are male bees called?", "Who lays all the eggs?",
             "What do young worker bees do?", "What do the oldest bees collect?",
             "How does a bee show where the flowers are?"],
    "library": ["When did the library move?", "How many books does the library have?",
                "What is in the workshop?", "When is the library closed?", "How much does membership cost?",
                "How many books can members borrow at a time?"],
    "volcano": ["How high is Mount Serac?", "When was the last big eruption?", "What did the ash bury?",
                "How do scientists watch the volcano?", "When is the path closed?", "How long does the climb take?"],
    "chess": ["When does the chess club meet?", "Who started the club?", "How many members does the club have?",
              "How old is the youngest member?", "What do new players get?",
              "What does the championship winner get?"],
}


def main() -> None:
    rng = random.Random(0)
    lines = []
    for name, doc in DOCUMENTS.items():
        for q, question in enumerate(QUESTIONS[name]):
            body = {
                "model": "SmolLM2-135M-Instruct.Q4_1",
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": f"{doc}\n\nQuestion: {question}"}],
                "max_tokens": 48,
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
