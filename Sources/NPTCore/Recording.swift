import NPTTrace
import Synchronization

/// The recording layer (issue 14): a VM whose config carries a `TraceRecorder` has its backend VM
/// and vCPUs wrapped, so every call the core makes into the backend and every answer the backend
/// gives is written to an NPTKit trace (docs/trace-format.md), whatever the backend: the backend
/// does nothing for it. Recorded: what the backend reported (exits, registers the core read, memory
/// the VMM read, host persistent memory, statistics, failures with their message), the core's
/// decisions (hierarchy exposed, exit controls, invalidations, injected faults, register writes,
/// privileged entries and exits, region, NVDIMM and flush-hint definitions, physical flushes,
/// fences, the answer to each exit) and the VMM's own calls (VM and vCPU creation, memory written,
/// as a CRC-32C digest to keep traces small).
///
/// One recorder may serve many VMs (the CLI's `--record` gives the same one to every VM of a run):
/// the records of each VM follow a `vm-select` naming its number. The writer is held under a lock
/// and every timestamp is taken under it, so records are in the order the calls happened.
///
/// Compact exit paths (the default; docs/trace-format.md, "exit-path"): a vCPU's exit is held back
/// (`State.pending`, under the lock) while the core handles it; the hierarchy it exposes and the
/// exit controls it sets join it, and its decision writes the four as one exit-path record. Any
/// other record, whichever thread writes it, first writes what is held back as the separate
/// records, so the trace keeps the order of the calls exactly; a reader returns the same records
/// either way.
package final class TraceRecorder: Sendable {
    /// A vCPU's exit path held back until its decision (`active`), as far as it has gone.
    struct PendingExitPath {
        var active = false
        var vm: UInt32 = 0, vcpu: UInt32 = 0
        var timestamp: UInt64 = 0
        /// As the backend returned it (converted when written).
        var exit = VMExit(reason: .none)
        var hierarchy: UInt32?, exitControls: UInt32?
    }
    /// The writer is reached only under the lock.
    private struct State: @unchecked Sendable {
        var writer: TraceWriter
        var selected: UInt32 = .max
        var vms: UInt32 = 0
        var error: NPTError?
        var pending = PendingExitPath()
    }
    /// NPTMutex: a pthread mutex in ThreadSanitizer builds (sanitize.sh's threaded recording row).
    private let state: NPTMutex<State>
    private let clockBase = TraceClock.now()
    /// The recorder of one VM (npt_vm_config.record_path): finished when that VM is destroyed.
    let finishWithVM: Bool
    /// Whether exit paths are written as exit-path records (else as the separate records, as a
    /// trace 1.2 holds them).
    package let compactExitPaths: Bool

    package init(sink: any TraceSink, finishWithVM: Bool = false, compactExitPaths: Bool = true) throws(NPTError) {
        self.finishWithVM = finishWithVM
        self.compactExitPaths = compactExitPaths
        do throws(TraceError) {
            let w = try TraceWriter(sink: sink, flags: compactExitPaths ? TraceFormat.compactExitPaths : 0)
            try w.append(.meta(key: "recorder", value: "nptkit recording layer"), at: 0)
            try w.append(.meta(key: "clock", value: "\(TraceClock.name), ns since the recorder started, read at each exit and each VM-wide call; other records carry the latest reading"), at: 0)
            state = NPTMutex(State(writer: w))
        } catch { throw NPTError(.invalidArgument, "cannot record: \(error)") }
    }

    package convenience init(path: String, finishWithVM: Bool = false, compactExitPaths: Bool = true) throws(NPTError) {
        let sink: FileTraceSink
        do throws(TraceError) { sink = try FileTraceSink(path: path) } catch {
            throw NPTError(.invalidArgument, "cannot record to '\(path)': \(error)")
        }
        try self.init(sink: sink, finishWithVM: finishWithVM, compactExitPaths: compactExitPaths)
    }

    func newVM() -> UInt32 { state.withLock { s in defer { s.vms += 1 }; return s.vms } }

    /// Appends `record` of VM `vm`; the first failure is kept (`finish` reports it) and fails the call.
    /// `readClock`: stamp it with a new reading of the clock (an exit, a call of the VMM's or one
    /// VM-wide); else with the latest reading (the records the core writes while it handles an exit
    /// carry that exit's time, or a later record's of another vCPU: never a time before the one they
    /// were written after). A clock read costs about as much as the record's encoding (bench 10).
    /// (`package`: the CLI's bench measures it alone.)
    package func append(_ record: TraceRecord, vm: UInt32, readClock: Bool = true) throws(NPTError) {
        let now = readClock ? TraceClock.now() &- clockBase : 0
        try writing(vm: vm, selectAt: { max(now, $0.lastTimestamp) }) { w throws(TraceError) in
            try w.append(record, at: max(now, w.lastTimestamp))
        }
    }

    /// The hot path of a vCPU's exit (TraceWriter.appendExitPath): `exit` (stamped with a new
    /// clock reading), `hierarchy`, `exitControls` (`value`) and `decision` (`action`), without a TraceRecord.
    /// With compact exit paths, an exit is held back and the hierarchy and exit controls of its
    /// vCPU join it (once each, in that order), and the decision writes them as one exit-path
    /// record; anything else writes what is held back first, then itself as before.
    package func appendExitPath(_ kind: ExitPathRecord, vm: UInt32, vcpu: UInt32, action: UInt8 = 0, value: UInt32 = 0,
                        exit: VMExit = VMExit(reason: .none)) throws(NPTError) {
        guard compactExitPaths else {
            try writing(vm: vm, selectAt: { $0.lastTimestamp }) { w throws(TraceError) in
                try w.appendExitPath(kind, vcpu: vcpu, action: action, value: value, exit: TraceExit(exit), clockSince: clockBase)
            }
            return
        }
        let failed: NPTError? = state.withLock { s in
            if let e = s.error { return e }
            do throws(TraceError) {
                let mine = s.pending.active && s.pending.vm == vm && s.pending.vcpu == vcpu
                switch kind {
                case .exit:
                    if s.pending.active { try flushPending(&s) }
                    s.pending = PendingExitPath(active: true, vm: vm, vcpu: vcpu,
                                                timestamp: max(TraceClock.now() &- clockBase, s.writer.lastTimestamp), exit: exit)
                case .hierarchy where mine && s.pending.hierarchy == nil && s.pending.exitControls == nil:
                    s.pending.hierarchy = value
                case .exitControls where mine && s.pending.exitControls == nil:
                    s.pending.exitControls = value
                case .decision where mine:
                    let p = s.pending
                    s.pending.active = false
                    try select(vm, &s)
                    try s.writer.appendExitPath(vcpu: vcpu, exit: TraceExit(p.exit), hierarchy: p.hierarchy, exitControls: p.exitControls,
                                                action: action, decision: exit.same(as: p.exit) ? nil : TraceExit(exit), at: p.timestamp)
                default:
                    if s.pending.active { try flushPending(&s) }
                    try select(vm, &s)
                    try s.writer.appendExitPath(kind, vcpu: vcpu, action: action, value: value, exit: TraceExit(exit), clockSince: clockBase)
                }
                return nil
            } catch {
                s.error = NPTError(.backend, "recording failed: \(error)")
                return s.error
            }
        }
        if let failed { throw failed }
    }

    /// A `vm-select` of `vm` if the last record was another VM's, stamped with the last timestamp.
    @inline(__always)
    private func select(_ vm: UInt32, _ s: inout State) throws(TraceError) {
        if s.selected != vm {
            try s.writer.append(.vmSelect(vm: vm), at: s.writer.lastTimestamp)
            s.selected = vm
        }
    }

    /// Writes the exit path held back as the records it stands for so far (exit, then hierarchy
    /// and exit controls if they came), at the exit's timestamp: what the writer would have
    /// written at each call, since nothing came between them.
    private func flushPending(_ s: inout State) throws(TraceError) {
        let p = s.pending
        s.pending.active = false
        try select(p.vm, &s)
        try s.writer.appendExitPath(.exit, vcpu: p.vcpu, exit: TraceExit(p.exit), at: p.timestamp)
        if let h = p.hierarchy { try s.writer.appendExitPath(.hierarchy, vcpu: p.vcpu, value: h, exit: TraceExit(), at: p.timestamp) }
        if let c = p.exitControls { try s.writer.appendExitPath(.exitControls, vcpu: p.vcpu, value: c, exit: TraceExit(), at: p.timestamp) }
    }

    /// `body` with the writer under the lock, after what is held back of an exit path and a
    /// `vm-select` (stamped `selectAt`) if the last record was another VM's. The first failure is
    /// kept (`finish` reports it) and fails this call and every later one.
    @inline(__always)
    private func writing(vm: UInt32, selectAt: (TraceWriter) -> UInt64,
                         _ body: (TraceWriter) throws(TraceError) -> Void) throws(NPTError) {
        let failed: NPTError? = state.withLock { s in
            if let e = s.error { return e }
            do throws(TraceError) {
                if s.pending.active { try flushPending(&s) }
                if s.selected != vm {
                    try s.writer.append(.vmSelect(vm: vm), at: selectAt(s.writer))
                    s.selected = vm
                }
                try body(s.writer)
                return nil
            } catch {
                s.error = NPTError(.backend, "recording failed: \(error)")
                return s.error
            }
        }
        if let failed { throw failed }
    }

    /// The end record, flushed and synced; the first recording failure if there was one.
    package func finish() throws(NPTError) {
        let e: NPTError? = state.withLock { s in
            if let e = s.error { return e }
            do throws(TraceError) {
                if s.pending.active { try flushPending(&s) }
                try s.writer.finish()
            } catch { s.error = NPTError(.backend, "recording failed: \(error)") }
            return s.error
        }
        if let e { throw e }
    }

    /// Wraps a backend VM just made for `config` on `backend`.
    func wrap(_ inner: any BackendVM, backend: any Backend, config: VMConfig) throws(NPTError) -> any BackendVM {
        let vm = RecordingVM(inner: inner, backend: backend, recorder: self, vm: newVM())
        try vm.log(.vmCreate(TraceVMConfig(mbecMode: config.mbecMode.rawValue, ramSize: config.ramSize,
                                           defaultPerms: config.defaultPermissions.rawValue,
                                           maxStepsPerRun: config.maxStepsPerRun, backend: backend.name)))
        try vm.log(.backendInfo(TraceBackendInfo(name: backend.name, capabilities: backend.capabilities.rawValue,
                                                 guestISA: backend.guestISA.rawValue, abiVersion: backend.abiVersion,
                                                 description: backend.summary)))
        return vm
    }
}

