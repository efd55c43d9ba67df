#!/usr/bin/env python3
"""Changes one recorded result in a call trace, as a library that answered differently would have.

  mutate_calltrace.py IN OUT FUNCTION K status|output

Finds the K-th record (1-based, among the records of FUNCTION) and changes either its status
(NPT_OK <-> NPT_ERR_OUT_OF_RANGE) or its last output u64 (the 8 bytes before the empty last-error
blob: *perms of npt_policy_get). Prints the record's call number (1-based, over the whole trace in
sequence-number order), which replay-calls must name. The function index comes from Sources/NPTKit/CallTable.generated.swift.
"""
import os
import re
import struct
import sys

src, dst, function, k, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
table = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "Sources", "NPTKit",
                          "CallTable.generated.swift")).read()
index = int(re.search(r"case %s = (\d+)" % function, table).group(1))
data = bytearray(open(src, "rb").read())
assert data[:8] == b"NPTCALLS", "not a call trace"
# The records, in the order the calls returned (their sequence numbers: the file holds them in
# per-thread blocks); replay-calls numbers the calls in this order.
records, at = [], 24
while at < len(data):
    length, fn, thread, seq = struct.unpack_from("<IHHQ", data, at)
    records.append((seq, at, length, fn))
    at += length
records.sort()
seen = 0
for call, (seq, at, length, fn) in enumerate(records, 1):
    if fn == index:
        seen += 1
        if seen == k:
            if mode == "status":
                (result,) = struct.unpack_from("<q", data, at + 16)
                struct.pack_into("<q", data, at + 16, -5 if result == 0 else 0)
            else:
                end = at + length - 4  # the last-error blob of a call that succeeded: u32 0xFFFFFFFF
                assert struct.unpack_from("<I", data, end)[0] == 0xFFFFFFFF, "the call failed: no output"
                (v,) = struct.unpack_from("<Q", data, end - 8)
                struct.pack_into("<Q", data, end - 8, v ^ 0x4)
            open(dst, "wb").write(data)
            print(call)
            sys.exit(0)
sys.exit("%s has only %d records of %s" % (src, seen, function))
