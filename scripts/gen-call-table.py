#!/usr/bin/env python3
"""The call-trace signature table, generated from the C ABI.

Reads include/nptkit.h (and nptkit_sim.h, which it includes) and writes
Sources/NPTKit/CallTable.generated.swift: every npt_ function with its parameters classified for the
call tracer (what to record before and after the call) and the replayer (how to rebuild the call for
ffi_call), the structs they pass with their sizes, the first published size of each (from the frozen
headers Tests/C/abi/*/nptkit.h) and their pointer members.

  scripts/gen-call-table.py            rewrite the Swift table
  scripts/gen-call-table.py --check    exit 1 if the committed table differs from the header's
  scripts/gen-call-table.py --c-check FILE
                                       write a C file of _Static_asserts: the sizes and offsets the
                                       table uses must be what a C compiler gives (Tests/C/run.sh)
"""
import hashlib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADERS = [os.path.join(ROOT, "include", "nptkit.h"), os.path.join(ROOT, "include", "nptkit_sim.h")]
FROZEN = os.path.join(ROOT, "Tests", "C", "abi")
OUT = os.path.join(ROOT, "Sources", "NPTKit", "CallTable.generated.swift")

HANDLES = {"npt_context", "npt_vm", "npt_vcpu"}
SCALARS = {"uint32_t": ("u32", 4), "int": ("i32", 4), "int32_t": ("i32", 4), "npt_status": ("i32", 4),
           "uint64_t": ("u64", 8), "int64_t": ("i64", 8), "size_t": ("size", 8)}
CALLBACKS = {"npt_leaf_cb"}


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def read_headers(paths):
    return "\n".join(strip_comments(open(p).read()) for p in paths)


def field_layout(ctype):
    """(size, alignment) of a member type on LP64."""
    t = ctype.replace("const ", "").strip()
    if "*" in t or "(" in t or t == "fnptr":
        return 8, 8
    if t in SCALARS:
        return SCALARS[t][1], SCALARS[t][1]
    raise ValueError("unknown member type " + ctype)


def parse_structs(text, padding=None):
    """Every struct's members, offsets and size (LP64). Implicit padding is appended to `padding`."""
    padding = [] if padding is None else padding
    structs = {}
    for m in re.finditer(r"(?:typedef\s+)?struct\s+(npt_\w+)\s*\{(.*?)\}\s*(\w*)\s*;", text, re.S):
        name, body = m.group(1), m.group(2)
        fields, offset, align = [], 0, 1
        for decl in body.split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            fp = re.match(r"(.+?)\(\s*\*\s*(\w+)\s*\)\s*\(.*\)$", decl)
            if fp:
                names, ctype = [fp.group(2)], "fnptr"
            else:
                dm = re.match(r"(.*?)(\w+(?:\[\d+\])?(?:\s*,\s*\**\w+(?:\[\d+\])?)*)$", decl)
                base = dm.group(1).strip()
                names = [n.strip() for n in dm.group(2).split(",")]
                ctype = base
            for n in names:
                count = 1
                am = re.match(r"(\**)(\w+)\[(\d+)\]", n)
                stars = ""
                if am:
                    stars, n, count = am.group(1), am.group(2), int(am.group(3))
                else:
                    sm = re.match(r"(\**)(\w+)", n)
                    stars, n = sm.group(1), sm.group(2)
                t = ctype + (" " + stars if stars else "")
                size, a = field_layout(t)
                aligned = (offset + a - 1) // a * a
                if aligned != offset:
                    padding.append("%s before %s" % (name, n))
                offset = aligned
                fields.append({"name": n, "type": t, "offset": offset})
                offset += size * count
                align = max(align, a)
        size = (offset + align - 1) // align * align
        if size != offset:
            padding.append("%s at its end" % name)
        structs[name] = {"name": name, "fields": fields, "size": size, "end": offset}
    return structs


