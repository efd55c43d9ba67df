// Feeds a trace, kernel text or an NPTKit trace, to the what-if model and renders the report.

package struct WhatIfReport: Sendable {
    package var tracePath: String
    package var input: String
    package var mode: WhatIfMode
    package var costs: WhatIfCosts
    package var policySummary: String
    package var needsMBEC: Bool
    package var rows: [(String, WhatIfCounts)]
    package var total: WhatIfCounts
    package var notes: [String]

    package func render() -> String {
        var out = ["What-if: NPTKit's emulated MBEC, mode \(mode.rawValue), on \(tracePath)",
                   "Input: \(input)",
                   "Policy: \(policySummary); MBEC needed (some page's Xs and Xu differ): \(needsMBEC ? "yes" : "no, so nothing is added")",
                   "Costs: an added exit \(us(costs.exitNs)), a hierarchy switch \(us(costs.switchNs)) on top of its exit (\(costs.source))",
                   ""]
        let header = ["vCPU", "exits", "u->k", "k->u", "+escalation", "+return", "+violation", "switches", "fetch-viol",
                      "data-viol", "other-hier", "added time", "trace time", "added/trace"]
        var table = [header]
        for (name, c) in rows + [("total", total)] {
            let added = c.addedNs(costs)
            let ratio = c.durationNs > 0 ? fmt(100 * added / Double(c.durationNs), 1) + "%" : "-"
            table.append([name, "\(c.exits)", "\(c.userToKernel)", "\(c.kernelToUser)", "\(c.escalationExits)", "\(c.returnExits)",
                          "\(c.violationExits)", "\(c.switches)", "\(c.fetchViolations)", "\(c.dataViolations)",
                          "\(c.ranUnderOtherHierarchy)", us(added), us(Double(c.durationNs)), ratio])
        }
        var w = header.map(\.count)
        for r in table { for (i, c) in r.enumerated() { w[i] = max(w[i], c.count) } }
        for (k, r) in table.enumerated() {
            out.append("  " + r.enumerated().map { i, c in i == 0 ? c + String(repeating: " ", count: w[i] - c.count)
                                                       : String(repeating: " ", count: w[i] - c.count) + c }.joined(separator: "  "))
            if k == 0 { out.append("  " + w.map { String(repeating: "-", count: $0) }.joined(separator: "  ")) }
        }
        out.append("")
        out.append("Added exits: \(total.addedExits) (\(total.escalationExits) escalation, \(total.returnExits) return, \(total.violationExits) violation), hierarchy switches: \(total.switches), violations reported: \(total.fetchViolations) fetch, \(total.dataViolations) data; added time \(us(total.addedNs(costs))) over \(us(Double(total.durationNs))) of trace")
        out.append("")
        out.append("Assumptions (all figures are lower bounds):")
        for a in assumptions + notes { out.append("  - " + a) }
        return out.joined(separator: "\n")
    }

    var assumptions: [String] {
        var a = [
            "the guest's mode at an exit is its CPL where the trace gives it (NPTKit traces), else inferred from the rip: kernel where the policy's `kernel` lines say (without them: the upper canonical half, bit 63 set), user otherwise",
            "a change of mode between two exits of a vCPU is counted once; the guest may have changed mode (system calls, interrupts) several times between them without an exit, each of which emulated MBEC would also see, so exits, switches and time are lower bounds",
            "the page of the rip was fetched in that mode at that exit: it is checked against the policy (rips become guest-physical through the `map` lines, identity elsewhere); fetches between exits are not seen",
            "exact mode: an exit on every user->kernel (escalation) and kernel->user (return) change, each switching hierarchy; lazy: escalation exits only, and a violation exit (and switch) at the first user fetch of a page the supervisor hierarchy does not make executable; violation-only: only violation exits",
            "at a vCPU's first exit the hierarchy of its mode is exposed; the core arms no MBEC exit when no page's Xs and Xu differ",
            "a violation exit whose page is executable in the guest's mode switches hierarchy; otherwise the violation is reported to the VM (fetch-viol); data-viol counts MMIO/EPT data accesses the policy's R/W forbids (the same with or without MBEC)",
            "added time = added exits x the exit cost + switches x the switch cost; the exit stream's own cost is not counted",
        ]
        if mode == .violationOnly { a.append("violation-only: other-hier counts exits where the guest ran a page under the other mode's hierarchy (what this mode does not stop)") }
        return a
    }

    func us(_ ns: Double) -> String { ns >= 1e6 ? fmt(ns / 1e6, 3) + " ms" : fmt(ns / 1e3, 1) + " us" }
}

