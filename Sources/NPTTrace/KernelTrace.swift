// A parser of the text the kernel's KVM tracepoints print, as read from
//  - /sys/kernel/tracing/trace and trace_pipe:  "  task-PID  [CPU] FLAGS  SECS.USECS: event: fields"
//    (the `trace` file adds '#' header lines; FLAGS is 4 or 5 characters depending on the kernel;
//    with the record-tgid option a "(TGID)" column follows the task),
//  - `trace-cmd report`:  "  task-PID  [CPU]  SECS.USECS: event:   fields" (event names padded;
//    "BUFFER: " before the task for an instance's buffer; "cpus=N" and "version = N" header lines),
//  - `perf script`:       "  task  PID [CPU] SECS.USECS:  kvm:event: fields" (PID may be PID/TID).
// The task name may contain spaces (QEMU names its vCPU threads "CPU 0/KVM").
// The events and every format each one has had are in docs/trace-format.md, "Kernel traces".

package enum KernelTraceDialect: String, Sendable, Hashable {
    case tracefs, traceCmd = "trace-cmd", perf
}

/// kvm_exit. Fields a format does not print are nil.
package struct KVMExitEvent: Sendable, Hashable {
    package var vcpu: UInt32?
    /// The reason as printed ("EPT_VIOLATION", "npf", or a number "0x30" for one the kernel has no name for).
    package var reasonName: String
    /// The exit reason number (VMX basic exit reason or SVM exit code) when the name is known.
    package var reasonNumber: UInt32?
    package var isa: KVMISA?
    /// " FAILED_VMENTRY" after the reason (VMX).
    package var failedVMEntry: Bool
    package var rip: UInt64
    /// `info1`/`info2` (the first and second number of the older "info %llx %llx").
    package var info1: UInt64?
    package var info2: UInt64?
    package var intrInfo: UInt32?
    package var errorCode: UInt32?
    /// " requests 0x..." (kernels from 6.x on print the vCPU's pending requests).
    package var requests: UInt64?

    /// VMX EPT violation: info1 is the exit qualification (bits 0-2: read, write, fetch).
    package var eptQualification: UInt64? {
        isa == .vmx && reasonNumber == KVMExitReasons.vmxEPTViolation ? info1 : nil
    }
    /// SVM nested page fault: info1 is the error code (bit 1 write, bit 4 fetch), info2 the guest-physical address.
    package var isNestedPageFault: Bool {
        (isa == .vmx && reasonNumber == KVMExitReasons.vmxEPTViolation) || (isa == .svm && reasonNumber == KVMExitReasons.svmNPF)
    }
}

package struct KVMEntryEvent: Sendable, Hashable {
    package var vcpu: UInt32
    package var rip: UInt64?
    package var intrInfo: UInt32?
    package var errorCode: UInt32?
    package var immediateExit: Bool
}

/// kvm_page_fault: a guest-physical fault KVM handles (on VMX from an EPT violation, on SVM an NPF).
package struct KVMPageFaultEvent: Sendable, Hashable {
    package var vcpu: UInt32?
    package var rip: UInt64?
    package var address: UInt64
    package var errorCode: UInt64
}

package struct KVMMMIOEvent: Sendable, Hashable {
    package enum Kind: String, Sendable, Hashable { case unsatisfiedRead = "unsatisfied-read", read, write }
    package var kind: Kind
    package var length: UInt32
    package var gpa: UInt64
    package var value: UInt64
}

package struct KVMUserspaceExitEvent: Sendable, Hashable {
    /// "KVM_EXIT_IO", "restart", "error", or a number the kernel printed for a reason it has no name for.
    package var reasonName: String
    /// The number in parentheses: the KVM_EXIT_* reason, or the errno for "restart"/"error".
    package var number: Int64
    /// The KVM_EXIT_* number, when the exit reached user space (not "restart"/"error").
    package var kvmExitReason: UInt32? { reasonName == "restart" || reasonName == "error" ? nil : UInt32(truncatingIfNeeded: number) }
}

package struct KVMPIOEvent: Sendable, Hashable {
    package var write: Bool
    package var port: UInt32
    package var size: UInt32
    package var count: UInt32
    package var value: UInt32?
}

/// kvm_emulate_insn: an instruction KVM's emulator ran (on this machine's PVM KVM, the only event
/// that carries the guest's rip).
package struct KVMEmulateInsnEvent: Sendable, Hashable {
    package var csBase: UInt64
    package var rip: UInt64
    package var bytes: [UInt8]
    /// "prot64", "real", ... (absent in trace-cmd's own kvm plugin output).
    package var mode: String?
    package var failed: Bool
}

package struct KVMInjExceptionEvent: Sendable, Hashable {
    package var vector: UInt32
    package var errorCode: UInt64?
    package var reinjected: Bool
}