def first_sizes():
    """Each struct's size in the oldest frozen header that has it (the first published size)."""
    sizes = {}
    if not os.path.isdir(FROZEN):
        return sizes
    for version in sorted(os.listdir(FROZEN), key=lambda v: [int(x) for x in v.split(".")]):
        path = os.path.join(FROZEN, version, "nptkit.h")
        for name, s in parse_structs(read_headers([path])).items():
            sizes.setdefault(name, s["size"])
    return sizes


def pointer_members(s):
    """Pointer members the tracer follows: strings, and a buffer with its `NAME_len` length."""
    out = []
    names = {f["name"]: f for f in s["fields"]}
    for f in s["fields"]:
        t = f["type"]
        if t == "const char *":
            out.append(("string", f["offset"], 0))
        elif t == "const void *" and f["name"] + "_len" in names:
            out.append(("bytes", f["offset"], names[f["name"] + "_len"]["offset"]))
    return out


def classify(params, structs):
    """One kind per parameter (see CallParamKind in Sources/NPTKit/CallTrace.swift)."""
    kinds = []
    i = 0
    while i < len(params):
        t, n = params[i]
        nxt = params[i + 1][0] if i + 1 < len(params) else None
        after = params[i + 2][0] if i + 2 < len(params) else None
        base = t.replace("const ", "").replace("*", "").strip()
        stars = t.count("*")
        const = t.startswith("const ")
        k = {"name": n, "ctype": t, "struct": -1, "count": -1, "filled": -1}
        if stars == 0 and t in SCALARS:
            k["kind"] = SCALARS[t][0]
        elif stars == 0 and t in CALLBACKS:
            k["kind"] = "callback"
        elif t == "void *" and n == "user_data":
            k["kind"] = "userData"
        elif stars == 1 and base in HANDLES:
            k["kind"] = "handle"
        elif stars == 2 and base in HANDLES:
            k["kind"] = "handleOut"
        elif t == "const char *":
            k["kind"] = "string"
        elif t == "const char **":
            k["kind"] = "stringOut"
        elif t == "const void *" and nxt == "size_t":
            k["kind"], k["count"] = "bytesIn", i + 1
        elif t == "void *" and nxt == "size_t":
            k["kind"], k["count"] = "bytesOut", i + 1
            if after == "size_t *":
                k["filled"] = i + 2
        elif stars == 1 and base in SCALARS:
            k["kind"] = SCALARS[base][0] + "Out"
        elif t == "const npt_backend_ops *":
            k["kind"] = "opsTable"
        elif stars == 1 and base in structs:
            k["struct"] = sorted(structs).index(base)
            if nxt == "size_t":
                k["count"] = i + 1
                if const:
                    k["kind"] = "arrayIn"
                else:
                    k["kind"] = "arrayOut"
                    if after != "size_t *":
                        raise ValueError("output array %s without a filled count" % n)
                    k["filled"] = i + 2
            else:
                k["kind"] = "structIn" if const else "structInOut"
        else:
            raise ValueError("cannot classify parameter %s %s" % (t, n))
        kinds.append(k)
        i += 1
    return kinds


def parse_functions(text, structs):
    funcs = []
    for m in re.finditer(r"^\s*(npt_status|const char \*|uint32_t)\s*(npt_\w+)\s*\(([^)]*)\)\s*;", text, re.M):
        ret, name, plist = m.group(1), m.group(2), " ".join(m.group(3).split())
        params = []
        if plist != "void":
            for p in plist.split(","):
                p = p.strip()
                pm = re.match(r"(.*?)(\w+)$", p)
                t = " ".join(pm.group(1).replace("*", " * ").split()).replace("* *", "**")
                t = re.sub(r"\s+\*", " *", t)
                params.append((t, pm.group(2)))
        rkind = {"npt_status": "status", "const char *": "string", "uint32_t": "u32"}[ret]
        funcs.append({"name": name, "ret": rkind, "params": classify(params, structs),
                      "signature": "%s %s(%s)" % (ret, name, plist), "retType": ret, "plist": plist})
    return funcs


