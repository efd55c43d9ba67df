// What-if: from a real exit stream and an MBEC policy, what NPTKit's emulated MBEC would add
// (exits, hierarchy switches, violations, time), per vCPU and in total. The model and its
// assumptions are printed with every report (WhatIfReport.render) and in docs/trace-format.md.

package let permR: UInt64 = 1, permW: UInt64 = 2, permXs: UInt64 = 4, permXu: UInt64 = 1 << 10

package struct WhatIfInputError: Error, Sendable, CustomStringConvertible {
    package var file: String
    package var line: Int
    package var message: String
    package init(file: String, line: Int, _ message: String) { self.file = file; self.line = line; self.message = message }
    package var description: String { "\(file): line \(line): \(message)" }
}

func parseNumber(_ t: Substring) -> UInt64? {
    var t = t.filter { $0 != "_" }[...]
    if t.hasPrefix("0x") || t.hasPrefix("0X") { t = t.dropFirst(2); return t.isEmpty ? nil : UInt64(t, radix: 16) }
    return UInt64(t)
}

/// "R|W|Xs|Xu" (any order, '|' or ',' between), "-" for none.
package func parsePerms(_ t: Substring) -> UInt64? {
    if t == "-" { return 0 }
    var p: UInt64 = 0
    for part in t.split(whereSeparator: { $0 == "|" || $0 == "," }) {
        switch part.lowercased() {
        case "r": p |= permR
        case "w": p |= permW
        case "xs", "sx": p |= permXs
        case "xu", "ux": p |= permXu
        case "x": p |= permXs | permXu
        default: return nil
        }
    }
    return p
}

/// The policy file: `GPA SIZE PERMS` lines, plus `default PERMS`, `map GVA SIZE GPA` (how a rip
/// becomes a guest-physical address; identity where no map covers it) and `kernel START END`
/// (rips in [START, END) are kernel code; without such lines, the upper canonical half is).
package struct WhatIfPolicy: Sendable {
    package struct Range: Sendable, Hashable {
        package var start: UInt64; package var end: UInt64; package var perms: UInt64
        package init(start: UInt64, end: UInt64, perms: UInt64) { self.start = start; self.end = end; self.perms = perms }
    }
    package struct Map: Sendable, Hashable {
        package var gva: UInt64; package var size: UInt64; package var gpa: UInt64
        package init(gva: UInt64, size: UInt64, gpa: UInt64) { self.gva = gva; self.size = size; self.gpa = gpa }
    }
    package var ranges: [Range] = []
    package var defaultPerms: UInt64 = permR | permW | permXs | permXu
    package var maps: [Map] = []
    package var kernelRanges: [(UInt64, UInt64)] = []
    package init() {}

    package static func parse(_ text: String, file: String = "policy") throws(WhatIfInputError) -> WhatIfPolicy {
        var p = WhatIfPolicy()
        for (n, t) in tokenizedLines(text) {
            func fail(_ m: String) -> WhatIfInputError { WhatIfInputError(file: file, line: n, m) }
            func num(_ s: Substring, _ what: String) throws(WhatIfInputError) -> UInt64 {
                guard let v = parseNumber(s) else { throw fail("\(what) \"\(s)\" is not a number (0x... or decimal)") }
                return v
            }
            switch t[0] {
            case "default":
                guard t.count == 2, let perms = parsePerms(t[1]) else { throw fail("expected \"default PERMS\" (PERMS like R|W|Xs|Xu)") }
                p.defaultPerms = perms
            case "map":
                guard t.count == 4 else { throw fail("expected \"map GVA SIZE GPA\"") }
                let m = Map(gva: try num(t[1], "GVA"), size: try num(t[2], "SIZE"), gpa: try num(t[3], "GPA"))
                guard m.size > 0, m.gva <= UInt64.max - (m.size - 1) else { throw fail("the map's range is empty or wraps") }
                p.maps.append(m)
            case "kernel":
                guard t.count == 3 else { throw fail("expected \"kernel START END\"") }
                let a = try num(t[1], "START"), b = try num(t[2], "END")
                guard a < b else { throw fail("START must be below END") }
                p.kernelRanges.append((a, b))
            default:
                guard t.count == 3 else { throw fail("expected \"GPA SIZE PERMS\", \"default PERMS\", \"map GVA SIZE GPA\" or \"kernel START END\"") }
                let gpa = try num(t[0], "GPA"), size = try num(t[1], "SIZE")
                guard let perms = parsePerms(t[2]) else { throw fail("PERMS \"\(t[2])\": use R, W, Xs, Xu joined by | (or - for none)") }
                guard size > 0, gpa <= UInt64.max - size else { throw fail("the range is empty or wraps") }
                let r = Range(start: gpa, end: gpa + size, perms: perms)
                if let o = p.ranges.first(where: { $0.start < r.end && r.start < $0.end }) {
                    throw fail("\(hex(gpa))-\(hex(gpa + size)) overlaps \(hex(o.start))-\(hex(o.end))")
                }
                p.ranges.append(r)
            }
        }
        p.ranges.sort { $0.start < $1.start }
        return p
    }

    package func perms(_ gpa: UInt64) -> UInt64 {
        var lo = 0, hi = ranges.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if ranges[mid].end <= gpa { lo = mid + 1 } else { hi = mid }
        }
        return lo < ranges.count && ranges[lo].start <= gpa ? ranges[lo].perms : defaultPerms
    }

    package func gpa(ofLinear a: UInt64) -> UInt64 {
        for m in maps where a >= m.gva && a - m.gva < m.size { return m.gpa + (a - m.gva) }
        return a
    }

    package func isKernel(rip: UInt64) -> Bool {
        if kernelRanges.isEmpty { return rip >> 63 == 1 }
        return kernelRanges.contains { rip >= $0.0 && rip < $0.1 }
    }

    /// MBEC changes anything only where some page's Xs and Xu differ.
    package var needsMBEC: Bool {
        ranges.contains { ($0.perms & permXs != 0) != ($0.perms & permXu != 0) }
            || (defaultPerms & permXs != 0) != (defaultPerms & permXu != 0)
    }
}