/// `d` rounded to `digits` decimals, always written with that many ("2.50").
package func fmt(_ d: Double, _ digits: Int = 2) -> String {
    var m = 1.0
    for _ in 0..<digits { m *= 10 }
    let r = (d * m).rounded() / m
    var s = String(r)
    if let dot = s.firstIndex(of: ".") {
        let decimals = s.distance(from: dot, to: s.endIndex) - 1
        if decimals < digits { s += String(repeating: "0", count: digits - decimals) }
    } else if digits > 0 { s += "." + String(repeating: "0", count: digits) }
    return s
}

/// Turns kernel-trace events into what-if exits. Two streams are built: from kvm_exit (stock VMX/SVM
/// KVM) and from kvm_userspace_exit (KVMs whose kvm_exit does not fire, like this machine's PVM, where
/// the rip comes from kvm_emulate_insn); the report uses the first if the trace has any kvm_exit.
package struct KernelExitStream: Sendable {
    package var exitModel: WhatIfModel
    package var userspaceModel: WhatIfModel
    struct Pending: Sendable { var key: String; var exit: WhatIfExit; var wantsGPA: Bool }
    var pendingExit: [String: Pending] = [:]
    struct ThreadState: Sendable { var rip: UInt64?; var lastFailed = false; var mmio: (UInt64, Bool)? }
    var threads: [Int32: ThreadState] = [:]
    var keyOfThread: [Int32: String] = [:]
    package private(set) var kvmExits = 0

    /// A vCPU: its index where the event prints it, with its thread (two VMs may both have a vCPU 0);
    /// else its thread.
    static func key(_ vcpu: UInt32?, _ ev: KernelTraceEvent) -> String {
        vcpu.map { "vcpu \($0) (pid \(ev.pid))" } ?? "pid \(ev.pid) (\(ev.task))"
    }
    package private(set) var userspaceExits = 0

    package init(policy: WhatIfPolicy, mode: WhatIfMode) {
        exitModel = WhatIfModel(policy: policy, mode: mode)
        userspaceModel = WhatIfModel(policy: policy, mode: mode)
    }

    package mutating func feed(_ ev: KernelTraceEvent) {
        switch ev.event {
        case .exit(let x):
            kvmExits += 1
            let key = KernelExitStream.key(x.vcpu, ev)
            keyOfThread[ev.pid] = key
            flush(key)
            var e = WhatIfExit(timestamp: ev.timestamp, rip: x.rip)
            var wants = false
            if x.isa == .svm && x.reasonNumber == KVMExitReasons.svmNPF, let code = x.info1, let gpa = x.info2 {
                if code & 0x10 != 0 { e.fetchGPA = gpa } else { e.dataGPA = gpa; e.dataWrite = code & 2 != 0 }
            } else if let q = x.eptQualification {
                wants = true
                e.dataWrite = q & 2 != 0
                if q & 4 != 0 { e.fetchGPA = 0 } // the address comes with kvm_page_fault
            }
            pendingExit[key] = Pending(key: key, exit: e, wantsGPA: wants)
        case .pageFault(let f):
            let key = f.vcpu.map { KernelExitStream.key($0, ev) } ?? keyOfThread[ev.pid] ?? KernelExitStream.key(nil, ev)
            if var p = pendingExit[key], p.wantsGPA {
                if f.errorCode & 0x10 != 0 { p.exit.fetchGPA = f.address } else {
                    p.exit.fetchGPA = nil; p.exit.dataGPA = f.address; p.exit.dataWrite = f.errorCode & 2 != 0
                }
                p.wantsGPA = false
                pendingExit[key] = p
            }
        case .entry(let en):
            flush(KernelExitStream.key(en.vcpu, ev))
        case .emulateInsn(let i):
            var t = threads[ev.pid] ?? ThreadState()
            t.rip = i.csBase &+ i.rip
            t.lastFailed = i.failed
            threads[ev.pid] = t
        case .mmio(let m):
            guard m.kind != .read else { break } // a read's completion, after user space answered
            var t = threads[ev.pid] ?? ThreadState()
            t.mmio = (m.gpa, m.kind == .write)
            threads[ev.pid] = t
        case .userspaceExit(let u):
            userspaceExits += 1
            let t = threads[ev.pid] ?? ThreadState()
            var e = WhatIfExit(timestamp: ev.timestamp, rip: t.rip)
            if let (g, w) = t.mmio { e.dataGPA = g; e.dataWrite = w }
            // KVM_EXIT_INTERNAL_ERROR after a failed emulation: an instruction that could not be fetched
            // (a page without memslot: what the KVM plugin reports as an EPT violation on a fetch).
            if u.kvmExitReason == 17, t.lastFailed, let rip = t.rip { e.fetchGPA = userspaceModel.policy.gpa(ofLinear: rip) }
            userspaceModel.feed(vcpu: KernelExitStream.key(nil, ev), e)
            threads[ev.pid] = ThreadState()
        case .pio, .injException:
            break
        }
    }

    mutating func flush(_ key: String) {
        guard let p = pendingExit.removeValue(forKey: key) else { return }
        var e = p.exit
        if e.fetchGPA == 0 && p.wantsGPA { e.fetchGPA = nil }
        exitModel.feed(vcpu: p.key, e)
    }

    package mutating func finish() {
        for k in pendingExit.keys.sorted() { flush(k) }
    }
}

