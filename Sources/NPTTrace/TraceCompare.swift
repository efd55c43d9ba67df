// What a replay needs besides the reader: a readable form of every record, the window of records
// before a divergence, and the divergence report itself.

extension TraceExit: CustomStringConvertible {
    package var description: String {
        var s = "\(reason) rip \(hex(rip)) cpl \(cpl) hierarchy \(hierarchy == 0 ? "supervisor" : hierarchy == 1 ? "user" : String(hierarchy))"
        if gpa != 0 || reason == .eptViolation || reason == .mbecViolation { s += " gpa \(hex(gpa))" }
        if gva != 0 { s += " gva \(hex(gva))" }
        if qualification != 0 { s += " qualification \(hex(qualification))" }
        if vector != 0 || reason == .guestFault { s += " vector \(vector)" }
        if reason == .io || ioPort != 0 { s += " port \(hex(UInt64(ioPort))) value \(hex(ioValue))" }
        return s
    }
}

extension TraceRegs: CustomStringConvertible {
    package var description: String {
        "cpl \(cpl) rip \(hex(rip)) rflags \(hex(rflags)) rax \(hex(gpr[0])) rsp \(hex(gpr[4])) cr0 \(hex(cr0)) cr3 \(hex(cr3)) cr4 \(hex(cr4)) efer \(hex(efer))"
    }
}

extension TraceRecord: CustomStringConvertible {
    package var description: String {
        func bytes(_ d: [UInt8]) -> String { "\(d.count) bytes" }
        switch self {
        case .meta(let k, let v): return "meta \(k) = \(v)"
        case .end(let n): return "end (\(n) records)"
        case .vmCreate(let c):
            return "vm-create backend \(c.backend) mode \(c.mbecMode) ram \(hex(c.ramSize)) default-perms \(hex(c.defaultPerms)) max-steps \(c.maxStepsPerRun)"
        case .vmDestroy: return "vm-destroy"
        case .vcpuCreate(let v): return "vcpu-create \(v)"
        case .vcpuDestroy(let v): return "vcpu-destroy \(v)"
        case .policySet(let gpa, let size, let ps, let perms):
            return "policy-set gpa \(hex(gpa)) size \(hex(size)) page \(hex(ps)) perms \(permsText(perms))"
        case .memoryWrite(let gpa, let d): return "memory-write gpa \(hex(gpa)) \(bytes(d))"
        case .memoryRead(let gpa, let d): return "memory-read gpa \(hex(gpa)) \(bytes(d))"
        case .exit(let v, let e): return "exit vcpu \(v): \(e)"
        case .regsRead(let v, let r): return "regs-read vcpu \(v): \(r)"
        case .regsWritten(let v, let r): return "regs-written vcpu \(v): \(r)"
        case .hostPMemRegion(let h):
            return "host-pmem index \(h.index) id \(h.id) base \(hex(h.base)) length \(hex(h.length)) controllers \(h.controllerCount) needs-wpq-flush \(h.needsWPQFlush) targets \(h.targets.map { "\($0.controller):\(hex($0.address))" }.joined(separator: ","))"
        case .status(let k, let st): return "status of the last kind-\(hex(UInt64(k))) call: \(st)"
        case .hierarchy(let v, let h): return "hierarchy vcpu \(v): \(h == 0 ? "supervisor" : h == 1 ? "user" : String(h))"
        case .exitControls(let v, let c):
            return "exit-controls vcpu \(v): \(hex(UInt64(c)))\(c & 1 != 0 ? " escalation" : "")\(c & 2 != 0 ? " return" : "")"
        case .invalidate(let h, let gpa, let size): return "invalidate hierarchy \(h) gpa \(hex(gpa)) size \(hex(size))"
        case .injectFault(let v, let vec, let code, let addr):
            return "inject-fault vcpu \(v): vector \(vec) error-code \(hex(code)) address \(hex(addr))"
        case .kick(let v): return "kick vcpu \(v)"
        case .decision(let v, let a, let e): return "decision vcpu \(v): \(a), exit \(e)"
        case .privileged(let v, let step, let gpa, let len):
            return "privileged vcpu \(v): \(step)\(gpa != 0 || len != 0 ? " gpa \(hex(gpa)) length \(hex(len))" : "")"
        case .defineRegion(let gpa, let size, let off, let c):
            return "define-region gpa \(hex(gpa)) size \(hex(size)) host-offset \(hex(off)) contents \(bytes(c))"
        case .attachPMem(let gpa, let size, let region, let roff, let hoff):
            return "attach-pmem gpa \(hex(gpa)) size \(hex(size)) region \(region) region-offset \(hex(roff)) host-offset \(hex(hoff))"
        case .flushHintPage(let gpa, let off, let trapped):
            return "flush-hint-page gpa \(hex(gpa)) host-offset \(hex(off)) \(trapped ? "trapped" : "untrapped")"
        case .physicalFlush(let r, let c, let a): return "physical-flush region \(r) controller \(c) address \(hex(a))"
        case .fence(let v): return "fence vcpu \(v)"
        case .trappedWriteCompleted(let v): return "trapped-write-completed vcpu \(v)"
        case .memoryDigest(let gpa, let len, let crc): return "memory-write gpa \(hex(gpa)) \(len) bytes crc32c \(hex(UInt64(crc)))"
        case .powerFailure: return "power-failure"
        case .note(let k, let vs): return "note \(k): \(vs.map(String.init).joined(separator: " "))"
        case .vmSelect(let vm): return "vm-select \(vm)"
        case .backendInfo(let b):
            return "backend \(b.name): capabilities \(hex(b.capabilities)) guest-isa \(b.guestISA) abi \(hex(UInt64(b.abiVersion))) \"\(b.description)\""
        case .backendStats(let v, let st):
            return "backend-stats \(scopeText(v)): \(st.map { "\($0.name)=\($0.value)" }.joined(separator: " "))"
        case .untrappedWrites(let n): return "untrapped-flush-hint-writes \(n)"
        case .hostPMemCount(let n): return "host-pmem-count \(n)"
        case .failure(let v, let k, let st, let m):
            return "failure \(scopeText(v)) of the last kind-\(hex(UInt64(k))) call: status \(st): \(m)"
        case .privilegedEnter(let v, let gpa, let size, let rip):
            return "privileged-enter vcpu \(v): region gpa \(hex(gpa)) size \(hex(size)) entry rip \(hex(rip))"
        case .lockTurn(let v, let site, let value):
            return "lock-turn \(v.map { "vcpu \($0)" } ?? "vmm"): \(site)\(value != 0 ? " value \(value)" : "")"
        }
    }
}

