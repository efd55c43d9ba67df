// The trace replay backend (libnptkit-replay.so): runs no guest code; it answers the core's calls
// with what a recorded run's backend answered (exits, registers, memory reads, host persistent
// memory, statistics, failures) and compares every decision of the core (hierarchy exposed, exit
// controls, invalidations, injected faults, register writes, NVDIMM and flush-hint definitions,
// physical flushes, fences, the answer to each exit through vcpu_exit_decided, privileged-mode
// entries and exits) with the recorded one. Where the trace has lock turns (1.2) it keeps
// NPT_CAP_PRIVILEGED_MODE and orders the core's privileged-mode lock acquisitions (vm_lock_turn,
// ABI 1.5) as recorded. The first divergence fails the call with a message naming the event, both decisions and
// the events before it (npt_last_error through the host's set_error), and every later call.
//
// Only the C ABI crosses the boundary: this module links NPTTrace (no dependency on the core) and
// CNPTKit (the header), neither libnptkit.so nor NPTCore.
import CNPTKit
import NPTTrace
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

let abiVersion: UInt32 = (UInt32(NPT_ABI_VERSION_MAJOR) << 16) | UInt32(NPT_ABI_VERSION_MINOR)
let capPrivilegedMode: UInt64 = 1 << 5 // NPT_CAP_PRIVILEGED_MODE

/// The host's table (set at load): its set_error is the error channel.
let hostAddress = Atomic<UInt>(0)
func fail(_ s: npt_status, _ message: String) -> npt_status {
    if let h = UnsafePointer<npt_host_api>(bitPattern: hostAddress.load(ordering: .acquiring)),
       h.pointee.size >= MemoryLayout<npt_host_api>.offset(of: \npt_host_api.set_error)! + MemoryLayout<UnsafeRawPointer>.size,
       let set = h.pointee.set_error {
        message.withCString { set($0) }
    }
    return s
}

final class ReplayVM {
    let session: ReplaySession
    let number: UInt32
    init(session: ReplaySession, number: UInt32) { self.session = session; self.number = number }
    static func from(_ p: UnsafeMutableRawPointer?) -> ReplayVM { Unmanaged<ReplayVM>.fromOpaque(p!).takeUnretainedValue() }

    /// A call of this VM (owner nil) or of its vCPU `owner`: the recorded answer, or the failure.
    func call(_ owner: UInt32?, _ kind: UInt8, _ what: @autoclosure () -> String,
              matches: (TraceRecord) -> Bool = { _ in true }, _ use: (TraceRecord) -> npt_status = { _ in NPT_OK }) -> npt_status {
        switch session.take(vm: number, owner: owner, kind: kind, what: what(), matches: matches).0 {
        case .record(let r): return use(r)
        case .failure(let s, let m): return fail(s, m)
        }
    }
    /// A decision: the recorded record must equal `replayed`.
    func decided(_ owner: UInt32?, _ replayed: TraceRecord) -> npt_status {
        switch session.take(vm: number, owner: owner, kind: replayed.kind, what: replayed.description,
                            matches: { $0 == replayed }, replayed: replayed).0 {
        case .record: return NPT_OK
        case .failure(let s, let m): return fail(s, m)
        }
    }
}

final class ReplayVCPU {
    let vm: ReplayVM
    let index: UInt32
    init(vm: ReplayVM, index: UInt32) { self.vm = vm; self.index = index }
    static func from(_ p: UnsafeMutableRawPointer?) -> ReplayVCPU { Unmanaged<ReplayVCPU>.fromOpaque(p!).takeUnretainedValue() }
    func decided(_ r: TraceRecord) -> npt_status { vm.decided(index, r) }
    func call(_ kind: UInt8, _ what: @autoclosure () -> String, _ use: (TraceRecord) -> npt_status) -> npt_status {
        vm.call(index, kind, what(), matches: { _ in true }, use)
    }
    /// An input of this vCPU: the recorded record of `kind` handed to `fill` (false: not its payload).
    func input(_ kind: UInt8, _ what: @autoclosure () -> String, _ fill: (TraceRecord) -> Bool) -> npt_status {
        call(kind, what()) { fill($0) ? NPT_OK : NPT_ERR_BACKEND }
    }
}