package enum WhatIfAnalysis {
    /// Whether `path` starts with the NPTKit trace magic.
    package static func isNPTKitTrace(_ path: String) -> Bool {
        guard let src = try? FileTraceSource(path: path) else { return false }
        var b = [UInt8](repeating: 0, count: 8)
        let n = (try? b.withUnsafeMutableBytes { try src.read(into: $0) }) ?? 0
        return n == 8 && b == TraceFormat.magic
    }

    package static func run(tracePath: String, policy: WhatIfPolicy, policyPath: String, mode: WhatIfMode, costs: WhatIfCosts,
                           unknownEvents: KernelTraceParser.UnknownEvents = .skip) throws -> WhatIfReport {
        let summary = "\(policyPath): \(policy.ranges.count) ranges, default \(permsText(policy.defaultPerms)), \(policy.maps.count) maps, kernel rips: \(policy.kernelRanges.isEmpty ? "upper canonical half" : policy.kernelRanges.map { "\(hex($0.0))-\(hex($0.1))" }.joined(separator: ", "))"
        var notes: [String] = []
        if isNPTKitTrace(tracePath) {
            let r = try TraceReader(path: tracePath)
            var model = WhatIfModel(policy: policy, mode: mode)
            var skippedMBEC = 0
            while let ev = try r.next() {
                guard case .exit(let v, let x) = ev.record else { continue }
                if x.reason == .escalation || x.reason == .returnToUser { skippedMBEC += 1; continue }
                var e = WhatIfExit(timestamp: ev.timestamp, rip: x.rip, cpl: x.cpl)
                if x.reason == .eptViolation {
                    if x.qualification & 4 != 0 { e.fetchGPA = x.gpa } else { e.dataGPA = x.gpa; e.dataWrite = x.qualification & 2 != 0 }
                }
                model.feed(vcpu: "vcpu \(v)", e)
            }
            if skippedMBEC > 0 { notes.append("\(skippedMBEC) escalation and return exits of the recorded run (MBEC already on) are not part of the stream") }
            return WhatIfReport(tracePath: tracePath, input: "NPTKit trace \(r.major).\(r.minor), \(r.recordIndex) records; exits with their CPL",
                                mode: mode, costs: costs, policySummary: summary, needsMBEC: policy.needsMBEC,
                                rows: model.order.map { ($0, model.counts($0)!) }, total: model.total, notes: notes)
        }
        var parser = KernelTraceParser(unknownEvents: unknownEvents)
        var stream = KernelExitStream(policy: policy, mode: mode)
        var dialects: [KernelTraceDialect: Int] = [:]
        try LineReader.forEachLine(path: tracePath) { line in
            if let ev = try parser.parse(line) {
                dialects[ev.dialect, default: 0] += 1
                stream.feed(ev)
            }
        }
        stream.finish()
        let useExit = stream.kvmExits > 0
        let model = useExit ? stream.exitModel : stream.userspaceModel
        let d = dialects.sorted { $0.value > $1.value }.map { "\($0.key.rawValue) \($0.value)" }.joined(separator: ", ")
        var input = "kernel trace (\(d.isEmpty ? "no events" : d) event lines of \(parser.lineNumber) lines); "
        input += useExit ? "exits: \(stream.kvmExits) kvm_exit events" : "no kvm_exit event: exits are the \(stream.userspaceExits) kvm_userspace_exit events, rips from the kvm_emulate_insn before each"
        if !parser.skipped.isEmpty {
            notes.append("events skipped (not read by the parser): " + parser.skipped.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        }
        if parser.lost > 0 { notes.append("the kernel lost \(parser.lost) events: the stream has gaps") }
        if !useExit { notes.append("without kvm_exit only exits to user space are seen (this machine's PVM KVM emits no kvm_exit, kvm_entry or kvm_page_fault), and a rip is known only where KVM emulated an instruction since the previous exit") }
        return WhatIfReport(tracePath: tracePath, input: input, mode: mode, costs: costs, policySummary: summary,
                            needsMBEC: policy.needsMBEC, rows: model.order.map { ($0, model.counts($0)!) }, total: model.total, notes: notes)
    }
}