/// The calls of the recording layer share this: run the inner call, record what it returned or
/// the failure (kind of the record it would have written, status, message), rethrow.
protocol RecordingLayer: AnyObject {
    var recorder: TraceRecorder { get }
    var vmNumber: UInt32 { get }
    var vcpuIndex: UInt32? { get }
    /// Whether its records read the clock (TraceRecorder.append): the VM's calls do, a vCPU's only
    /// at an exit, its creation and destruction, and a kick.
    var readsClock: Bool { get }
}

extension RecordingLayer {
    func log(_ r: TraceRecord, readClock: Bool? = nil) throws(NPTError) {
        try recorder.append(r, vm: vmNumber, readClock: readClock ?? readsClock)
    }
    /// Records a failure and returns it to be thrown.
    func failed(_ kind: UInt8, _ e: NPTError) -> NPTError {
        try? log(.failure(vcpu: vcpuIndex, kind: kind, status: e.code.rawValue, message: e.message))
        return e
    }
    /// `decision`: recorded before the call (the core's decision); the call's failure after it.
    func decided<T>(_ record: TraceRecord, _ body: () throws(NPTError) -> T) throws(NPTError) -> T {
        try log(record)
        do throws(NPTError) { return try body() } catch { throw failed(record.kind, error) }
    }
    /// `input`: the answer recorded after the call.
    func answered<T>(_ kind: UInt8, readClock: Bool? = nil, _ body: () throws(NPTError) -> T,
                     _ record: (T) -> TraceRecord) throws(NPTError) -> T {
        let v: T
        do throws(NPTError) { v = try body() } catch { throw failed(kind, error) }
        try log(record(v), readClock: readClock)
        return v
    }
}

