// Record payloads: how each TraceRecord is encoded (docs/trace-format.md, "Record kinds").

/// The exit fields the last exit or decision record left, which the next one encodes against
/// (reset at every block start, so a block decodes on its own).
struct ExitState {
    var last = TraceExit()
}

/// Exit field bits of the presence mask, in encoding order; the fields that change most often
/// come first, so the mask of a usual exit fits one varint byte.
enum ExitField {
    static let rip: UInt64 = 1 << 0, gpa: UInt64 = 1 << 1, qualification: UInt64 = 1 << 2, cpl: UInt64 = 1 << 3
    static let hierarchy: UInt64 = 1 << 4, gva: UInt64 = 1 << 5, ioValue: UInt64 = 1 << 6, ioPort: UInt64 = 1 << 7
    static let vector: UInt64 = 1 << 8
    static let all: UInt64 = (1 << 9) - 1
}

enum TraceCodec {
    /// The `parts` bits of an exit-path record (RecordKind.exitPath).
    enum ExitPathPart {
        static let hierarchy: UInt8 = 1, exitControls: UInt8 = 2, decisionExit: UInt8 = 4
        static let all: UInt8 = 7
    }

    /// An exit-path record's body as the records it stands for, in order: exit, hierarchy (if
    /// any), exit controls (if any), decision.
    static func decodeExitPath(_ d: inout ByteDecoder, _ st: inout ExitState, into out: inout [TraceRecord]) throws(TraceError) {
        let v = try d.u32v()
        let parts = try d.u8()
        guard parts & ~ExitPathPart.all == 0 else { throw d.fail("unknown exit-path part bits \(hex(UInt64(parts & ~ExitPathPart.all)))") }
        let exit = try decodeExit(&d, &st)
        out.append(.exit(vcpu: v, exit))
        if parts & ExitPathPart.hierarchy != 0 { out.append(.hierarchy(vcpu: v, hierarchy: try d.u32v())) }
        if parts & ExitPathPart.exitControls != 0 { out.append(.exitControls(vcpu: v, controls: try d.u32v())) }
        let a = try d.u8()
        guard let action = TraceAction(rawValue: a) else { throw d.fail("unknown action \(a)") }
        let decided = parts & ExitPathPart.decisionExit != 0 ? try decodeExit(&d, &st) : exit
        out.append(.decision(vcpu: v, action: action, exit: decided))
    }

    static func delta(_ new: UInt64, _ old: UInt64) -> Int64 { Int64(bitPattern: new &- old) }

    static func encodeExit(_ e: TraceExit, _ enc: inout BlockBuffer, _ st: inout ExitState) {
        let p = st.last
        var mask: UInt64 = 0
        if e.gpa != p.gpa { mask |= ExitField.gpa }
        if e.gva != p.gva { mask |= ExitField.gva }
        if e.qualification != p.qualification { mask |= ExitField.qualification }
        if e.vector != p.vector { mask |= ExitField.vector }
        if e.cpl != p.cpl { mask |= ExitField.cpl }
        if e.hierarchy != p.hierarchy { mask |= ExitField.hierarchy }
        if e.ioPort != p.ioPort { mask |= ExitField.ioPort }
        if e.ioValue != p.ioValue { mask |= ExitField.ioValue }
        if e.rip != p.rip { mask |= ExitField.rip }
        enc.varint(UInt64(e.reason.rawValue))
        enc.varint(mask)
        if mask & ExitField.rip != 0 { enc.signed(delta(e.rip, p.rip)) }
        if mask & ExitField.gpa != 0 { enc.signed(delta(e.gpa, p.gpa)) }
        if mask & ExitField.qualification != 0 { enc.varint(e.qualification) }
        if mask & ExitField.cpl != 0 { enc.varint(UInt64(e.cpl)) }
        if mask & ExitField.hierarchy != 0 { enc.varint(UInt64(e.hierarchy)) }
        if mask & ExitField.gva != 0 { enc.signed(delta(e.gva, p.gva)) }
        if mask & ExitField.ioValue != 0 { enc.varint(e.ioValue) }
        if mask & ExitField.ioPort != 0 { enc.varint(UInt64(e.ioPort)) }
        if mask & ExitField.vector != 0 { enc.varint(UInt64(e.vector)) }
        st.last = e
    }

