#!/usr/bin/env python3
"""make_samples -- write the LB purge-dump samples of testdata/samples/.

Usage: python3 testdata/make_samples.py [DIR]     (default: testdata/samples)

The samples are invented, and the same on every run (fixed times, ids made
from names): test_all.py checks that the committed files are what this
writes.  Each line is what an LB server's purge dump holds for one event:

    DG.ARRIVED=<ulmdate> <ULM event line>

The ULM line is the common fields DATE HOST PROG LVL DG.PRIORITY DG.SOURCE
DG.SRC_INSTANCE DG.EVNT DG.JOBID DG.SEQCODE DG.USER, then the event's own
DG.<TYPE>.<FIELD> fields; every field is followed by one space, so a line
ends with " \\n".  Quoted values escape backslash, double quote and newline
as \\\\, \\" and \\n.  An ULM date is UTC YYYYMMDDhhmmss.uuuuuu.

Files written:
  sample_job_waiting       a job matched and queued for its CE
  sample_job_aborted       a job no resource matched
  sample_job_cleared       a job run, done, its output retrieved
  sample_job_tagged_done   a job run and done, with user tags
  job_template             the cleared job's 14 events, DG.JOBID a
                           placeholder (_CHANGE_ME_JOBID_) that no
                           exporter accepts; bench.py fills in real ids
Standard library only; Python 3.6 or later.
"""

import base64
import hashlib
import os
import sys
import time

LB = "https://lb.example.org:9000/"
HOST = "lb.example.org"
USER = "/C=XX/O=Example Grid/CN=Jane Roe"
PLACEHOLDER = "_CHANGE_ME_JOBID_"
WMS = "https://wms.example.org:7443/glite_wms_wmproxy_server"
CE = "ce.example.org:8443/cream-pbs-short"

# The sequence code: one counter per component, in this order and width.
SEQ = (("UI", 6), ("NS", 10), ("WM", 6), ("BH", 10), ("JSS", 6),
       ("LM", 6), ("LRMS", 6), ("APP", 6))
COMPONENT = {"UserInterface": "UI", "NetworkServer": "NS",
             "WorkloadManager": "WM", "BigHelper": "BH",
             "JobController": "JSS", "LogMonitor": "LM", "LRMS": "LRMS",
             "Application": "APP"}

JDL = ('[ Type = "Job"; JobType = "Normal"; Executable = "/bin/hostname"; '
       'Arguments = "-f"; StdOutput = "std.out"; StdError = "std.err"; '
       'OutputSandbox = { "std.out", "std.err" }; '
       'Requirements = other.GlueCEStateStatus == "Production"; '
       'Rank = -other.GlueCEStateEstimatedResponseTime; '
       'VirtualOrganisation = "example" ]')


def unique(name):
    """A 22-character LB job unique (URL-safe base64), made from `name`."""
    digest = hashlib.sha256(name.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:22]