package enum KernelEvent: Sendable, Hashable {
    case exit(KVMExitEvent)
    case entry(KVMEntryEvent)
    case pageFault(KVMPageFaultEvent)
    case mmio(KVMMMIOEvent)
    case userspaceExit(KVMUserspaceExitEvent)
    case pio(KVMPIOEvent)
    case emulateInsn(KVMEmulateInsnEvent)
    case injException(KVMInjExceptionEvent)

    /// The tracepoint names this parser reads.
    package static let names: [String] = ["kvm_exit", "kvm_entry", "kvm_page_fault", "kvm_mmio", "kvm_userspace_exit",
                                         "kvm_pio", "kvm_emulate_insn", "kvm_inj_exception"]
}

/// One event line.
package struct KernelTraceEvent: Sendable, Hashable {
    /// 1-based line number in the input.
    package var line: Int
    package var task: String
    package var pid: Int32
    package var cpu: UInt32
    /// The timestamp as printed, in nanoseconds (microsecond resolution from tracefs and trace-cmd's default).
    package var timestamp: UInt64
    package var dialect: KernelTraceDialect
    /// The instance buffer `trace-cmd report` names before the task, if any.
    package var buffer: String?
    package var name: String
    package var event: KernelEvent
}

package struct KernelTraceError: Error, Sendable, Hashable, CustomStringConvertible {
    package var line: Int
    package var message: String
    package var text: String
    package init(line: Int, _ message: String, text: String) { self.line = line; self.message = message; self.text = text }
    package var description: String { "kernel trace: line \(line): \(message)\n  \(text)" }
}