    static func decodeExit(_ d: inout ByteDecoder, _ st: inout ExitState) throws(TraceError) -> TraceExit {
        var e = st.last
        e.reason = TraceExitReason(rawValue: try d.u32v())
        let mask = try d.varint()
        guard mask & ~ExitField.all == 0 else { throw d.fail("unknown exit field bits \(hex(mask & ~ExitField.all))") }
        if mask & ExitField.rip != 0 { e.rip = e.rip &+ UInt64(bitPattern: try d.signed()) }
        if mask & ExitField.gpa != 0 { e.gpa = e.gpa &+ UInt64(bitPattern: try d.signed()) }
        if mask & ExitField.qualification != 0 { e.qualification = try d.varint() }
        if mask & ExitField.cpl != 0 { e.cpl = try d.u32v() }
        if mask & ExitField.hierarchy != 0 { e.hierarchy = try d.u32v() }
        if mask & ExitField.gva != 0 { e.gva = e.gva &+ UInt64(bitPattern: try d.signed()) }
        if mask & ExitField.ioValue != 0 { e.ioValue = try d.varint() }
        if mask & ExitField.ioPort != 0 { e.ioPort = try d.u32v() }
        if mask & ExitField.vector != 0 { e.vector = try d.u32v() }
        st.last = e
        return e
    }

    static func encodeRegs(_ r: TraceRegs, _ enc: inout BlockBuffer) {
        var mask: UInt64 = 0
        for i in 0..<TraceRegs.fieldCount where r.field(i) != 0 { mask |= 1 << UInt64(i) }
        enc.varint(mask)
        for i in 0..<TraceRegs.fieldCount where mask & (1 << UInt64(i)) != 0 { enc.varint(r.field(i)) }
    }

    static func decodeRegs(_ d: inout ByteDecoder) throws(TraceError) -> TraceRegs {
        let mask = try d.varint()
        guard mask >> UInt64(TraceRegs.fieldCount) == 0 else { throw d.fail("unknown register bits \(hex(mask))") }
        var r = TraceRegs()
        for i in 0..<TraceRegs.fieldCount where mask & (1 << UInt64(i)) != 0 { r.setField(i, try d.varint()) }
        guard r.gpr.count == 16 else { throw d.fail("register file") }
        return r
    }

