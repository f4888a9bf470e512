"""Cross-check the SOAP wire format with an independent stack (zeep).

zeep is built from the project's WSDL of the JPPS operations the importer
calls (testdata/wsdl).
This drives jp_importer's real JPPS client against the test_all JPPS
fixture, then has zeep deserialize every request the client sent, every
response the fixture answered, and the genericFault chain of every fault.
Run by .ci/run with a venv python that has zeep; exits 1 on any mismatch.
"""

import os
import sys

import lxml.etree
import zeep

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import jp_importer                                          # noqa: E402
import test_all                                             # noqa: E402

WSDL = os.path.join(test_all.TESTDATA, "wsdl", "JobProvenancePS.wsdl")
JOB = "https://lb.example.org:9000/rReV1TpJ5oY0Z1_M4NBfHw"


def main():
    client = zeep.Client(WSDL)
    binding = list(client.wsdl.bindings.values())[0]
    fault_type = client.get_type("{http://glite.org/wsdl/types/jp}"
                                 "genericFault")
    pki = test_all.pki()
    jpps = test_all.JPPSFixture(pki).start()
    failures = 0
    try:
        creds = jp_importer.Credentials(pki.host_cert, pki.host_key,
                                        pki.ca_dir).load()
        jp = jp_importer.JPPSClient(jpps.hostport, creds, timeout=10)
        steps = [
            lambda: jp.register_job(JOB, "/C=CZ/O=CESNET/CN=A & B <x>"),
            lambda: jp.register_job(JOB, "/CN=again"),          # EEXIST
            lambda: jp.start_upload(JOB, jp_importer.CLASS_LB, "text/lb"),
            lambda: jp.start_upload(JOB, jp_importer.CLASS_LB, "text/lb"),
            lambda: jp.commit_upload(jpps_destination(jpps)),
            lambda: jp.get_job_attributes(JOB, [test_all.REGTIME_ATTR]),
            lambda: jp.get_job_attributes(JOB + "x",
                                          [test_all.REGTIME_ATTR]),
        ]
        for step in steps:
            try:
                step()
            except jp_importer.JPPSFaultError:
                pass
        jpps.register("https://lb.example.org:9000/mine", pki.host_dn)
        jp.get_job_attributes("https://lb.example.org:9000/mine",
                              [test_all.REGTIME_ATTR])
        for call in jpps.calls:
            operation = binding._operations[call.op]
            try:
                request = operation.input.deserialize(
                    lxml.etree.fromstring(call.raw))
                body = call.response
                if isinstance(body, str):
                    body = body.encode("utf-8")
                response = lxml.etree.fromstring(body)
                fault = response.find(".//{%s}Fault" % test_all.NS_SOAP)
                if fault is None:
                    operation.output.deserialize(response)
                    what = "response"
                else:
                    detail = fault.find("detail")[0]
                    parsed = fault_type.parse_xmlelement(detail)
                    what = "fault %s %s" % (parsed.code, parsed.source)
                del request                  # parsing it was the check
                print("ok   %-16s request and %s" % (call.op, what))
            except Exception as exc:            # report every mismatch
                failures += 1
                print("FAIL %-16s %s: %s" % (call.op, type(exc).__name__,
                                             exc))
        ops = set(c.op for c in jpps.calls)
        if ops != {"RegisterJob", "StartUpload", "CommitUpload",
                   "GetJobAttributes"}:
            failures += 1
            print("FAIL not every operation was exercised: %s" % ops)
    finally:
        jpps.stop()
    print("%d calls cross-checked with zeep %s, %d failures"
          % (len(jpps.calls), zeep.__version__, failures))
    return 1 if failures else 0


def jpps_destination(jpps):
    return [f["destination"] for f in jpps.files.values()][0]


if __name__ == "__main__":
    sys.exit(main())