final class RecordingVM: BackendVM, RecordingLayer, @unchecked Sendable {
    let inner: any BackendVM
    let backend: any Backend
    let recorder: TraceRecorder
    let vmNumber: UInt32
    var vcpuIndex: UInt32? { nil }
    var readsClock: Bool { true }
    init(inner: any BackendVM, backend: any Backend, recorder: TraceRecorder, vm: UInt32) {
        self.inner = inner; self.backend = backend; self.recorder = recorder; self.vmNumber = vm
    }

    func writeMemory(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(NPTError) {
        let crc = CRC32C.update(0, bytes)
        try decided(.memoryDigest(gpa: gpa.raw, length: UInt64(bytes.count), crc: crc)) { () throws(NPTError) in try inner.writeMemory(gpa, bytes) }
    }
    func readMemory(_ gpa: GPA, _ into: UnsafeMutableRawBufferPointer) throws(NPTError) {
        try answered(RecordKind.memoryRead, { () throws(NPTError) in try inner.readMemory(gpa, into) },
                     { _ in .memoryRead(gpa: gpa.raw, data: Array(UnsafeRawBufferPointer(into))) })
    }
    func invalidate(_ inv: Invalidation) throws(NPTError) {
        try decided(.invalidate(hierarchy: inv.hierarchy.rawValue, gpa: inv.range.start.raw, size: inv.range.size)) { () throws(NPTError) in
            try inner.invalidate(inv)
        }
    }
    func makeVCPU(index: UInt32) throws(NPTError) -> any BackendVCPU {
        let v = try decided(.vcpuCreate(vcpu: index)) { () throws(NPTError) in try inner.makeVCPU(index: index) }
        return RecordingVCPU(inner: v, vm: self, index: index)
    }
    func defineRegion(_ range: GPARange, hostOffset: UInt64, contents: UnsafeRawBufferPointer) throws(NPTError) {
        try decided(.defineRegion(gpa: range.start.raw, size: range.size, hostOffset: hostOffset, contents: Array(contents))) { () throws(NPTError) in
            try inner.defineRegion(range, hostOffset: hostOffset, contents: contents)
        }
    }
    func regionVisibility(holder: UInt32?) { inner.regionVisibility(holder: holder) }
    /// The backend's host persistent memory (its VM's own, else the backend's discovery), recorded
    /// as the count and each region; nil (and a failure recorded) where the backend has none.
    var hostPersistence: HostPersistence? {
        let h: HostPersistence
        if let own = inner.hostPersistence { h = own } else {
            do throws(NPTError) { h = try backend.hostPersistence() } catch {
                _ = failed(RecordKind.hostPMemCount, error)
                return nil
            }
        }
        try? log(.hostPMemCount(count: UInt32(h.regions.count)))
        for (i, r) in h.regions.enumerated() {
            try? log(.hostPMemRegion(TraceHostPMemRegion(
                index: UInt32(i), id: r.id, base: r.base, length: r.size, controllerCount: UInt32(r.controllers.count),
                needsWPQFlush: r.needsWPQFlush,
                targets: r.flushTargets.map { TraceHostPMemRegion.FlushTarget(controller: $0.controller, address: $0.address) })))
        }
        return h
    }
    func attachPersistentMemory(_ range: GPARange, region: UInt32, regionOffset: UInt64, hostOffset: UInt64) throws(NPTError) {
        try decided(.attachPMem(gpa: range.start.raw, size: range.size, region: region, regionOffset: regionOffset, hostOffset: hostOffset)) { () throws(NPTError) in
            try inner.attachPersistentMemory(range, region: region, regionOffset: regionOffset, hostOffset: hostOffset)
        }
    }
    func defineFlushHintPage(_ gpa: GPA, hostOffset: UInt64, trapped: Bool) throws(NPTError) {
        try decided(.flushHintPage(gpa: gpa.raw, hostOffset: hostOffset, trapped: trapped)) { () throws(NPTError) in
            try inner.defineFlushHintPage(gpa, hostOffset: hostOffset, trapped: trapped)
        }
    }
    func physicalFlush(region: UInt32, target: HostPersistence.FlushTarget) throws(NPTError) {
        try decided(.physicalFlush(region: region, controller: target.controller, address: target.address)) { () throws(NPTError) in
            try inner.physicalFlush(region: region, target: target)
        }
    }
    var untrappedFlushHintWrites: UInt64 {
        let n = inner.untrappedFlushHintWrites
        try? log(.untrappedWrites(count: n))
        return n
    }
    func powerFailure() throws(NPTError) {
        try decided(.powerFailure) { () throws(NPTError) in try inner.powerFailure() }
    }
    func backendStatistics() throws(NPTError) -> [BackendStatistic] {
        try answered(RecordKind.backendStats, { () throws(NPTError) in try inner.backendStatistics() },
                     { .backendStats(vcpu: nil, stats: $0.map { TraceStat(name: $0.name, value: $0.value) }) })
    }
    /// Every acquisition of the privileged-mode monitor is recorded once taken (in the monitor's
    /// order: the record is written while it is held); a replayed inner backend orders them too.
    var lockTurns: LockTurnMode { inner.lockTurns == .replay ? .replay : .record }
    func lockTurn(_ site: TraceLockSite, vcpu: UInt32?, phase: LockTurnPhase, value: UInt64) throws(NPTError) -> UInt64 {
        let v = inner.lockTurns == .none ? value : try inner.lockTurn(site, vcpu: vcpu, phase: phase, value: value)
        if phase == .taken { try log(.lockTurn(vcpu: vcpu, site: site, value: v), readClock: false) }
        return v
    }
    func destroy() {
        inner.destroy()
        try? log(.vmDestroy)
        if recorder.finishWithVM { try? recorder.finish() }
    }
}

final class RecordingVCPU: BackendVCPU, RecordingLayer, @unchecked Sendable {
    let inner: any BackendVCPU
    /// Its VM's (kept here: reaching them through the VM cost a retain and release a record).
    let recorder: TraceRecorder
    let vmNumber: UInt32
    let index: UInt32
    var vcpuIndex: UInt32? { index }
    var readsClock: Bool { false }
    init(inner: any BackendVCPU, vm: RecordingVM, index: UInt32) {
        self.inner = inner; recorder = vm.recorder; vmNumber = vm.vmNumber; self.index = index
    }

