#!/usr/bin/env python3
# Usage (with nats-py, e.g. target/python-venv/bin/python):
#   python scripts/count_subjects.py NATS_URL SECONDS
# Counts every message on the server for SECONDS, by subject with session ids, task ids,
# inboxes and acks folded together (`load-17` -> `S`, `t3` -> `T`): what one task or one
# session costs in messages. Run it beside a load generator pointed at the same server
# (`loadgen --nats-url NATS_URL ...`) and divide by the run's tasks.
import asyncio
import collections
import re
import sys

import nats

FOLDS = [
    (re.compile(r"load-\d+"), "S"),
    (re.compile(r"\.t\d+"), ".T"),
    (re.compile(r"_INBOX\..*"), "_INBOX"),
    (re.compile(r"\$JS\.ACK\..*"), "$JS.ACK"),
]


async def main(url, seconds):
    client = await nats.connect(url)
    counts = collections.Counter()

    async def count(message):
        subject = message.subject
        for pattern, folded in FOLDS:
            subject = pattern.sub(folded, subject)
        counts[subject] += 1

    await client.subscribe(">", cb=count)
    await asyncio.sleep(seconds)
    await client.close()
    for subject, n in counts.most_common():
        print(f"{n}\t{subject}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: count_subjects.py NATS_URL SECONDS")
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