/// Costs of what the emulation adds.
package struct WhatIfCosts: Sendable {
    /// One added exit (an escalation, return or violation exit and the core's handling), ns.
    package var exitNs: Double
    /// One hierarchy switch on top of its exit, ns.
    package var switchNs: Double
    package var source: String
    /// The KVM backend on this project's build machine (README, Benchmarks, table 8, `nptkit-cli
    /// bench --only kvm`): raw exit round trip 19.0 µs; one switch 343 µs with its exit, so 324 µs on top.
    package static let kvmBuildMachine = WhatIfCosts(exitNs: 19_000, switchNs: 324_000,
                                                    source: "defaults: the KVM backend on the build machine (README, Benchmarks 8: exit round trip 19.0 us, a switch 343 us with its exit)")
    package init(exitNs: Double, switchNs: Double, source: String) { self.exitNs = exitNs; self.switchNs = switchNs; self.source = source }

    /// `exit_ns N` and `switch_ns N` lines, '#' comments.
    package static func parse(_ text: String, file: String) throws(WhatIfInputError) -> WhatIfCosts {
        var c = WhatIfCosts(exitNs: kvmBuildMachine.exitNs, switchNs: kvmBuildMachine.switchNs, source: "costs file \(file)")
        for (n, t) in tokenizedLines(text) {
            guard t.count == 2, let v = Double(t[1]), v >= 0, v.isFinite else {
                throw WhatIfInputError(file: file, line: n, "expected \"exit_ns N\" or \"switch_ns N\" with N >= 0")
            }
            switch t[0] {
            case "exit_ns": c.exitNs = v
            case "switch_ns": c.switchNs = v
            default: throw WhatIfInputError(file: file, line: n, "unknown cost \"\(t[0])\" (exit_ns, switch_ns)")
            }
        }
        return c
    }
}

package enum WhatIfMode: String, Sendable, CaseIterable {
    case exact, lazy
    case violationOnly = "violation-only"
}

/// One exit of the input, as the model needs it.
package struct WhatIfExit: Sendable, Hashable {
    package var timestamp: UInt64
    /// Where the guest was (the instruction it executed or was about to), if the trace says.
    package var rip: UInt64?
    /// The CPL, if the trace says (NPTKit traces); else inferred from the rip.
    package var cpl: UInt32?
    /// A data access the exit reports (guest-physical), if any.
    package var dataGPA: UInt64?
    package var dataWrite = false
    /// A fetch the exit reports at a guest-physical address (an EPT violation / NPF on a fetch,
    /// or an instruction KVM could not fetch).
    package var fetchGPA: UInt64?
    package init(timestamp: UInt64, rip: UInt64? = nil, cpl: UInt32? = nil) { self.timestamp = timestamp; self.rip = rip; self.cpl = cpl }
}

package struct WhatIfCounts: Sendable, Hashable {
    package var exits = 0
    package var exitsWithoutRip = 0
    package var userToKernel = 0
    package var kernelToUser = 0
    package var escalationExits = 0
    package var returnExits = 0
    package var violationExits = 0
    package var switches = 0
    package var fetchViolations = 0
    package var dataViolations = 0
    /// Exits where the guest ran a page under the other mode's hierarchy (the emulation's known gaps).
    package var ranUnderOtherHierarchy = 0
    package var firstTimestamp: UInt64 = 0
    package var lastTimestamp: UInt64 = 0
    package var addedExits: Int { escalationExits + returnExits + violationExits }
    package func addedNs(_ c: WhatIfCosts) -> Double { Double(addedExits) * c.exitNs + Double(switches) * c.switchNs }
    package var durationNs: UInt64 { lastTimestamp - firstTimestamp }

    mutating func add(_ o: WhatIfCounts) {
        exits += o.exits; exitsWithoutRip += o.exitsWithoutRip; userToKernel += o.userToKernel; kernelToUser += o.kernelToUser
        escalationExits += o.escalationExits; returnExits += o.returnExits; violationExits += o.violationExits
        switches += o.switches; fetchViolations += o.fetchViolations; dataViolations += o.dataViolations
        ranUnderOtherHierarchy += o.ranUnderOtherHierarchy
    }
}