func session(_ d: UnsafeMutableRawPointer?) -> ReplaySession { Unmanaged<ReplaySession>.fromOpaque(d!).takeUnretainedValue() }

/// Statistic names are static C strings (valid while the plugin is loaded: never freed).
let internedNames = Mutex<[String: UInt]>([:])
func intern(_ s: String) -> UnsafePointer<CChar> {
    let a = internedNames.withLock { t in
        if let a = t[s] { return a }
        let a = UInt(bitPattern: strdup(s)); t[s] = a; return a
    }
    return UnsafePointer(bitPattern: a)!
}

func stats(_ r: TraceRecord, _ out: UnsafeMutablePointer<npt_backend_stat>?, _ cap: Int, _ count: UnsafeMutablePointer<Int>?) -> npt_status {
    guard case .backendStats(_, let st) = r else { return NPT_ERR_BACKEND }
    count?.pointee = st.count
    guard cap >= st.count else { return NPT_ERR_BUFFER_TOO_SMALL }
    for (i, s) in st.enumerated() { out![i] = npt_backend_stat(name: intern(s.name), value: s.value) }
    return NPT_OK
}

func makeOps(_ s: ReplaySession) -> UnsafeMutablePointer<npt_backend_ops> {
    var o = npt_backend_ops()
    (o.abi_version, o.size) = (abiVersion, UInt32(MemoryLayout<npt_backend_ops>.size))
    o.name = UnsafePointer(strdup("replay"))
    o.description = UnsafePointer(strdup("replay of '\(s.path)': a run on backend '\(s.backend.name)' (\(s.recordCount) records"
        + (s.skippedVMs.isEmpty ? "" : "; \(s.skippedVMs.count) VMs that used the privileged mode not replayed") + ")"))
    // The recorded backend's capabilities; the privileged mode only where the trace has the order
    // of the coordinator's monitor acquisitions (lock turns, trace 1.2: Session.swift).
    o.capabilities = s.hasLockTurns ? s.backend.capabilities : s.backend.capabilities & ~capPrivilegedMode
    o.guest_isa = UInt64(s.backend.guestISA)
    o.backend_data = Unmanaged.passRetained(s).toOpaque()
    o.vm_create = { d, _, c, out in
        let s = session(d)
        let cfg = c!.pointee
        let (r, vm) = s.take(vm: nil, owner: nil, kind: RecordKind.vmCreate,
                             what: "vm-create mode \(cfg.mbec_mode) ram \(hex(cfg.ram_size)) default \(permsText(cfg.default_perms)) steps \(cfg.max_steps_per_run)",
                             matches: { r in
            guard case .vmCreate(let t) = r else { return false }
            return t.mbecMode == cfg.mbec_mode && t.ramSize == cfg.ram_size && t.defaultPerms == cfg.default_perms && t.maxStepsPerRun == cfg.max_steps_per_run
        })
        if case .failure(let st, let m) = r { return fail(st, m) }
        out!.pointee = Unmanaged.passRetained(ReplayVM(session: s, number: vm)).toOpaque()
        return NPT_OK
    }
    o.vm_destroy = { d in
        let vm = Unmanaged<ReplayVM>.fromOpaque(d!)
        _ = vm.takeUnretainedValue().decided(nil, .vmDestroy)
        vm.release()
    }
    o.memory_write = { d, gpa, data, len in
        ReplayVM.from(d).decided(nil, .memoryDigest(gpa: gpa, length: UInt64(len), crc: CRC32C.update(0, UnsafeRawBufferPointer(start: data, count: len))))
    }
    o.memory_read = { d, gpa, data, len in
        ReplayVM.from(d).call(nil, RecordKind.memoryRead, "memory-read gpa \(hex(gpa)) \(len) bytes", matches: { r in
            if case .memoryRead(let g, let b) = r { return g == gpa && b.count == len } else { return false }
        }) { r in
            if case .memoryRead(_, let b) = r { b.withUnsafeBytes { data!.copyMemory(from: $0.baseAddress!, byteCount: len) } }
            return NPT_OK
        }
    }
    o.vcpu_create = { d, index, out in
        let vm = ReplayVM.from(d)
        let st = vm.decided(index, .vcpuCreate(vcpu: index))
        if st == NPT_OK { out!.pointee = Unmanaged.passRetained(ReplayVCPU(vm: vm, index: index)).toOpaque() }
        return st
    }
    o.vcpu_destroy = { d in
        let v = Unmanaged<ReplayVCPU>.fromOpaque(d!)
        _ = v.takeUnretainedValue().decided(.vcpuDestroy(vcpu: v.takeUnretainedValue().index))
        v.release()
    }
    o.vcpu_get_regs = { d, regs in
        let v = ReplayVCPU.from(d)
        return v.input(RecordKind.regsRead, "regs-read vcpu \(v.index)") { if case .regsRead(_, let t) = $0 { t.fill(regs!); return true }; return false }
    }
    o.vcpu_set_regs = { d, regs in let v = ReplayVCPU.from(d); return v.decided(.regsWritten(vcpu: v.index, TraceRegs(regs!.pointee))) }
    o.vcpu_set_hierarchy = { d, h in let v = ReplayVCPU.from(d); return v.decided(.hierarchy(vcpu: v.index, hierarchy: h)) }
    o.vcpu_set_exit_controls = { d, c in let v = ReplayVCPU.from(d); return v.decided(.exitControls(vcpu: v.index, controls: c)) }
    o.invalidate = { d, h, gpa, size in ReplayVM.from(d).decided(nil, .invalidate(hierarchy: h, gpa: gpa, size: size)) }
    o.vcpu_run = { d, e in
        let v = ReplayVCPU.from(d)
        return v.input(RecordKind.exit, "vcpu-run vcpu \(v.index)") { if case .exit(_, let x) = $0 { x.fill(e!); return true }; return false }
    }
    o.vcpu_inject_fault = { d, vector, code, address in
        let v = ReplayVCPU.from(d)
        return v.decided(.injectFault(vcpu: v.index, vector: vector, errorCode: code, address: address))
    }
    // A kick reaches no guest: the recorded exits say where the recorded run was stopped.
    o.vcpu_kick = { _ in }
    o.define_region = { d, gpa, size, host, c, len in
        ReplayVM.from(d).decided(nil, .defineRegion(gpa: gpa, size: size, hostOffset: host,
                                                    contents: Array(UnsafeRawBufferPointer(start: c, count: len))))
    }
    o.host_pmem_count = { d, count in
        switch session(d).take(vm: nil, owner: nil, kind: RecordKind.hostPMemCount, what: "host-pmem-count").0 {
        case .record(let r):
            guard case .hostPMemCount(let n) = r else { return NPT_ERR_BACKEND }
            count!.pointee = Int(n)
            return NPT_OK
        case .failure(let st, let m): return fail(st, m)
        }
    }
    o.host_pmem_get = { d, index, region, targets, cap in
        switch session(d).take(vm: nil, owner: nil, kind: RecordKind.hostPMemRegion, what: "host-pmem-get \(index)",
                               matches: { if case .hostPMemRegion(let h) = $0 { return h.index == index } else { return false } }).0 {
        case .record(let r):
            guard case .hostPMemRegion(let h) = r else { return NPT_ERR_BACKEND }
            region!.pointee.id = h.id; region!.pointee.base = h.base; region!.pointee.length = h.length
            region!.pointee.controller_count = h.controllerCount
            region!.pointee.flush_target_count = UInt32(h.targets.count)
            region!.pointee.needs_wpq_flush = h.needsWPQFlush ? 1 : 0
            for (i, t) in h.targets.prefix(cap).enumerated() { targets![i] = npt_flush_target(controller: t.controller, reserved: 0, address: t.address) }
            return NPT_OK
        case .failure(let st, let m): return fail(st, m)
        }
    }
    o.attach_pmem = { d, gpa, size, region, off, host in
        ReplayVM.from(d).decided(nil, .attachPMem(gpa: gpa, size: size, region: region, regionOffset: off, hostOffset: host))
    }
    o.define_flush_hint_page = { d, gpa, host, trapped in ReplayVM.from(d).decided(nil, .flushHintPage(gpa: gpa, hostOffset: host, trapped: trapped != 0)) }
    o.physical_flush = { d, region, controller, address in
        ReplayVM.from(d).decided(nil, .physicalFlush(region: region, controller: controller, address: address))
    }
    o.vcpu_fence = { d in let v = ReplayVCPU.from(d); return v.decided(.fence(vcpu: v.index)) }
    o.vcpu_complete_trapped_write = { d in let v = ReplayVCPU.from(d); return v.decided(.trappedWriteCompleted(vcpu: v.index)) }
    o.untrapped_flush_hint_writes = { d in
        var n: UInt64 = 0
        _ = ReplayVM.from(d).call(nil, RecordKind.untrappedWrites, "untrapped-flush-hint-writes", matches: { _ in true }) { r in
            if case .untrappedWrites(let c) = r { n = c }
            return NPT_OK
        }
        return n
    }
    o.power_failure = { d in ReplayVM.from(d).decided(nil, .powerFailure) }
    o.vm_stats = { d, out, cap, count in
        ReplayVM.from(d).call(nil, RecordKind.backendStats, "vm-stats", matches: { _ in true }) { stats($0, out, cap, count) }
    }
    o.vcpu_stats = { d, out, cap, count in
        let v = ReplayVCPU.from(d)
        return v.call(RecordKind.backendStats, "vcpu-stats vcpu \(v.index)") { stats($0, out, cap, count) }
    }
    o.vcpu_exit_decided = { d, action, e in
        let v = ReplayVCPU.from(d)
        return v.decided(.decision(vcpu: v.index, action: TraceAction(rawValue: UInt8(truncatingIfNeeded: action)) ?? .tool, exit: TraceExit(e!.pointee)))
    }
    // The privileged mode as recorded decisions: the entry (vCPU, region, entry point) and the exit.
    o.vcpu_enter_privileged = { d, e in
        let v = ReplayVCPU.from(d)
        let p = e!.pointee
        return v.decided(.privilegedEnter(vcpu: p.vcpu_index, regionGPA: p.region_gpa, regionSize: p.region_size, entryRIP: p.entry_rip))
    }
    o.vcpu_leave_privileged = { d in let v = ReplayVCPU.from(d); return v.decided(.privileged(vcpu: v.index, step: .left, gpa: 0, length: 0)) }
    if s.hasLockTurns {
        o.vm_lock_turn = { d, phase, site, vcpu, value in
            let vm = ReplayVM.from(d)
            guard site <= UInt32(UInt8.max), let site = TraceLockSite(rawValue: UInt8(site)), phase <= NPT_LOCK_TURN_TAKEN, vcpu >= -1, vcpu <= Int64(UInt32.max), let value else {
                return fail(NPT_ERR_INVALID_ARGUMENT, "replay: vm_lock_turn(phase \(phase), site \(site), vcpu \(vcpu)) is not a lock turn of ABI 1.5")
            }
            let (st, v, m) = vm.session.turn(vm: vm.number, phase: phase, site: site, vcpu: vcpu < 0 ? nil : UInt32(vcpu))
            if let m { return fail(st, m) }
            if st == NPT_OK && phase == NPT_LOCK_TURN_TAKEN { value.pointee = v }
            return st
        }
    }
    let p = UnsafeMutablePointer<npt_backend_ops>.allocate(capacity: 1)
    p.initialize(to: o)
    return p
}