def callback_types(text):
    out = {}
    for m in re.finditer(r"typedef\s+void\s*\(\s*\*\s*(\w+)\s*\)\s*\(([^)]*)\)\s*;", text):
        if m.group(1) in CALLBACKS:
            types = [" ".join(p.split()[:-1]).replace(" *", "*") for p in m.group(2).split(",")]
            out[m.group(1)] = types
    return out


def generate():
    text = read_headers(HEADERS)
    padding = []
    structs = parse_structs(text, padding)
    if padding:
        # ABI growth rule (include/nptkit.h): no implicit padding, so a later member never lands in
        # bytes an older caller left uninitialized.
        raise SystemExit("include/nptkit.h: implicit padding in " + ", ".join(padding))
    firsts = first_sizes()
    funcs = parse_functions(text, structs)
    abi = re.search(r"NPT_ABI_VERSION_MINOR\s+(\d+)u", text).group(1)
    cbs = callback_types(text)
    fingerprint = hashlib.sha256("\n".join(f["signature"] for f in funcs).encode()).hexdigest()[:16]
    L = []
    L.append("// Generated by scripts/gen-call-table.py from include/nptkit.h: do not edit.")
    L.append("import CNPTKit")
    L.append("// A test (scripts/gen-call-table.py --check, run by Tests/C/run.sh) fails when it and the header disagree.")
    L.append("")
    L.append("extension CallTable {")
    L.append("    /// NPT_ABI_VERSION_MINOR of the header the table was generated from.")
    L.append("    package static let headerMinor: UInt32 = %s" % abi)
    L.append("    /// The first 64 bits of SHA-256 over the functions' declarations: a trace names the table it was recorded with.")
    L.append("    package static let fingerprint: UInt64 = 0x%s" % fingerprint)
    L.append("    package static let structs: [CallStruct] = [")
    for name in sorted(structs):
        s = structs[name]
        versioned = bool(s["fields"]) and s["fields"][0]["name"] == "size" and s["fields"][0]["type"] == "uint32_t"
        ptrs = ", ".join("CallPointer(kind: .%s, offset: %d, lengthOffset: %d)" % p for p in pointer_members(s))
        # Durations (members named ..._ns...) differ from run to run: the replayer does not compare them.
        times = ", ".join(str(f["offset"]) for f in s["fields"] if re.search(r"(^|_)ns(_|$)", f["name"]))
        L.append('        CallStruct(name: "%s", size: %d, firstSize: %d, versioned: %s, pointers: [%s], timeOffsets: [%s]),'
                 % (name, s["size"], firsts.get(name, s["size"]), "true" if versioned else "false", ptrs, times))
    L.append("    ]")
    L.append("    package static let functions: [CallFunction] = [")
    for f in funcs:
        ps = []
        for p in f["params"]:
            ps.append('CallParam(name: "%s", kind: .%s, structIndex: %d, countParam: %d, filledParam: %d)'
                      % (p["name"], p["kind"], p["struct"], p["count"], p["filled"]))
        L.append('        CallFunction(name: "%s", result: .%s, params: [' % (f["name"], f["ret"]))
        for p in ps:
            L.append("            " + p + ",")
        L.append("        ]),")
    L.append("    ]")
    L.append("    /// Callback types (parameter C types), for the replayer's libffi closures.")
    L.append("    package static let callbacks: [String: [String]] = [")
    for n, ts in sorted(cbs.items()):
        L.append('        "%s": [%s],' % (n, ", ".join('"%s"' % t for t in ts)))
    L.append("    ]")
    L.append("}")
    L.append("")
    L.append("// The structs that start with `size`, and the first size a published header gave them.")
    for name in sorted(structs):
        st = structs[name]
        if st["fields"] and st["fields"][0]["name"] == "size" and st["fields"][0]["type"] == "uint32_t":
            L.append("extension %s: NPTVersioned { static var firstPublishedSize: Int { %d } }"
                     % (name, firsts.get(name, st["size"])))
    L.append("")
    L.append("/// One case per exported function, in table order.")
    L.append("package enum CallID: Int, Sendable {")
    for i, f in enumerate(funcs):
        L.append("    case %s = %d" % (f["name"], i))
    L.append("}")
    return "\n".join(L) + "\n", structs, funcs