    func registers() throws(NPTError) -> Registers {
        try answered(RecordKind.regsRead, { () throws(NPTError) in try inner.registers() }, { .regsRead(vcpu: index, TraceRegs($0)) })
    }
    func setRegisters(_ r: Registers) throws(NPTError) {
        try decided(.regsWritten(vcpu: index, TraceRegs(r))) { () throws(NPTError) in try inner.setRegisters(r) }
    }
    // The exit path (run, expose, setExitControls, exitDecided): TraceRecorder.appendExitPath.
    func expose(_ h: HierarchyID) throws(NPTError) {
        try recorder.appendExitPath(.hierarchy, vm: vmNumber, vcpu: index, value: h.rawValue)
        do throws(NPTError) { try inner.expose(h) } catch { throw failed(RecordKind.hierarchy, error) }
    }
    func setExitControls(_ c: ExitControls) throws(NPTError) {
        try recorder.appendExitPath(.exitControls, vm: vmNumber, vcpu: index, value: c.rawValue)
        do throws(NPTError) { try inner.setExitControls(c) } catch { throw failed(RecordKind.exitControls, error) }
    }
    func run() throws(NPTError) -> VMExit {
        let x: VMExit
        do throws(NPTError) { x = try inner.run() } catch { throw failed(RecordKind.exit, error) }
        try recorder.appendExitPath(.exit, vm: vmNumber, vcpu: index, exit: x)
        return x
    }
    func injectFault(vector: UInt32, errorCode: UInt64, address: UInt64) throws(NPTError) {
        try decided(.injectFault(vcpu: index, vector: vector, errorCode: errorCode, address: address)) { () throws(NPTError) in
            try inner.injectFault(vector: vector, errorCode: errorCode, address: address)
        }
    }
    func kick() {
        try? log(.kick(vcpu: index), readClock: true)
        inner.kick()
    }
    func fence() throws(NPTError) { try decided(.fence(vcpu: index)) { () throws(NPTError) in try inner.fence() } }
    func completeTrappedWrite() throws(NPTError) {
        try decided(.trappedWriteCompleted(vcpu: index)) { () throws(NPTError) in try inner.completeTrappedWrite() }
    }
    func enterPrivileged(_ entry: PrivilegedEntry, interrupted: Registers) throws(NPTError) {
        try decided(.privilegedEnter(vcpu: index, regionGPA: entry.region.start.raw, regionSize: entry.region.size, entryRIP: entry.entryRIP)) { () throws(NPTError) in
            try inner.enterPrivileged(entry, interrupted: interrupted)
        }
    }
    func leavePrivileged() throws(NPTError) {
        try decided(.privileged(vcpu: index, step: .left, gpa: 0, length: 0)) { () throws(NPTError) in try inner.leavePrivileged() }
    }
    func backendStatistics() throws(NPTError) -> [BackendStatistic] {
        try answered(RecordKind.backendStats, { () throws(NPTError) in try inner.backendStatistics() },
                     { .backendStats(vcpu: index, stats: $0.map { TraceStat(name: $0.name, value: $0.value) }) })
    }
    func exitDecided(_ action: ExitAction, exit: VMExit) throws(NPTError) {
        let a = TraceAction(rawValue: UInt8(truncatingIfNeeded: action.rawValue)) ?? .tool
        try recorder.appendExitPath(.decision, vm: vmNumber, vcpu: index, action: a.rawValue, exit: exit)
        do throws(NPTError) { try inner.exitDecided(action, exit: exit) } catch { throw failed(RecordKind.decision, error) }
    }
    func destroy() {
        inner.destroy()
        try? log(.vcpuDestroy(vcpu: index), readClock: true)
    }
}

extension TraceRegs {
    init(_ r: Registers) {
        self.init()
        cpl = r.cpl; rip = r.rip; rflags = r.rflags; gpr = r.gpr
        cr0 = r.cr0; cr2 = r.cr2; cr3 = r.cr3; cr4 = r.cr4; efer = r.efer; lstar = r.lstar; faultHandler = r.faultHandler
    }
}

extension VMExit {
    /// `==` as field comparisons without a branch each (the recorder compares the decided exit with
    /// the exit on every exit path; the synthesized `==` became a call of memcmp).
    @inline(__always)
    func same(as o: VMExit) -> Bool {
        let a = (reason.rawValue ^ o.reason.rawValue) | (vector ^ o.vector) | (cpl ^ o.cpl)
            | (hierarchy.rawValue ^ o.hierarchy.rawValue) | (ioPort ^ o.ioPort)
        let b = (gpa.raw ^ o.gpa.raw) | (gva.raw ^ o.gva.raw) | (qualification ^ o.qualification) | (ioValue ^ o.ioValue) | (rip ^ o.rip)
        return a == 0 && b == 0
    }
}

extension TraceExit {
    /// (`package`: the CLI's bench converts as the recording layer does.)
    package init(_ x: VMExit) {
        self.init(reason: TraceExitReason(rawValue: x.reason.rawValue), gpa: x.gpa.raw, gva: x.gva.raw, qualification: x.qualification,
                  vector: x.vector, cpl: x.cpl, hierarchy: x.hierarchy.rawValue, ioPort: x.ioPort, ioValue: x.ioValue, rip: x.rip)
    }
}