/// Parses lines one by one (O(1) memory). Unknown event names (not in KernelEvent.names): with the
/// default `.skip` policy each is skipped and counted in `skipped` (a trace of `kvm/*` holds many,
/// kvm_fpu, kvm_msr, ...); with `.error` the first is an error with its line number. Malformed
/// fields of a known event, a line that is not an event, and a timestamp before the previous line's
/// are always errors.
package struct KernelTraceParser: Sendable {
    package enum UnknownEvents: Sendable { case skip, error }
    package let unknownEvents: UnknownEvents
    package private(set) var lineNumber = 0
    package private(set) var skipped: [String: Int] = [:]
    /// Events the kernel reported lost ("[LOST n EVENTS]", "n EVENTS DROPPED").
    package private(set) var lost: UInt64 = 0
    package private(set) var events = 0
    var lastTimestamp: UInt64 = 0

    package init(unknownEvents: UnknownEvents = .skip) { self.unknownEvents = unknownEvents }

    package var skippedTotal: Int { skipped.values.reduce(0, +) }

    /// Parses the next line of the input (without or with its newline). nil: a header, comment,
    /// blank or lost-events line, or an unknown event skipped.
    package mutating func parse(_ raw: Substring) throws(KernelTraceError) -> KernelTraceEvent? {
        lineNumber += 1
        var line = raw
        while let l = line.last, l == "\n" || l == "\r" { line.removeLast() }
        let text = String(line)
        func fail(_ m: String) -> KernelTraceError { KernelTraceError(line: lineNumber, m, text: text) }
        let trimmed = line.drop { $0 == " " || $0 == "\t" }
        if trimmed.isEmpty || trimmed.hasPrefix("#") { return nil }
        // Header and bookkeeping lines of trace-cmd and tracefs.
        if trimmed.hasPrefix("cpus=") || trimmed.hasPrefix("version = ") || trimmed.hasPrefix("CPU ") && trimmed.hasSuffix(" is empty") {
            return nil
        }
        if let n = lostCount(trimmed) { lost += n; return nil }

        guard let (cpuStart, cpuEnd, cpu) = findCPU(line) else { throw fail("not an event line: no [CPU] field") }
        var left = line[line.startIndex..<cpuStart].drop { $0 == " " || $0 == "\t" }
        while let l = left.last, l == " " || l == "\t" { left.removeLast() }
        // trace-cmd report of an instance: "BUFFER: task-pid".
        var buffer: String?
        if let colon = left.firstIndex(of: ":"), left.index(after: colon) < left.endIndex, left[left.index(after: colon)] == " ",
           !left[..<colon].contains(" ") {
            buffer = String(left[..<colon])
            left = left[left.index(after: colon)...].drop { $0 == " " }
        }
        // tracefs record-tgid column: "task-pid (tgid)".
        if left.last == ")", let open = left.lastIndex(of: "(") {
            left = left[..<open]
            while let l = left.last, l == " " { left.removeLast() }
        }
        var task: String
        var pid: Int32
        var perfStyle = false
        if let dash = left.lastIndex(of: "-"), let p = Int32(left[left.index(after: dash)...]), !left[left.index(after: dash)...].isEmpty {
            task = String(left[..<dash]); pid = p
        } else if let sp = left.lastIndex(where: { $0 == " " || $0 == "\t" }) {
            var pidText = left[left.index(after: sp)...]
            if let slash = pidText.firstIndex(of: "/") { pidText = pidText[pidText.index(after: slash)...] } // PID/TID: the thread
            guard let p = Int32(pidText) else { throw fail("no task-PID or task PID before the CPU field") }
            task = String(left[..<sp]).trimmingSpaces(); pid = p; perfStyle = true
        } else {
            throw fail("no task-PID or task PID before the CPU field")
        }
        if task.isEmpty { task = "?" }
        _ = cpuEnd
        var rest = line[cpuEnd...]
        // Optional flags column, then the timestamp token "SECS.FRAC:".
        var tok = nextToken(&rest)
        var flagsSeen = false
        if let t = tok, !t.hasSuffix(":"), t.first?.isNumber != true || t.contains(where: { !$0.isNumber && $0 != "." }) {
            flagsSeen = true
            tok = nextToken(&rest)
        }
        guard let tsTok = tok, tsTok.hasSuffix(":") else { throw fail("no timestamp (SECS.FRAC:) after the CPU field") }
        guard let ts = parseTimestamp(tsTok.dropLast()) else { throw fail("malformed timestamp \"\(tsTok)\"") }
        // perf may print a sample period before the event; the event token ends with ':'.
        var evTok = nextToken(&rest)
        while let t = evTok, !t.hasSuffix(":"), t.allSatisfy(\.isNumber) { evTok = nextToken(&rest) }
        guard let ev = evTok, ev.hasSuffix(":"), ev.count > 1 else { throw fail("no event name after the timestamp") }
        var name = ev.dropLast()
        var hadSubsystem = false
        if let c = name.firstIndex(of: ":") { name = name[name.index(after: c)...]; hadSubsystem = true }
        let fields = rest.drop { $0 == " " || $0 == "\t" }
        guard ts >= lastTimestamp else {
            throw fail("timestamp \(formatNs(ts)) is before the previous event's \(formatNs(lastTimestamp))")
        }
        lastTimestamp = ts
        let dialect: KernelTraceDialect = perfStyle || hadSubsystem ? .perf : flagsSeen ? .tracefs : .traceCmd
        let nameS = String(name)
        guard KernelEvent.names.contains(nameS) else {
            if unknownEvents == .error { throw fail("unknown event \(nameS) (this parser reads \(KernelEvent.names.joined(separator: ", ")))") }
            skipped[nameS, default: 0] += 1
            return nil
        }
        let event: KernelEvent
        do throws(FieldError) {
            event = try KernelEventFields.parse(name: nameS, fields)
        } catch {
            throw fail("\(nameS): \(error.message)")
        }
        events += 1
        return KernelTraceEvent(line: lineNumber, task: task, pid: pid, cpu: cpu, timestamp: ts, dialect: dialect,
                                buffer: buffer, name: nameS, event: event)
    }

    /// "CPU:1 [LOST 123 EVENTS]" (tracefs) or "CPU:1 [123 EVENTS DROPPED]" (trace-cmd).
    func lostCount(_ s: Substring) -> UInt64? {
        guard s.hasPrefix("CPU:"), s.hasSuffix("]"), s.contains("EVENTS") else { return nil }
        for w in s.split(separator: " ") { if let n = UInt64(w.filter(\.isNumber)), !w.contains(":") { return n } }
        return nil
    }

    /// The first "[digits]" preceded by a blank: (start of '[', index after ']', cpu).
    func findCPU(_ s: Substring) -> (Substring.Index, Substring.Index, UInt32)? {
        var i = s.startIndex
        while i < s.endIndex {
            if s[i] == "[", i == s.startIndex || s[s.index(before: i)] == " " || s[s.index(before: i)] == "\t" {
                var j = s.index(after: i)
                let digitsStart = j
                while j < s.endIndex, s[j].isNumber { j = s.index(after: j) }
                if j > digitsStart, j < s.endIndex, s[j] == "]", let cpu = UInt32(s[digitsStart..<j]) {
                    return (i, s.index(after: j), cpu)
                }
            }
            i = s.index(after: i)
        }
        return nil
    }

    func nextToken(_ s: inout Substring) -> Substring? {
        s = s.drop { $0 == " " || $0 == "\t" }
        guard !s.isEmpty else { return nil }
        let end = s.firstIndex { $0 == " " || $0 == "\t" } ?? s.endIndex
        let t = s[s.startIndex..<end]
        s = s[end...]
        return t
    }

    /// "4867.782157" -> 4867782157000 ns; an integer (a counter clock) is taken as nanoseconds.
    func parseTimestamp(_ t: Substring) -> UInt64? {
        let parts = t.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count <= 2, let secs = UInt64(parts[0]) else { return nil }
        if parts.count == 1 { return secs }
        let frac = parts[1]
        guard !frac.isEmpty, frac.count <= 9, let f = UInt64(frac) else { return nil }
        var scale: UInt64 = 1
        for _ in frac.count..<9 { scale *= 10 }
        let (a, o1) = secs.multipliedReportingOverflow(by: 1_000_000_000)
        let (b, o2) = a.addingReportingOverflow(f * scale)
        return o1 || o2 ? nil : b
    }
}

func formatNs(_ ns: UInt64) -> String {
    let frac = String(ns % 1_000_000_000)
    return "\(ns / 1_000_000_000).\(String(repeating: "0", count: 9 - frac.count))\(frac) s"
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self).drop { $0 == " " || $0 == "\t" }
        while let l = s.last, l == " " || l == "\t" { s.removeLast() }
        return String(s)
    }
}