func scopeText(_ v: UInt32?) -> String { v.map { "vcpu \($0)" } ?? "vm" }

/// "R|W|Xs|Xu" for NPT_PERM_* bits (EPT bits 0, 1, 2, 10).
package func permsText(_ p: UInt64) -> String {
    var parts: [String] = []
    if p & 1 != 0 { parts.append("R") }
    if p & 2 != 0 { parts.append("W") }
    if p & 4 != 0 { parts.append("Xs") }
    if p & (1 << 10) != 0 { parts.append("Xu") }
    let other = p & ~UInt64(0x407)
    if other != 0 { parts.append(hex(other)) }
    return parts.isEmpty ? "-" : parts.joined(separator: "|")
}

/// The last `capacity` events, oldest first: the context printed before a divergence.
package struct TraceContextWindow: Sendable {
    package let capacity: Int
    var ring: [TraceEvent] = []
    var next = 0
    package init(capacity: Int = 8) { self.capacity = max(1, capacity) }
    package mutating func push(_ e: TraceEvent) {
        if ring.count < capacity { ring.append(e) } else { ring[next] = e }
        next = (next + 1) % capacity
    }
    package var events: [TraceEvent] {
        ring.count < capacity ? ring : Array(ring[next...] + ring[..<next])
    }
}

/// The first place where a replayed run decided differently from the recorded one.
package struct TraceDivergence: Error, Sendable, CustomStringConvertible {
    /// The recorded decision's event (its index is "the event number").
    package var recorded: TraceEvent?
    /// What the core decided now (nil: it decided nothing where the trace has a decision).
    package var replayed: TraceRecord?
    /// The events before it, oldest first.
    package var context: [TraceEvent]
    package init(recorded: TraceEvent?, replayed: TraceRecord?, context: [TraceEvent]) {
        self.recorded = recorded; self.replayed = replayed; self.context = context
    }
    package var description: String {
        var s = "replay diverged at event \(recorded.map { String($0.index) } ?? "end")"
        if let r = recorded { s += " (byte offset \(r.offset), \(r.timestamp) ns)" }
        s += "\n  recorded: \(recorded.map { $0.record.description } ?? "nothing (the trace ends)")"
        s += "\n  replayed: \(replayed.map { $0.description } ?? "nothing")"
        if !context.isEmpty {
            s += "\n  before it:"
            for e in context { s += "\n    #\(e.index) \(e.record)" }
        }
        return s
    }
}