/// Plugin interface 2. Arguments: trace=FILE (required), session=NAME (default: the path; loads
/// naming one session continue one pass), context=N (events printed before a divergence, default
/// 8), wait-ms=N (how long a thread waits for another to take the recorded record before it, default 5000).
@_cdecl("npt_plugin_init")
public func npt_plugin_init(_ info: UnsafePointer<npt_plugin_info>?, _ ops: UnsafeMutablePointer<UnsafePointer<npt_backend_ops>?>?) -> npt_status {
    guard let info, let ops else { return NPT_ERR_INVALID_ARGUMENT }
    let i = info.pointee
    hostAddress.store(UInt(bitPattern: i.host), ordering: .releasing)
    guard i.abi_version >> 16 == NPT_ABI_VERSION_MAJOR else {
        return fail(NPT_ERR_ABI_MISMATCH, "the replay plugin is built for ABI \(NPT_ABI_VERSION_MAJOR).\(NPT_ABI_VERSION_MINOR), the host is \(i.abi_version >> 16).\(i.abi_version & 0xFFFF)")
    }
    var trace: String?, name: String?, context = 8, waitMs: UInt64 = 5000
    for k in 0..<i.argc {
        let a = i.args[k]
        let key = String(cString: a.key), value = String(cString: a.value)
        switch key {
        case "trace": trace = value
        case "session": name = value
        case "context":
            guard let n = Int(value), n >= 0, n <= 1000 else { return fail(NPT_ERR_INVALID_ARGUMENT, "replay: context=\(value) is not 0..1000") }
            context = n
        case "wait-ms":
            guard let n = UInt64(value), n <= 3_600_000 else { return fail(NPT_ERR_INVALID_ARGUMENT, "replay: wait-ms=\(value) is not 0..3600000") }
            waitMs = n
        default:
            return fail(NPT_ERR_INVALID_ARGUMENT, "replay: unknown argument '\(key)' (trace=FILE, session=NAME, context=N, wait-ms=N)")
        }
    }
    guard let trace, !trace.isEmpty else { return fail(NPT_ERR_INVALID_ARGUMENT, "replay: no trace=FILE argument (the trace to replay)") }
    let key = name ?? trace
    let made: Result<ReplaySession, TraceError> = sessions.withLock { t in
        if let s = t[key] { return .success(s) }
        do throws(TraceError) {
            let s = try ReplaySession(path: trace, context: context, waitNanos: waitMs * 1_000_000)
            t[key] = s
            return .success(s)
        } catch { return .failure(error) }
    }
    switch made {
    case .success(let s):
        installExitCheck()
        ops.pointee = UnsafePointer(s.ops(makeOps))
        return NPT_OK
    case .failure(let e):
        return fail(NPT_ERR_INVALID_ARGUMENT, "replay: cannot replay '\(trace)': \(e)")
    }
}

