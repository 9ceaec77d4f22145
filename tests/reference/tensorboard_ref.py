"""Reads TensorBoard event files with the `tensorboard` package, for lmforge's writer tests.

  tensorboard_ref.py LOGDIR   prints JSON: {"file_version": [...], "scalars": {tag: [[step,
                              value], ...]}, "wall_times": {tag: [...]}} with each value as
                              Python's repr of the float ("nan", "inf" included), so nothing is
                              rounded on the way.

Scalars come from EventAccumulator (what `tensorboard --load_fast=false` serves), keeping every
point (size_guidance 0); file_version from the raw records of each file (EventFileLoader).
"""

import glob
import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator, event_file_loader


def main():
    logdir = sys.argv[1]
    versions = []
    for path in sorted(glob.glob(os.path.join(logdir, "*tfevents*"))):
        for event in event_file_loader.LegacyEventFileLoader(path).Load():
            if event.HasField("file_version"):
                versions.append(event.file_version)
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    scalars, wall_times = {}, {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        scalars[tag] = [[e.step, repr(float(e.value))] for e in events]
        wall_times[tag] = [e.wall_time for e in events]
    print(json.dumps({"file_version": versions, "scalars": scalars, "wall_times": wall_times}))


if __name__ == "__main__":
    main()