/// Compares the core's decisions, one by one, with the recorded ones. The replay plugin pushes
/// every recorded event it feeds (`observe`), and for each decision the core takes now asks
/// `check(recorded:replayed:)`: nil when they are equal, else the divergence with its context.
package struct DecisionChecker: Sendable {
    package private(set) var window: TraceContextWindow
    package private(set) var compared: UInt64 = 0
    package init(context: Int = 8) { window = TraceContextWindow(capacity: context) }
    package mutating func observe(_ e: TraceEvent) { window.push(e) }
    package mutating func check(recorded: TraceEvent?, replayed: TraceRecord?) -> TraceDivergence? {
        compared += 1
        if let r = recorded, let now = replayed, r.record == now {
            window.push(r)
            return nil
        }
        return TraceDivergence(recorded: recorded, replayed: replayed, context: window.events)
    }
}

extension TraceRecord {
    /// The fields in which `other` differs from this record, each as "NAME recorded-value ->
    /// other-value" (registers by their x86 names: "rbx 0x2 -> 0x3"), in declaration order; a
    /// record of another kind differs in its "kind". Empty when the two are equal. For the
    /// divergence report: it names what the core decided differently, not only that it did.
    package func differingFields(_ other: TraceRecord) -> [String] {
        guard kind == other.kind else { return ["kind \(TraceRecord.kindName(self)) -> \(TraceRecord.kindName(other))"] }
        var out: [String] = []
        TraceRecord.diff(Mirror(reflecting: self).children.first?.value ?? (), Mirror(reflecting: other).children.first?.value ?? (),
                         path: "", into: &out)
        return out
    }

    static func kindName(_ r: TraceRecord) -> String { String(r.description.prefix { $0 != " " && $0 != ":" }) }

    static let gprNames = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]

    /// Walks two values of the same type field by field (Mirror); a leaf that differs is appended.
    /// Leaves: numbers, strings, flags, enums, optionals, raw-value wrappers (an exit's reason) and
    /// byte arrays (contents, memory read). A struct's fields are named under its field ("exit.rip"),
    /// an unlabelled payload's directly ("rbx" of regs-written).
    static func diff(_ a: Any, _ b: Any, path: String, into out: inout [String]) {
        let ma = Mirror(reflecting: a), mb = Mirror(reflecting: b)
        if ma.children.isEmpty || a is [UInt8] || ma.displayStyle == .enum || ma.displayStyle == .optional
            || ma.children.count != mb.children.count || (ma.children.count == 1 && ma.children.first?.label == "rawValue") {
            let x = leafText(a), y = leafText(b)
            if x != y { out.append("\(path.isEmpty ? "value" : path) \(x) -> \(y)") }
            return
        }
        for (k, (ca, cb)) in zip(ma.children, mb.children).enumerated() {
            let name: String
            if ma.displayStyle == .collection { name = path == "gpr" && k < gprNames.count ? gprNames[k] : "\(path)[\(k)]" }
            else if let l = ca.label, !l.hasPrefix(".") { name = path.isEmpty ? l : "\(path).\(l)" }
            else { name = path }
            diff(ca.value, cb.value, path: name, into: &out)
        }
    }

    static func leafText(_ v: Any) -> String {
        switch v {
        case let b as [UInt8]: return "\(b.count) bytes crc32c \(hex(UInt64(b.withUnsafeBytes { CRC32C.update(0, $0) })))"
        case let i as UInt64: return hex(i)
        case let i as UInt32: return hex(UInt64(i))
        case let i as Int32: return String(i)
        default:
            let m = Mirror(reflecting: v)
            if m.displayStyle == .optional { return m.children.first.map { leafText($0.value) } ?? "none" }
            return String(describing: v)
        }
    }
}