    /// Encodes the payload of `r` (the frame is the writer's).
    static func encode(_ r: TraceRecord, _ enc: inout BlockBuffer, _ st: inout ExitState) {
        switch r {
        case .meta(let k, let v): enc.string(k); enc.string(v)
        case .end(let n): enc.varint(n)
        case .vmCreate(let c):
            enc.varint(UInt64(c.mbecMode)); enc.varint(c.ramSize); enc.varint(c.defaultPerms)
            enc.varint(c.maxStepsPerRun); enc.string(c.backend)
        case .vmDestroy: break
        case .vcpuCreate(let v), .vcpuDestroy(let v), .kick(let v), .fence(let v), .trappedWriteCompleted(let v):
            enc.varint(UInt64(v))
        case .policySet(let gpa, let size, let ps, let perms):
            enc.varint(gpa); enc.varint(size); enc.varint(ps); enc.varint(perms)
        case .memoryWrite(let gpa, let data), .memoryRead(let gpa, let data):
            enc.varint(gpa); enc.data(data)
        case .exit(let v, let e):
            enc.varint(UInt64(v)); encodeExit(e, &enc, &st)
        case .regsRead(let v, let regs), .regsWritten(let v, let regs):
            enc.varint(UInt64(v)); encodeRegs(regs, &enc)
        case .hostPMemRegion(let h):
            enc.varint(UInt64(h.index)); enc.varint(UInt64(h.id)); enc.varint(h.base); enc.varint(h.length)
            enc.varint(UInt64(h.controllerCount)); enc.u8(h.needsWPQFlush ? 1 : 0); enc.varint(UInt64(h.targets.count))
            for t in h.targets { enc.varint(UInt64(t.controller)); enc.varint(t.address) }
        case .status(let kind, let status):
            enc.u8(kind); enc.signed(Int64(status))
        case .hierarchy(let v, let h):
            enc.varint(UInt64(v)); enc.varint(UInt64(h))
        case .exitControls(let v, let c):
            enc.varint(UInt64(v)); enc.varint(UInt64(c))
        case .invalidate(let h, let gpa, let size):
            enc.varint(UInt64(h)); enc.varint(gpa); enc.varint(size)
        case .injectFault(let v, let vector, let code, let address):
            enc.varint(UInt64(v)); enc.varint(UInt64(vector)); enc.varint(code); enc.varint(address)
        case .decision(let v, let action, let e):
            enc.varint(UInt64(v)); enc.u8(action.rawValue); encodeExit(e, &enc, &st)
        case .privileged(let v, let step, let gpa, let length):
            enc.varint(UInt64(v)); enc.u8(step.rawValue); enc.varint(gpa); enc.varint(length)
        case .defineRegion(let gpa, let size, let off, let contents):
            enc.varint(gpa); enc.varint(size); enc.varint(off); enc.data(contents)
        case .attachPMem(let gpa, let size, let region, let roff, let hoff):
            enc.varint(gpa); enc.varint(size); enc.varint(UInt64(region)); enc.varint(roff); enc.varint(hoff)
        case .flushHintPage(let gpa, let off, let trapped):
            enc.varint(gpa); enc.varint(off); enc.u8(trapped ? 1 : 0)
        case .physicalFlush(let region, let controller, let address):
            enc.varint(UInt64(region)); enc.varint(UInt64(controller)); enc.varint(address)
        // 1.1
        case .memoryDigest(let gpa, let length, let crc):
            enc.varint(gpa); enc.varint(length); enc.varint(UInt64(crc))
        case .powerFailure: break
        case .note(let key, let values):
            enc.string(key); enc.varint(UInt64(values.count))
            for v in values { enc.varint(v) }
        case .vmSelect(let vm): enc.varint(UInt64(vm))
        case .backendInfo(let b):
            enc.string(b.name); enc.varint(b.capabilities); enc.varint(UInt64(b.guestISA)); enc.varint(UInt64(b.abiVersion))
            enc.string(b.description)
        case .backendStats(let v, let stats):
            encodeScope(v, &enc); enc.varint(UInt64(stats.count))
            for st in stats { enc.string(st.name); enc.varint(st.value) }
        case .untrappedWrites(let n): enc.varint(n)
        case .hostPMemCount(let n): enc.varint(UInt64(n))
        case .failure(let v, let kind, let status, let message):
            encodeScope(v, &enc); enc.u8(kind); enc.signed(Int64(status)); enc.string(message)
        case .privilegedEnter(let v, let gpa, let size, let rip):
            enc.varint(UInt64(v)); enc.varint(gpa); enc.varint(size); enc.varint(rip)
        // 1.2
        case .lockTurn(let v, let site, let value):
            encodeScope(v, &enc); enc.u8(site.rawValue); enc.varint(value)
        }
    }

    /// A record's vCPU or none (the VM): 0 for none, n + 1 for vCPU n.
    static func encodeScope(_ v: UInt32?, _ enc: inout BlockBuffer) { enc.varint(v.map { UInt64($0) + 1 } ?? 0) }
    static func decodeScope(_ d: inout ByteDecoder) throws(TraceError) -> UInt32? {
        let s = try d.varint()
        guard s <= UInt64(UInt32.max) + 1 else { throw d.fail("vCPU \(s - 1) does not fit 32 bits") }
        return s == 0 ? nil : UInt32(s - 1)
    }