def c_check(structs, funcs):
    L = ["/* Generated by scripts/gen-call-table.py --c-check: the layouts the call table uses. */",
         "#include <nptkit.h>", "#include <stddef.h>"]
    for name in sorted(structs):
        s = structs[name]
        t = name if name != "npt_host_api" else "struct npt_host_api"
        L.append('_Static_assert(sizeof(%s) == %d, "%s: size");' % (t, s["size"], name))
        for f in s["fields"]:
            L.append('_Static_assert(offsetof(%s, %s) == %d, "%s.%s: offset");'
                     % (t, f["name"], f["offset"], name, f["name"]))
    # Every function of the table is declared with the signature the table read.
    for f in funcs:
        L.append("static %s (*check_%s)(%s) = %s;" % (f["retType"], f["name"], f["plist"], f["name"]))
    L.append("int main(void) { return 0%s; }" % "".join(" || check_%s == 0" % f["name"] for f in funcs))
    return "\n".join(L) + "\n"


def version_script(funcs):
    """A GNU ld version script: one node per ABI minor (NPTKIT_1.0, NPTKIT_1.1, ...), each with the
    functions that minor added (the frozen headers say which), exporting npt_ symbols only."""
    names = [f["name"] for f in funcs]
    seen, nodes = set(), []
    versions = sorted(os.listdir(FROZEN), key=lambda v: [int(x) for x in v.split(".")]) if os.path.isdir(FROZEN) else []
    for v in versions:
        text = read_headers([os.path.join(FROZEN, v, "nptkit.h")])
        added = [f["name"] for f in parse_functions(text, parse_structs(text)) if f["name"] not in seen]
        seen.update(added)
        nodes.append((v, added))
    minor = re.search(r"NPT_ABI_VERSION_MINOR\s+(\d+)u", read_headers(HEADERS)).group(1)
    nodes.append(("1." + minor, [n for n in names if n not in seen]))
    L = ["/* Generated by scripts/gen-call-table.py --version-script from include/nptkit.h and Tests/C/abi/*. */"]
    prev = None
    for i, (v, added) in enumerate(nodes):
        L.append("NPTKIT_%s {" % v)
        if added:
            L.append("  global:")
            L.extend("    %s;" % n for n in added)
        if i == 0:
            L.append("  local:")
            L.append("    *;")
        L.append("}%s;" % (" NPTKIT_%s" % prev if prev else ""))
        prev = v
    return "\n".join(L) + "\n"


def main():
    swift, structs, funcs = generate()
    if len(sys.argv) == 2 and sys.argv[1] == "--check":
        current = open(OUT).read() if os.path.exists(OUT) else ""
        if current != swift:
            sys.stderr.write("%s is not what scripts/gen-call-table.py makes of include/nptkit.h: rerun it\n" % OUT)
            return 1
        print("call table: matches include/nptkit.h (%d functions, %d structs)" % (len(funcs), len(structs)))
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--version-script":
        open(sys.argv[2], "w").write(version_script(funcs))
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--c-check":
        open(sys.argv[2], "w").write(c_check(structs, funcs))
        return 0
    if len(sys.argv) != 1:
        sys.stderr.write(__doc__)
        return 2
    open(OUT, "w").write(swift)
    print("wrote %s (%d functions)" % (OUT, len(funcs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
