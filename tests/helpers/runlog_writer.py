"""Subprocess writer for the SIGKILL test: appends records forever, printing each step after append returns.

usage: python runlog_writer.py RUN_DIR PAYLOAD_BYTES SLEEP_S
"""
import sys
import time

from collapse_probe.runs.runlog import RunLog

run_dir, payload, sleep_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
log = RunLog(run_dir)
step = 0
while True:
    log.append({"step": step, "loss": step * 0.5, "blob": chr(ord("a") + step % 26) * payload})
    print(step, flush=True)
    step += 1
    time.sleep(sleep_s)