    static func status32(_ d: inout ByteDecoder) throws(TraceError) -> Int32 {
        let s = try d.signed()
        guard s >= Int64(Int32.min) && s <= Int64(Int32.max) else { throw d.fail("status \(s) does not fit 32 bits") }
        return Int32(s)
    }

    static func bool(_ d: inout ByteDecoder) throws(TraceError) -> Bool {
        let b = try d.u8()
        guard b <= 1 else { throw d.fail("a flag byte \(b) (0 or 1)") }
        return b == 1
    }

    /// Decodes the payload of a record of a known kind.
    static func decode(kind: UInt8, _ d: inout ByteDecoder, _ st: inout ExitState) throws(TraceError) -> TraceRecord {
        switch kind {
        case RecordKind.meta: return .meta(key: try d.string(), value: try d.string())
        case RecordKind.end: return .end(recordCount: try d.varint())
        case RecordKind.vmCreate:
            return .vmCreate(TraceVMConfig(mbecMode: try d.u32v(), ramSize: try d.varint(), defaultPerms: try d.varint(),
                                           maxStepsPerRun: try d.varint(), backend: try d.string()))
        case RecordKind.vmDestroy: return .vmDestroy
        case RecordKind.vcpuCreate: return .vcpuCreate(vcpu: try d.u32v())
        case RecordKind.vcpuDestroy: return .vcpuDestroy(vcpu: try d.u32v())
        case RecordKind.kick: return .kick(vcpu: try d.u32v())
        case RecordKind.fence: return .fence(vcpu: try d.u32v())
        case RecordKind.trappedWriteCompleted: return .trappedWriteCompleted(vcpu: try d.u32v())
        case RecordKind.policySet:
            return .policySet(gpa: try d.varint(), size: try d.varint(), pageSize: try d.varint(), perms: try d.varint())
        case RecordKind.memoryWrite: return .memoryWrite(gpa: try d.varint(), data: try d.data())
        case RecordKind.memoryRead: return .memoryRead(gpa: try d.varint(), data: try d.data())
        case RecordKind.exit:
            let v = try d.u32v()
            return .exit(vcpu: v, try decodeExit(&d, &st))
        case RecordKind.regsRead:
            let v = try d.u32v()
            return .regsRead(vcpu: v, try decodeRegs(&d))
        case RecordKind.regsWritten:
            let v = try d.u32v()
            return .regsWritten(vcpu: v, try decodeRegs(&d))
        case RecordKind.hostPMemRegion:
            let index = try d.u32v(), id = try d.u32v(), base = try d.varint(), length = try d.varint()
            let controllers = try d.u32v()
            let needs = try bool(&d)
            let n = try d.varint()
            guard n <= UInt64(d.remaining / 2) else { throw d.fail("\(n) flush targets in \(d.remaining) bytes") }
            var targets: [TraceHostPMemRegion.FlushTarget] = []
            for _ in 0..<n { targets.append(.init(controller: try d.u32v(), address: try d.varint())) }
            return .hostPMemRegion(TraceHostPMemRegion(index: index, id: id, base: base, length: length,
                                                       controllerCount: controllers, needsWPQFlush: needs, targets: targets))
        case RecordKind.status:
            let k = try d.u8()
            return .status(kind: k, status: try status32(&d))
        case RecordKind.hierarchy: return .hierarchy(vcpu: try d.u32v(), hierarchy: try d.u32v())
        case RecordKind.exitControls: return .exitControls(vcpu: try d.u32v(), controls: try d.u32v())
        case RecordKind.invalidate: return .invalidate(hierarchy: try d.u32v(), gpa: try d.varint(), size: try d.varint())
        case RecordKind.injectFault:
            return .injectFault(vcpu: try d.u32v(), vector: try d.u32v(), errorCode: try d.varint(), address: try d.varint())
        case RecordKind.decision:
            let v = try d.u32v()
            let a = try d.u8()
            guard let action = TraceAction(rawValue: a) else { throw d.fail("unknown action \(a)") }
            return .decision(vcpu: v, action: action, exit: try decodeExit(&d, &st))
        case RecordKind.privileged:
            let v = try d.u32v()
            let s = try d.u8()
            guard let step = TracePrivilegedStep(rawValue: s) else { throw d.fail("unknown privileged-mode step \(s)") }
            return .privileged(vcpu: v, step: step, gpa: try d.varint(), length: try d.varint())
        case RecordKind.defineRegion:
            return .defineRegion(gpa: try d.varint(), size: try d.varint(), hostOffset: try d.varint(), contents: try d.data())
        case RecordKind.attachPMem:
            return .attachPMem(gpa: try d.varint(), size: try d.varint(), region: try d.u32v(), regionOffset: try d.varint(),
                               hostOffset: try d.varint())
        case RecordKind.flushHintPage:
            return .flushHintPage(gpa: try d.varint(), hostOffset: try d.varint(), trapped: try bool(&d))
        case RecordKind.physicalFlush:
            return .physicalFlush(region: try d.u32v(), controller: try d.u32v(), address: try d.varint())
        default:
            return try decode11(kind: kind, &d)
        }
    }