extension TraceRegs {
    init(_ r: npt_regs) {
        self.init()
        cpl = r.cpl; rip = r.rip; rflags = r.rflags
        var g = r.gpr
        gpr = withUnsafeBytes(of: &g) { Array($0.bindMemory(to: UInt64.self)) }
        cr0 = r.cr0; cr2 = r.cr2; cr3 = r.cr3; cr4 = r.cr4; efer = r.efer; lstar = r.lstar; faultHandler = r.fault_handler
    }
    func fill(_ p: UnsafeMutablePointer<npt_regs>) {
        p.pointee.cpl = cpl; p.pointee.rip = rip; p.pointee.rflags = rflags
        withUnsafeMutableBytes(of: &p.pointee.gpr) { b in for k in 0..<16 { b.storeBytes(of: gpr[k], toByteOffset: k * 8, as: UInt64.self) } }
        p.pointee.cr0 = cr0; p.pointee.cr2 = cr2; p.pointee.cr3 = cr3; p.pointee.cr4 = cr4; p.pointee.efer = efer
        p.pointee.lstar = lstar; p.pointee.fault_handler = faultHandler
    }
}

extension TraceExit {
    init(_ e: npt_exit) {
        self.init(reason: TraceExitReason(rawValue: e.reason), gpa: e.gpa, gva: e.gva, qualification: e.qualification, vector: e.vector,
                  cpl: e.cpl, hierarchy: e.hierarchy, ioPort: e.io_port, ioValue: e.io_value, rip: e.rip)
    }
    func fill(_ p: UnsafeMutablePointer<npt_exit>) {
        p.pointee.reason = reason.rawValue; p.pointee.gpa = gpa; p.pointee.gva = gva; p.pointee.qualification = qualification
        p.pointee.vector = vector; p.pointee.cpl = cpl; p.pointee.hierarchy = hierarchy; p.pointee.io_port = ioPort
        p.pointee.io_value = ioValue; p.pointee.rip = rip
    }
}

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
