"""Robustness check: damaged copies of pydicom's test files must only ever raise ResunetError.

Each file under 600 kB is truncated at random points and has random bytes overwritten; every copy
goes through ``load_study``. Prints how many copies were tried and any other exception (a bug).
Run: ``.venv/bin/python bench/io_fuzz.py [trials_per_file] [seed]`` (~1-2 min for 6 trials).
"""

from __future__ import annotations

import collections
import logging
import os
import random
import shutil
import sys
import tempfile
import traceback
import warnings

from pydicom.data import get_testdata_files

from resunet.errors import ResunetError
from resunet.io import load_study


def main(trials: int = 6, seed: int = 0) -> int:
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    files = [f for f in get_testdata_files("*.dcm") if os.path.getsize(f) < 600_000]
    rng = random.Random(seed)
    bugs: collections.Counter = collections.Counter()
    outcomes: collections.Counter = collections.Counter()
    work = tempfile.mkdtemp(prefix="resunet-fuzz-")
    try:
        for f in files:
            data = open(f, "rb").read()
            for trial in range(trials):
                if trial % 2 == 0:
                    blob = data[: rng.randrange(1, len(data))]
                else:
                    b = bytearray(data)
                    for _ in range(20):
                        b[rng.randrange(len(b))] = rng.randrange(256)
                    blob = bytes(b)
                path = os.path.join(work, "x.dcm")
                with open(path, "wb") as fh:
                    fh.write(blob)
                try:
                    load_study(path)
                    outcomes["read"] += 1
                except ResunetError as err:
                    outcomes[type(err).__name__] += 1
                except BaseException as err:  # noqa: BLE001 - that is what we are looking for
                    tb = traceback.extract_tb(err.__traceback__)[-1]
                    key = f"{type(err).__name__} at {tb.name}:{tb.lineno}"
                    if not bugs[key]:
                        print(f"BUG {os.path.basename(f)}: {key}: {str(err)[:200]}")
                    bugs[key] += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{sum(outcomes.values()) + sum(bugs.values())} damaged files: {dict(outcomes)}; other exceptions: {dict(bugs)}")
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:3])))