    /// The record kinds versions 1.1 and 1.2 added.
    static func decode11(kind: UInt8, _ d: inout ByteDecoder) throws(TraceError) -> TraceRecord {
        switch kind {
        case RecordKind.memoryDigest:
            let gpa = try d.varint(), length = try d.varint(), crc = try d.varint()
            guard crc <= UInt64(UInt32.max) else { throw d.fail("CRC \(crc) does not fit 32 bits") }
            return .memoryDigest(gpa: gpa, length: length, crc: UInt32(crc))
        case RecordKind.powerFailure: return .powerFailure
        case RecordKind.note:
            let key = try d.string()
            let n = try d.varint()
            guard n <= UInt64(d.remaining) else { throw d.fail("\(n) values in \(d.remaining) bytes") }
            var values: [UInt64] = []
            for _ in 0..<n { values.append(try d.varint()) }
            return .note(key: key, values: values)
        case RecordKind.vmSelect: return .vmSelect(vm: try d.u32v())
        case RecordKind.backendInfo:
            return .backendInfo(TraceBackendInfo(name: try d.string(), capabilities: try d.varint(), guestISA: try d.u32v(),
                                                 abiVersion: try d.u32v(), description: try d.string()))
        case RecordKind.backendStats:
            let v = try decodeScope(&d)
            let n = try d.varint()
            guard n <= UInt64(d.remaining / 2) else { throw d.fail("\(n) statistics in \(d.remaining) bytes") }
            var stats: [TraceStat] = []
            for _ in 0..<n { stats.append(TraceStat(name: try d.string(), value: try d.varint())) }
            return .backendStats(vcpu: v, stats: stats)
        case RecordKind.untrappedWrites: return .untrappedWrites(count: try d.varint())
        case RecordKind.hostPMemCount: return .hostPMemCount(count: try d.u32v())
        case RecordKind.failure:
            let v = try decodeScope(&d)
            let k = try d.u8()
            return .failure(vcpu: v, kind: k, status: try status32(&d), message: try d.string())
        case RecordKind.privilegedEnter:
            return .privilegedEnter(vcpu: try d.u32v(), regionGPA: try d.varint(), regionSize: try d.varint(), entryRIP: try d.varint())
        case RecordKind.lockTurn:
            let v = try decodeScope(&d)
            let s = try d.u8()
            guard let site = TraceLockSite(rawValue: s) else { throw d.fail("unknown lock-turn site \(s)") }
            return .lockTurn(vcpu: v, site: site, value: try d.varint())
        default:
            throw d.fail("record kind \(hex(UInt64(kind))) has no decoder")
        }
    }
}

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
