"""
`twistd`, plus a thread that writes the number of objects the garbage
collector tracks every NB_GCSTATS_INTERVAL seconds (default 10) to the file
named by NB_GCSTATS, one line `unix-time tracked-objects`.

    NB_GCSTATS=/tmp/gc.txt python3 bench/twistd_gcstats.py -n natbypass-mediator ...

Used by bench/load_campaign.py to see whether the mediator's objects stay
flat under churn (the metrics endpoint does not export it).  The count takes
the GIL for a few ms per sample.
"""

import gc
import os
import sys
import threading
import time

from twisted.scripts.twistd import run


def _sampler(path: str, interval: float) -> None:
    with open(path, "a", buffering=1) as f:
        while True:
            time.sleep(interval)
            f.write(f"{time.time():.1f} {len(gc.get_objects())}\n")


if __name__ == "__main__":
    path = os.environ.get("NB_GCSTATS")
    if path:
        interval = float(os.environ.get("NB_GCSTATS_INTERVAL", "10"))
        threading.Thread(target=_sampler, args=(path, interval), daemon=True).start()
    sys.argv[0] = "twistd"
    sys.exit(run())
