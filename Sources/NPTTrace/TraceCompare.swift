// What a replay needs besides the reader: a readable form of every record, the window of records
// before a divergence, and the divergence report itself.

extension TraceExit: CustomStringConvertible {
    public var description: String {
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
    public var description: String {
        "cpl \(cpl) rip \(hex(rip)) rflags \(hex(rflags)) rax \(hex(gpr[0])) rsp \(hex(gpr[4])) cr0 \(hex(cr0)) cr3 \(hex(cr3)) cr4 \(hex(cr4)) efer \(hex(efer))"
    }
}

extension TraceRecord: CustomStringConvertible {
    public var description: String {
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
        }
    }
}

/// "R|W|Xs|Xu" for NPT_PERM_* bits (EPT bits 0, 1, 2, 10).
public func permsText(_ p: UInt64) -> String {
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
public struct TraceContextWindow: Sendable {
    public let capacity: Int
    var ring: [TraceEvent] = []
    var next = 0
    public init(capacity: Int = 8) { self.capacity = max(1, capacity) }
    public mutating func push(_ e: TraceEvent) {
        if ring.count < capacity { ring.append(e) } else { ring[next] = e }
        next = (next + 1) % capacity
    }
    public var events: [TraceEvent] {
        ring.count < capacity ? ring : Array(ring[next...] + ring[..<next])
    }
}

/// The first place where a replayed run decided differently from the recorded one.
public struct TraceDivergence: Error, Sendable, CustomStringConvertible {
    /// The recorded decision's event (its index is "the event number").
    public var recorded: TraceEvent?
    /// What the core decided now (nil: it decided nothing where the trace has a decision).
    public var replayed: TraceRecord?
    /// The events before it, oldest first.
    public var context: [TraceEvent]
    public init(recorded: TraceEvent?, replayed: TraceRecord?, context: [TraceEvent]) {
        self.recorded = recorded; self.replayed = replayed; self.context = context
    }
    public var description: String {
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
public struct DecisionChecker: Sendable {
    public private(set) var window: TraceContextWindow
    public private(set) var compared: UInt64 = 0
    public init(context: Int = 8) { window = TraceContextWindow(capacity: context) }
    public mutating func observe(_ e: TraceEvent) { window.push(e) }
    public mutating func check(recorded: TraceEvent?, replayed: TraceRecord?) -> TraceDivergence? {
        compared += 1
        if let r = recorded, let now = replayed, r.record == now {
            window.push(r)
            return nil
        }
        return TraceDivergence(recorded: recorded, replayed: replayed, context: window.events)
    }
}
