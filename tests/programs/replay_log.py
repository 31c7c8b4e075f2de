"""Prints a recorded log file line by line, sleeping ``argv[2]`` seconds after each line that contains
``argv[3]`` (a step line), as the job that wrote it did: an unmodified script for ``btune run --parse``."""

import sys
import time

path, pause, marker = sys.argv[1], float(sys.argv[2]), sys.argv[3]
with open(path, encoding="utf-8") as fh:
    for line in fh:
        sys.stdout.write(line)
        sys.stdout.flush()
        if marker in line:
            time.sleep(pause)
