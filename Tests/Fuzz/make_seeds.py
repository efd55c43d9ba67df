#!/usr/bin/env python3
"""Writes the committed seed corpus of the fuzz targets (Tests/Fuzz/corpus/TARGET/): the NFIT
fixtures, the sysfs fixture trees in fuzz_sysfs.c's input format, guest images and C ABI programs.
Run from anywhere: python3 Tests/Fuzz/make_seeds.py"""
import os, struct, shutil

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "Fixtures")
OUT = os.path.join(HERE, "corpus")

def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

# nfit: the iasl-compiled fixtures.
for n in ("nfit.aml", "nfit-adr.aml"):
    with open(os.path.join(FIX, "nfit", n), "rb") as f:
        put("nfit", n, f.read())

# sysfs: the names fuzz_sysfs.c knows, in its order.
DIRS = ["region0", "region1", "region7", "region4294967295", "region01", "region-1", "regionX",
        "nmem0", "nmem1", "nmem2", "region2", "namespace0.0", "btt0.0", "ndbus0"]
FILES = ["resource", "size", "deep_flush", "persistence_domain", "mappings", "mapping0",
         "mapping1", "mapping2", "nfit/handle", "nfit", "devtype", "uevent", "mapping99"]
for tree in sorted(os.listdir(os.path.join(FIX, "sysfs"))):
    root = os.path.join(FIX, "sysfs", tree)
    if not os.path.isdir(root):
        continue
    for sub in ("", "bus/nd/devices"):
        r = os.path.join(root, sub) if sub else root
        if not os.path.isdir(r):
            continue
        out = b""
        for d in sorted(os.listdir(r)):
            if d not in DIRS or d in ("", ):
                continue
            for fname in FILES:
                p = os.path.join(r, d, fname)
                if os.path.isfile(p):
                    content = open(p, "rb").read()[:63]
                    if len(DIRS) > 15:
                        pass
                    di = DIRS.index(d)
                    if di > 15:
                        continue
                    out += bytes([(di << 4) | FILES.index(fname), len(content)]) + content
        if out:
            put("sysfs", tree + ("-bus" if sub else ""), out)

# guest: flags, budget, policy, registers, then guest memory (docs/guest-isa.md: 8 bytes an instruction).
def ins(op, a=0, b=0, imm=0):
    return bytes([op, a, b, 0]) + struct.pack("<i", imm)
def guest(flags, code, cpl=0, rip=0x1000, paging=0, handler=0):
    head = bytes([flags, 10, 1, 1, 0x07, 0x04, 0x01])   # flags, budget, 1 policy range: page 1 R|W|SX|UX
    regs = bytes([cpl]) + struct.pack("<H", rip >> 3) + bytes([paging, 0, 0, 0]) + struct.pack("<HH", 0x2000 >> 3, handler >> 3)
    gprs = b"".join(bytes([0x80, 0, 0]) for _ in range(16))
    mem = bytearray(0x1000) + code
    return head + regs + gprs + bytes(mem)
loop = ins(0x05, 3, 0, 1) + ins(0x08, 0, 0, -16)
put("guest", "loop", guest(0, loop))
put("guest", "syscall", guest(0, ins(0x01, 1, 0, 7) + ins(0x0C) + ins(0x0F, 1, 0, 1) + ins(0x0E), cpl=3))
put("guest", "privileged", guest(0x10, loop + ins(0x13) + ins(0x0F, 0, 0, 9)))
put("guest", "nvdimm", guest(0x20, ins(0x01, 2, 0, 0x4000) + ins(0x07, 2, 3, 0) + ins(0x14, 2, 0, 0) + ins(0x15) + ins(0x0E)))
put("guest", "fault", guest(0x01, ins(0x06, 1, 2, 0x7FFF0) + ins(0x0E), handler=0x1000))

# abi: programs of fuzz_abi.c (op byte, then its arguments).
def vm_create(slot): return bytes([0, slot, 0]) + bytes([0x00, 0]) + b"\x07\x00" + b"\x00\x00" + bytes([1, 3])
put("abi", "create-destroy", vm_create(0) + bytes([2, 0, 0, 1]) + bytes([3, 0]) + bytes([1, 0]))
put("abi", "policy-run", vm_create(0) + bytes([2, 0, 0, 0]) + bytes([4, 0, 0x81, 0x10, 0x01, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00])
    + bytes([12, 0]) + bytes([14, 0, 0]) + bytes([28, 0]) + bytes([1, 0]))
put("abi", "memory-huge", vm_create(1) + bytes([8, 0xE0, 1, 0x00, 0, 1]) + bytes([9, 0x10, 0x00, 1, 0x00, 0, 1]) + bytes([23, 0, 0, 1, 1, 1]))
put("abi", "region-raise", vm_create(0) + bytes([2, 0, 0, 0]) + bytes([17] + [0x13] * 64 + [8, 0x04, 0, 0x01, 0, 1, 0, 0, 0, 0]) + bytes([18, 0, 12, 0, 12, 0]))
# trace: a mode byte (bit 0: the harness repairs the checksums), then the committed golden trace.
golden = open(os.path.join(FIX, "npttrace", "golden-1.0.trace"), "rb").read()
put("trace", "golden", b"\x00" + golden)
put("trace", "golden-repaired", b"\x01" + golden)
put("trace", "golden-lazy-repaired", b"\x03" + golden)

# kvmtrace: the real captures (their first 3 KiB of whole lines, with and without the what-if
# policy before a NUL) and the hand-written formats whole.
KT = os.path.join(FIX, "kvmtrace")
policy = open(os.path.join(KT, "gen_guest.policy"), "rb").read()
def head_lines(data, limit=3072):
    out = b""
    for line in data.splitlines(keepends=True):
        if len(out) + len(line) > limit:
            break
        out += line
    return out
for n in sorted(os.listdir(KT)):
    if not n.endswith(".txt"):
        continue
    text = open(os.path.join(KT, n), "rb").read()
    base = n[:-4]
    if n.startswith("handwritten"):
        put("kvmtrace", base, text)
    else:
        put("kvmtrace", base, head_lines(text))
        put("kvmtrace", base + "-policy", policy + b"\x00" + head_lines(text))
print("seeds written to", OUT)