def ulm_date(usec):
    return "%s.%06d" % (time.strftime("%Y%m%d%H%M%S",
                                      time.gmtime(usec // 1000000)),
                        usec % 1000000)


def quote(value):
    return '"%s"' % (value.replace("\\", "\\\\").replace('"', '\\"')
                     .replace("\n", "\\n"))


# The events of the lifecycles: (type, source, [(field, value)]).
REGJOB = ("RegJob", "UserInterface", [
    ("JDL", JDL), ("NS", WMS), ("PARENT", ""), ("JOBTYPE", "SIMPLE"),
    ("NSUBJOBS", "0"), ("SEED", "")])
ACCEPTED = ("Accepted", "NetworkServer", [
    ("FROM", "UserInterface"), ("FROM_HOST", "ui.example.org"),
    ("FROM_INSTANCE", "glite-wms-job-submit"), ("LOCAL_JOBID", "")])
ENQUEUED_NS = ("EnQueued", "NetworkServer", [
    ("QUEUE", "/var/glite/workload_manager/jobdir"), ("JOB", JDL),
    ("RESULT", "OK"), ("REASON", "")])
DEQUEUED_WM = ("DeQueued", "WorkloadManager", [
    ("QUEUE", "/var/glite/workload_manager/jobdir"), ("LOCAL_JOBID", "")])
HELPERCALL = ("HelperCall", "WorkloadManager", [
    ("HELPER_NAME", "BrokerHelper"), ("HELPER_PARAMS", ""),
    ("SRC_ROLE", "CALLING")])
MATCH = ("Match", "WorkloadManager", [("DEST_ID", CE)])
NO_MATCH = ("HelperReturn", "WorkloadManager", [
    ("HELPER_NAME", "BrokerHelper"), ("RETVAL", "no compatible resources"),
    ("SRC_ROLE", "CALLING")])
HELPERRETURN = ("HelperReturn", "WorkloadManager", [
    ("HELPER_NAME", "BrokerHelper"), ("RETVAL", CE), ("SRC_ROLE", "CALLING")])
ENQUEUED_WM = ("EnQueued", "WorkloadManager", [
    ("QUEUE", "/var/glite/jobcontrol/jobdir"), ("JOB", JDL),
    ("RESULT", "OK"), ("REASON", "")])
ABORT = ("Abort", "WorkloadManager", [
    ("REASON", "Brokerhelper: no compatible resources")])
DEQUEUED_JC = ("DeQueued", "JobController", [
    ("QUEUE", "/var/glite/jobcontrol/jobdir"), ("LOCAL_JOBID", "")])
TRANSFER = ("Transfer", "JobController", [
    ("DESTINATION", "LRMS"), ("DEST_HOST", "ce.example.org"),
    ("DEST_INSTANCE", "cream-pbs-short"), ("JOB", JDL), ("RESULT", "OK"),
    ("REASON", "job submitted to the CE"), ("DEST_JOBID", "CREAM123456789")])
ACCEPTED_LM = ("Accepted", "LogMonitor", [
    ("FROM", "JobController"), ("FROM_HOST", "wms.example.org"),
    ("FROM_INSTANCE", "jobcontrol"), ("LOCAL_JOBID", "CREAM123456789")])
RUNNING = ("Running", "LogMonitor", [("NODE", "wn07.example.org")])
DONE = ("Done", "LogMonitor", [
    ("STATUS_CODE", "OK"), ("REASON", "Job terminated successfully"),
    ("EXIT_CODE", "0")])
CLEAR = ("Clear", "NetworkServer", [("REASON", "USER")])


def usertag(name, value):
    return ("UserTag", "Application", [("NAME", name), ("VALUE", value)])


LIFECYCLES = {
    "sample_job_waiting": [REGJOB, ACCEPTED, ENQUEUED_NS, DEQUEUED_WM,
                           HELPERCALL, MATCH, HELPERRETURN, ENQUEUED_WM],
    "sample_job_aborted": [REGJOB, ACCEPTED, ENQUEUED_NS, DEQUEUED_WM,
                           HELPERCALL, NO_MATCH, ABORT],
    "sample_job_cleared": [REGJOB, ACCEPTED, ENQUEUED_NS, DEQUEUED_WM,
                           HELPERCALL, MATCH, HELPERRETURN, ENQUEUED_WM,
                           DEQUEUED_JC, TRANSFER, ACCEPTED_LM, RUNNING,
                           DONE, CLEAR],
    # Tag values with a quote, a backslash and a newline: ULM escapes.
    "sample_job_tagged_done": [REGJOB, ACCEPTED, ENQUEUED_NS, DEQUEUED_WM,
                               HELPERCALL, MATCH, HELPERRETURN, ENQUEUED_WM,
                               DEQUEUED_JC, TRANSFER, ACCEPTED_LM, RUNNING,
                               usertag("color", "green"),
                               usertag("note", 'said "done"\nin C:\\out'),
                               DONE],
}
TEMPLATE = "sample_job_cleared"


def job_lines(jobid, events, start):
    """The dump lines of one job whose first event is at `start` (in microseconds)."""
    counters = dict((key, 0) for key, _ in SEQ)
    lines = []
    for n, (kind, source, fields) in enumerate(events):
        counters[COMPONENT[source]] += 1
        date = start + n * 1250731          # events 1.25 s apart
        seqcode = ":".join("%s=%0*d" % (key, width, counters[key])
                           for key, width in SEQ)
        common = [("DATE", ulm_date(date)), ("HOST", quote(HOST)),
                  ("PROG", "edg-wms"), ("LVL", "SYSTEM"),
                  ("DG.PRIORITY", "0"), ("DG.SOURCE", quote(source)),
                  ("DG.SRC_INSTANCE", quote("")),
                  ("DG.EVNT", quote(kind)), ("DG.JOBID", quote(jobid)),
                  ("DG.SEQCODE", quote(seqcode)), ("DG.USER", quote(USER))]
        own = [("DG.%s.%s" % (kind.upper(), key), quote(value))
               for key, value in fields]
        arrived = ulm_date(date + 20417)    # logged, then arrived
        lines.append("DG.ARRIVED=%s %s\n" % (arrived, "".join(
            "%s=%s " % pair for pair in common + own)))
    return lines


def samples():
    """{file name: bytes} of every sample."""
    out = {}
    start = 1767261600 * 1000000 + 123456    # 2026-01-01 10:00:00 UTC
    for i, name in enumerate(sorted(LIFECYCLES)):
        jobid = LB + unique(name)
        out[name] = "".join(job_lines(jobid, LIFECYCLES[name],
                                      start + i * 3600 * 1000000)).encode()
    out["job_template"] = "".join(job_lines(
        PLACEHOLDER, LIFECYCLES[TEMPLATE], start - 86400 * 1000000)).encode()
    return out


def main(argv):
    if len(argv) > 2 or argv[1:2] in (["-h"], ["--help"]):
        sys.stderr.write("usage: make_samples.py [DIR]\n")
        return 2
    target = argv[1] if len(argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "samples")
    if not os.path.isdir(target):
        os.makedirs(target)
    for name, data in sorted(samples().items()):
        with open(os.path.join(target, name), "wb") as f:
            f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