/// The model, fed exit by exit (per vCPU, in time order); O(vCPUs) memory.
package struct WhatIfModel: Sendable {
    package let policy: WhatIfPolicy
    package let mode: WhatIfMode
    struct VCPUState: Sendable {
        var user: Bool?
        var exposedUser = false
        var counts = WhatIfCounts()
    }
    var vcpus: [String: VCPUState] = [:]
    package private(set) var order: [String] = []

    package init(policy: WhatIfPolicy, mode: WhatIfMode) { self.policy = policy; self.mode = mode }

    package mutating func feed(vcpu: String, _ e: WhatIfExit) {
        if vcpus[vcpu] == nil { vcpus[vcpu] = VCPUState(); order.append(vcpu) }
        var s = vcpus[vcpu]!
        defer { vcpus[vcpu] = s }
        if s.counts.exits == 0 { s.counts.firstTimestamp = e.timestamp }
        s.counts.exits += 1
        s.counts.lastTimestamp = e.timestamp
        if let g = e.dataGPA {
            let p = policy.perms(g)
            if (e.dataWrite && p & permW == 0) || (!e.dataWrite && p & permR == 0) { s.counts.dataViolations += 1 }
        }
        let user: Bool
        if let cpl = e.cpl { user = cpl == 3 } else if let rip = e.rip { user = !policy.isKernel(rip: rip) } else {
            s.counts.exitsWithoutRip += 1
            return
        }
        let mbec = policy.needsMBEC
        if let was = s.user, was != user {
            if user { s.counts.kernelToUser += 1 } else { s.counts.userToKernel += 1 }
            if mbec {
                switch mode {
                case .exact:
                    if user { s.counts.returnExits += 1 } else { s.counts.escalationExits += 1 }
                    if s.exposedUser != user { s.counts.switches += 1; s.exposedUser = user }
                case .lazy:
                    if !user {
                        s.counts.escalationExits += 1
                        if s.exposedUser { s.counts.switches += 1; s.exposedUser = false }
                    }
                case .violationOnly:
                    break
                }
            }
        } else if s.user == nil {
            s.exposedUser = user // the first exit: the hierarchy of its mode is assumed exposed
        }
        s.user = user
        // The fetch at the exit: of the rip's page, and any fetch the exit itself reports.
        var fetches: [UInt64] = []
        if let rip = e.rip { fetches.append(policy.gpa(ofLinear: rip)) }
        if let f = e.fetchGPA, fetches.first.map({ $0 >> 12 != f >> 12 }) ?? true { fetches.append(f) }
        for g in fetches {
            let p = policy.perms(g)
            let allowed = p & (user ? permXu : permXs) != 0
            guard mbec else {
                if !allowed { s.counts.fetchViolations += 1 }
                continue
            }
            let exposedX = p & (s.exposedUser ? permXu : permXs) != 0
            if !exposedX {
                s.counts.violationExits += 1
                if allowed { s.counts.switches += 1; s.exposedUser = user } else { s.counts.fetchViolations += 1 }
            } else if !allowed {
                s.counts.ranUnderOtherHierarchy += 1
            }
        }
    }

    package func counts(_ vcpu: String) -> WhatIfCounts? { vcpus[vcpu]?.counts }
    package var total: WhatIfCounts {
        var t = WhatIfCounts()
        var first = UInt64.max, last: UInt64 = 0
        for v in order {
            let c = vcpus[v]!.counts
            t.add(c)
            first = min(first, c.firstTimestamp); last = max(last, c.lastTimestamp)
        }
        t.firstTimestamp = first == .max ? 0 : first
        t.lastTimestamp = last
        return t
    }
}

/// The non-empty lines of a what-if input file as (line number from 1, whitespace-separated tokens),
/// '#' starting a comment.
func tokenizedLines(_ text: String) -> [(line: Int, tokens: [Substring])] {
    var out: [(line: Int, tokens: [Substring])] = []
    for (i, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
        var line = rawLine
        if let h = line.firstIndex(of: "#") { line = line[..<h] }
        let t = line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" })
        if !t.isEmpty { out.append((i + 1, t)) }
    }
    return out
}
